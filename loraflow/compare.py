"""Comparing finished runs side by side, from the store alone (no Prefect): what differed, and what came of it.

Each run folder already holds everything: spec.json (the training settings it ran with), checkpoints/final/
train_summary.json (its results), metrics/metrics.jsonl (its curves), and the records it names (the data stage's
stats.json, the LoRA stage's adapter_config.json). Only the settings whose values differ between the runs are shown.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

from loraflow import adapters
from loraflow.errors import LoraflowError
from loraflow.objectives import OBJECTIVES
from loraflow.registry import EVALUATION, RUNS_FOLDER, TRAIN
from loraflow.report import _fmt, read_metrics
from loraflow.storage import ArtifactStore

# Settings that say where or how patiently a run ran, not what it computed (stages.training_fields leaves them out too).
_NOT_SETTINGS = {"train.pool", "train.retries", "train.timeout_s", "train.master_port", "train.mpi", "train.hosts"}
# (label, train_summary key, digits): the results compared, in this order.
RESULTS = (
    ("eval loss before", "eval_loss_before", 4), ("eval loss", "eval_loss", 4), ("perplexity", "perplexity", 4),
    ("train loss (last logged)", "final_loss", 4), ("steps", "global_step", None), ("kept step (early stopping)", "kept_step", None),
    *(column for objective in OBJECTIVES.values() for column in objective.compare_columns),  # (DPO: its rewards)
    ("exact match before", "exact_match_before", 3), ("exact match", "exact_match_after", 3),
    ("ROUGE-L before", "rouge_l_before", 3), ("ROUGE-L", "rouge_l_after", 3),
    ("general-text loss before", "general_loss_before", 4), ("general-text loss", "general_loss_after", 4),
    ("trainable parameters", "trainable_params", None), ("trainable %", "trainable_percent", 4),
    ("tokens/s", "tokens_per_s", 5), ("peak RSS MB", "peak_rss_mb", 5), ("peak device MB", "peak_device_mb", 5),
    ("training s", "train_runtime_s", 4),
)


@dataclass
class RunFacts:
    run: str
    settings: dict[str, Any]
    results: dict[str, Any]
    metrics: list[dict] = field(default_factory=list)


def _flat(tree: dict, prefix: str) -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_run(store: ArtifactStore, run: str) -> RunFacts:
    run_uri = store.uri(RUNS_FOLDER, run)
    try:
        spec = store.read_json(f"{run_uri}/spec.json")
        results = store.read_json(f"{run_uri}/{TRAIN.folder}/train_summary.json")
    except FileNotFoundError:
        raise LoraflowError(f"{run}: not a finished run in {store.root} (no spec.json or trained adapter there); "
                            "`loraflow du --storage …` lists the runs a store holds") from None
    settings = {"objective": spec["objective"], "model.backend": spec.get("backend", "native")} | _flat(spec["train"], "train.")
    base = (store.manifest(spec["base_uri"]) or {}).get("metrics", {}) if spec.get("base_in_store") else {"quantization": "none"}
    settings |= {"model.quantization": base.get("quantization"), "model.double_quant": base.get("double_quant")}
    if spec.get("dpo"):
        settings |= _flat(spec["dpo"], "dpo.")
    try:
        stats = store.read_json(f"{spec['dataset_uri']}/stats.json")
        settings |= {"data.source": stats.get("source"), "data.template": stats.get("template"),
                     "data.cutoff_len": stats.get("cutoff_len"), "data.train_rows": stats.get("train_rows"),
                     "data.val_rows": stats.get("val_rows")}
    except (FileNotFoundError, KeyError):
        pass
    try:
        # The trained adapter's own config: a DPO run from dpo.start_from trained that adapter, not its lora section.
        adapter = store.read_json(f"{run_uri}/{TRAIN.folder}/adapter_config.json")
        # (each method's own columns: loraflow.adapters; a setting another run's method lacks shows as empty there)
        method = adapters.saved_method(adapter)
        settings |= {"lora.method": method.name if method else adapter.get("peft_type")} | (method.compare_columns(adapter) if method else {})
    except (FileNotFoundError, KeyError):
        pass
    lora_stage = (store.manifest(spec["lora_uri"]) or {}).get("metrics", {})  # (what the adapter trains: methods differ most here)
    results = {**results, **{key: lora_stage[key] for key in ("trainable_params", "trainable_percent") if key in lora_stage}}
    # The evaluation stage's task metrics and forgetting check: its newest output (one per evaluation setting)
    evaluations = [store.manifest(uri) or {} for uri in store.list_committed(f"{run_uri}/{EVALUATION.folder}")]
    if evaluations:
        results = {**max(evaluations, key=lambda manifest: manifest.get("committed_at", "")).get("metrics", {}), **results}
    settings = {key: value for key, value in settings.items() if key not in _NOT_SETTINGS}
    return RunFacts(run, settings, results, read_metrics(store, run_uri))


def differing(runs: list[RunFacts]) -> list[str]:
    """The settings whose values are not the same in every run (a setting a run lacks counts as different)."""
    keys = sorted({key for facts in runs for key in facts.settings})
    return [key for key in keys if len({json.dumps(facts.settings.get(key), sort_keys=True) for facts in runs}) > 1]


def comparison_markdown(runs: list[RunFacts]) -> str:
    header = "| | " + " | ".join(f"`{facts.run}`" for facts in runs) + " |\n|---|" + "---|" * len(runs)
    lines = ["# Runs compared", "", header]
    changed = differing(runs)
    for key in changed:
        lines.append(f"| {key} | " + " | ".join(_fmt(facts.settings.get(key)) for facts in runs) + " |")
    if not changed:
        lines.append("| (settings) | " + " | ".join("same" for _ in runs) + " |")
    for label, key, digits in RESULTS:
        values = [facts.results.get(key) for facts in runs]
        if any(value is not None for value in values):
            lines.append(f"| **{label}** | " + " | ".join(_fmt(v, digits) if digits else _fmt(v) for v in values) + " |")
    padded = [facts.run for facts in runs if facts.results.get("packed") is False]
    if padded and len(padded) < len(runs):  # (tokens/s counts the tokens computed, padding too)
        lines += ["", f"tokens/s of padded runs ({', '.join(f'`{run}`' for run in padded)}) counts their padding too: compare "
                  "speed between runs that both packed or both padded."]
    evaluated = [facts for facts in runs if facts.results.get("eval_loss") is not None]
    if len(evaluated) > 1:
        best = min(evaluated, key=lambda facts: facts.results["eval_loss"])
        lines += ["", f"Lowest eval loss: `{best.run}` ({_fmt(best.results['eval_loss'])})."]
    return "\n".join(lines) + "\n"


def loss_curves_png(runs: list[RunFacts]) -> bytes:
    """Every run's train loss (line) and eval loss (markers, same colour) on one set of axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    for index, facts in enumerate(runs):
        colour = f"C{index % 10}"
        train = [(row["step"], row["loss"]) for row in facts.metrics if "loss" in row]
        evals = [(row["step"], row["eval_loss"]) for row in facts.metrics if "eval_loss" in row]
        if train:
            axes.plot(*zip(*train), color=colour, label=f"{facts.run} train")
        if evals:
            axes.plot(*zip(*evals), color=colour, marker="o", linestyle="--", markersize=4, label=f"{facts.run} eval")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title("loss by step")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def comparison_artifact(runs: list[RunFacts]) -> str:
    """The comparison and the overlaid loss curves as one markdown document (the PNG inlined: a UI artifact cannot
    reach a file in the store)."""
    import base64

    image = base64.b64encode(loss_curves_png(runs)).decode()
    return comparison_markdown(runs) + f"\n![loss curves](data:image/png;base64,{image})\n"

