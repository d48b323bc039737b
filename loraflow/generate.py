"""Trying a fine-tune: its template applied to a prompt, base + adapter (or the merged model), greedy output.

`loraflow generate RUN --storage STORE --prompt TEXT` and the summary's load snippet do the same thing.
Nothing read from the store decides whether code runs: `trust_remote_code` is the caller's flag, never
the run's stored config.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from loraflow import adapters
from loraflow.data.templates import generation_prompt
from loraflow.errors import LoraflowError
from loraflow.data.tokenize import load_tokenizer
from loraflow.models import native
from loraflow.plan import choose_precision
from loraflow.storage import ArtifactStore

BATCH = 8  # prompts answered together when nothing is streamed


def run_outputs(store: ArtifactStore, run: str) -> dict[str, str]:
    """{adapter, merged?} URIs of a run folder, or an error naming the runs that have an adapter."""
    run_uri = store.uri("runs", run)
    outputs = {name: f"{run_uri}/{name}" for name in ("adapter", "merged") if store.is_committed(f"{run_uri}/{name}")}
    if "adapter" not in outputs:
        try:
            folders = sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in store.fs.ls(store.path(store.uri("runs")), detail=False))
        except FileNotFoundError:
            folders = []
        exported = [name for name in folders if store.is_committed(store.uri("runs", name, "adapter"))]
        raise LoraflowError(f"{run_uri}: no exported adapter there; runs with one in {store.url}: {', '.join(exported) or 'none'}")
    return outputs


def generate(storage: str, run: str, prompts: list[str], max_new_tokens: int = 128, merged: bool = False,
             trust_remote_code: bool = False, on_text: Callable[[str], None] | None = None,
             on_prompt: Callable[[str], None] | None = None, log: Callable[[str], None] | None = None) -> list[str]:
    """Greedy completions of `prompts` by the run's model, loaded once; on_prompt is called before each
    prompt's answer, and with on_text each answer is streamed to it as it is generated; log hears what was loaded."""
    import warnings

    store = ArtifactStore(storage)
    outputs = run_outputs(store, run)
    adapter_dir = store.local_copy(outputs["adapter"])
    config = json.loads((adapter_dir / "loraflow_config.json").read_text())
    device = native.available_device()
    precision = choose_precision("auto", device)[0]
    tokenizer = load_tokenizer(str(adapter_dir))  # the export stage keeps the tokenizer the run trained with
    if merged:
        if "merged" not in outputs:
            method = adapters.of_section(config["lora"])
            why = f"its adapter is {method.words}, which cannot be merged" if not method.merges else "merge.enabled was false"
            raise LoraflowError(f"run {run} has no merged model ({why}); drop --merged to use base + adapter")
        model = native.load_causal_lm(store.local_copy(outputs["merged"]), device, precision, None, trust_remote_code)
    else:
        base = native.load_causal_lm(Path(native.resolve_model_path(config["model"]["base"])), device, precision, None, trust_remote_code)
        model = native.with_adapter(base, adapter_dir, tokenizer)
    model.eval()
    if log:
        log(f"{run}: {'the merged model' if merged else 'base + adapter'} on {device} in {precision}"
            + (" (the summary's Python snippet loads fp32: its answers may differ)" if precision != "fp32" else ""))
    templated = [generation_prompt(config["data"]["format"], config["data"]["template"], text) for text in prompts]
    with warnings.catch_warnings():
        # (PEFT's prompt-learning notes on position ids and the deprecated cache argument: about its internals)
        warnings.filterwarnings("ignore", message=".*(Position ids are not supported|past_key_values).*")
        return answer(model, tokenizer, templated, max_new_tokens, on_text, on_start=on_prompt and (lambda index: on_prompt(prompts[index])))


def answer(model, tokenizer, prompts: list[str], max_new_tokens: int, on_text: Callable[[str], None] | None = None,
           on_start: Callable[[int], None] | None = None) -> list[str]:
    """Greedy answers to prompts already in the run's template: in batches of BATCH rows, left-padded (each row goes
    on from its own last token); one prompt at a time when streamed to on_text (a streamer follows one row) or when
    on_start wants each prompt's index before its answer. The evaluation stage's task metrics and `loraflow generate`
    both answer with this."""
    import torch

    tokenizer.padding_side = "left"
    size = 1 if on_text or on_start else BATCH
    # A prefix-tuning adapter is the key/value cache PEFT hands the model; transformers 5's generate builds its own cache
    # and ignores PEFT's (the answer would be the base model's), unless generation runs without a cache.
    use_cache = generates_with_cache(model)
    answers = []
    for start in range(0, len(prompts), size):
        if on_start:
            on_start(start)
        batch = tokenizer(prompts[start:start + size], return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 streamer=_CallbackStreamer(tokenizer, on_text) if on_text else None, use_cache=use_cache,
                                 pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        answers += tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


def generates_with_cache(model) -> bool:
    """Whether generation may use transformers' KV cache with this model's active adapter (its method says; no adapter: yes)."""
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))
    method = adapters.saved_method({"peft_type": config.peft_type.value}) if config is not None else None
    return method is None or method.generates_with_cache


def _CallbackStreamer(tokenizer, on_text):
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            on_text(text + ("\n" if stream_end else ""))

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
