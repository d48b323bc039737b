"""Finding an adapter's target modules on an architecture: the linear projections a model has, the query/value pair
by the names architectures give it, and a user's list checked against the model. Methods that change layers (LoRA,
IA3, VeRA) resolve their `target` setting here."""

from __future__ import annotations

from loraflow.errors import LoraflowError

# Query/value projection names across architectures: Llama, Mistral, Qwen2, Gemma (q_proj/v_proj),
# BERT-like (query/value), GPT-NeoX/Falcon (fused query_key_value), GPT-2 (fused c_attn).
QV_CANDIDATES = (("q_proj", "v_proj"), ("query", "value"), ("query_key_value",), ("c_attn",), ("Wqkv",))

FUSED_ATTENTION = {"query_key_value": "query, key and value in one fused projection",
                   "c_attn": "query, key and value in one fused projection, a Conv1D in GPT-2",
                   "Wqkv": "query, key and value in one fused projection"}


def linear_module_names(model) -> dict[str, int]:
    """Leaf names of every linear projection (nn.Linear, bnb Linear4bit/8bit, GPT-2 Conv1D) except the output head."""
    import torch  # (here: the registry is read by config.py, which must not cost torch's import)
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if module is head or not isinstance(module, (torch.nn.Linear, Conv1D)):
            continue
        leaf = name.rsplit(".", 1)[-1]
        counts[leaf] = counts.get(leaf, 0) + 1
    return counts


def target_modules(model, target) -> list[str]:
    """all-linear, attention-qv or a list of module names, as the module names of this model."""
    names = linear_module_names(model)
    if target == "all-linear":
        return sorted(names)
    if target == "attention-qv":
        for candidate in QV_CANDIDATES:
            if all(name in names for name in candidate):
                return list(candidate)
        raise LoraflowError(
            f"target attention-qv: no query/value projections found (linear layers: {', '.join(sorted(names))}); "
            "list the module names in lora.target"
        )
    missing = [name for name in target if name not in names]
    if missing:
        raise LoraflowError(
            f"lora.target names {', '.join(missing)}, which this model does not have; its linear layers are: "
            f"{', '.join(sorted(names))}"
        )
    return list(target)


def describe_targets(targets: list[str]) -> str:
    """What the chosen modules are, where a name alone misleads (a fused attention projection is more than q and v)."""
    return ", ".join(f"{name} ({FUSED_ATTENTION[name]})" if name in FUSED_ATTENTION else name for name in targets)
