"""A run's report: summary (markdown), metrics rows, loss curve (PNG), written into the run folder.

Prefect-free: tasks/report.py publishes the same content as UI artifacts, and `loraflow artifacts`
prints it from the store.
"""

from __future__ import annotations

import io
import json
import math
import re
import shlex
import sys
from pathlib import Path
from collections.abc import Callable
from typing import Any

from loraflow import adapters
from loraflow.config import adapter_settings
from loraflow.data.templates import generation_prompt
from loraflow.storage import FILE_LINK_NOTE, ArtifactStore, StageRecord, browser_url
from loraflow.objectives import OBJECTIVES
from loraflow.registry import ADAPTER, BASE, DATASET, EVALUATION, LORA, MERGED, TRAIN

METRIC_COLUMNS = ("step", "epoch", "loss", "eval_loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                  "learning_rate", "grad_norm", "tokens_per_s", "peak_rss_mb", "peak_device_mb")
REWARD_CURVES = (("rewards/chosen", "chosen reward"), ("rewards/rejected", "rejected reward"), ("rewards/margins", "margin"))
_SECRET_NAME = re.compile(r"(secret|password|token|key|credential)", re.IGNORECASE)
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


def redact(value: Any, name: str = "") -> Any:
    """The config as shown to people: secret-looking fields and credentials inside URLs masked."""
    if isinstance(value, dict):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, name) for v in value]
    if isinstance(value, str):
        if _SECRET_NAME.search(name) and value:
            return "***"
        return _URL_CREDENTIALS.sub("***@", value)
    return value


def run_plan_lines(train: dict) -> list[str]:
    """What the training decided where the config said auto (loraflow.plan), from the train summary."""
    if "memory_plan" not in train:
        return []
    return [f"- {train.get('device')}, {train.get('precision')} ({train.get('precision_reason')}), "
            f"{'packed' if train.get('packed') else 'padded'} micro batches"
            f"{' (' + train['padded_because'] + ')' if train.get('padded_because') else ''}, "
            f"{train.get('world_size')} process(es)",
            f"- memory plan: {train['memory_plan']}"]


def run_uri_of(records: dict[str, StageRecord]) -> str:
    return records[TRAIN.name].uri.removesuffix("/" + TRAIN.folder)


def read_metrics(store: ArtifactStore, run_uri: str) -> list[dict]:
    if not store.is_committed(f"{run_uri}/metrics"):
        return []
    return [json.loads(line) for line in store.read_text(f"{run_uri}/metrics/metrics.jsonl").splitlines() if line.strip()]


# How each metric is shown: significant digits (None: a whole number).
_ROUNDING = {"epoch": 3, "loss": 4, "eval_loss": 4, "learning_rate": 3, "grad_norm": 3, "tokens_per_s": None,
             "peak_rss_mb": None, "peak_device_mb": None}


def _rounded(column: str, value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf"/"nan": JSON has no such numbers, and the UI's table drops every row at a bare Infinity
    if not isinstance(value, (int, float)) or isinstance(value, bool) or column == "step":
        return value
    digits = _ROUNDING.get(column, 4)
    return round(value) if digits is None else float(f"{value:.{digits}g}")


def metrics_table(rows: list[dict]) -> list[dict]:
    """One row per step (train and eval metrics of a step side by side), numbers rounded for reading."""
    by_step: dict[Any, dict] = {}
    for row in rows:
        by_step.setdefault(row.get("step"), {}).update({k: v for k, v in row.items() if v is not None})
    columns = [column for column in METRIC_COLUMNS if any(column in r for r in by_step.values())]
    return [{column: _rounded(column, row.get(column)) for column in columns} for row in by_step.values()]


def _optimizer_panel(axes, rows: list[dict]) -> None:
    """The learning rate the schedule gave and the gradient norm before clipping, per logged step."""
    train_rows = [row for row in rows if "learning_rate" in row]
    axes.plot([row["step"] for row in train_rows], [row["learning_rate"] for row in train_rows], color="C2", label="learning rate")
    axes.set_xlabel("step")
    axes.set_ylabel("learning rate")
    axes.grid(alpha=0.3)
    norms = [(row["step"], row["grad_norm"]) for row in train_rows if "grad_norm" in row]
    if not norms:  # (transformers 4.36, in the ipex-llm backend's environment, logs no gradient norm)
        axes.set_title("schedule")
        axes.legend(fontsize=8)
        return
    axes.set_title("schedule and gradient norm")
    norm = axes.twinx()
    norm.plot(*zip(*norms), color="C3", label="grad norm")
    norm.set_ylabel("grad norm")
    lines, extra = axes.get_legend_handles_labels(), norm.get_legend_handles_labels()
    axes.legend(lines[0] + extra[0], lines[1] + extra[1], fontsize=8)


def loss_curve_png(rows: list[dict], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpo = any("rewards/margins" in row for row in rows)
    figure, panels = plt.subplots(1, 3 if dpo else 2, figsize=(19 if dpo else 13, 4), dpi=100, squeeze=False)
    axes = panels[0][0]
    for column, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        points = [(row["step"], row[column]) for row in rows if column in row]
        if points:
            steps, values = zip(*points)
            axes.plot(steps, values, marker="o" if column == "eval_loss" else None, markersize=4, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    _optimizer_panel(panels[0][1], rows)
    if dpo:  # DPO: the implicit rewards (β·log-ratio to the reference) and how often chosen beats rejected
        rewards = panels[0][2]
        train_rows = [row for row in rows if "rewards/margins" in row]
        for column, label in REWARD_CURVES:
            rewards.plot([row["step"] for row in train_rows], [row[column] for row in train_rows], label=label)
        accuracy = rewards.twinx()
        accuracy.plot([row["step"] for row in train_rows], [row["rewards/accuracies"] for row in train_rows], "k:", label="reward accuracy")
        accuracy.set_ylim(0, 1.05)
        accuracy.set_ylabel("reward accuracy")
        rewards.set_xlabel("step")
        rewards.set_ylabel("reward")
        rewards.set_title("DPO rewards (training pairs)")
        rewards.grid(alpha=0.3)
        lines = rewards.get_legend_handles_labels()
        extra = accuracy.get_legend_handles_labels()
        rewards.legend(lines[0] + extra[0], lines[1] + extra[1], fontsize=8)
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def loss_text(train: dict, number: Callable[[float], str]) -> str:
    """The train loss, first → last logged (the trainer always logs the last step)."""
    if train.get("final_loss") is None:
        return "train loss: none logged"
    text = f"train loss {number(train['first_loss'])} → {number(train['final_loss'])}"
    if train.get("kept_step") is not None and train["kept_step"] != train.get("global_step"):
        text += f" (at the last step, {train.get('global_step')})"  # early stopping exported another step's adapter
    if train.get("short_run_note"):
        text += f" — {train['short_run_note']}"
    return text


def eval_text(train: dict, number: Callable[[float], str]) -> str:
    """The eval loss before training → after (with perplexity for SFT), or why there is none (summaries written
    before notes existed say 'no eval split')."""
    if train.get("eval_loss") is None:
        return "eval loss: " + (train.get("eval_note") or "no eval split")
    before, after = train.get("eval_loss_before"), train["eval_loss"]
    text = f"eval loss {number(before)} → {number(after)}" if before is not None else f"eval loss {number(after)}"
    if train.get("perplexity") is not None:
        ppl = train.get("perplexity_before")
        text += f" (perplexity {f'{ppl:,.4g} → ' if ppl is not None else ''}{train['perplexity']:,.4g})"
    if train.get("kept_step") == 0:  # early stopping, and no step beat the start
        text += ", adapter: the starting one (no evaluated step beat the starting model"
        text += f"; stopped early at step {train['global_step']})" if train.get("stopped_early") else ")"
    elif train.get("kept_step") is not None:  # early stopping
        text += f", adapter from step {train['kept_step']} (the best eval loss"
        text += f"; stopped early at step {train['global_step']})" if train.get("stopped_early") else ")"
    return text


def reward_text(train: dict) -> str | None:
    """The run's objective's own summary lines (DPO: how the rewards moved, first → last logged training step, and the
    reference passes training ran), or None where it has none."""
    objective = OBJECTIVES.get(train.get("objective", "sft"))
    lines = objective.summary_lines(train) if objective else []
    return "\n".join(lines) if lines else None


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return "—" if value is None else str(value)


def _link(uri: str | None) -> str:
    """A store URI as people use it: copyable in code, and a link where a browser can open it."""
    if not uri:
        return ""
    url = browser_url(uri)
    return f"`{uri}`" + (f" ([open]({url}))" if url else "")


def _resume_note(train: dict) -> str | None:
    resumed = train.get("resumed_from")
    if not resumed:
        return None
    return f"resumed from {resumed.rsplit('/', 1)[-1]} after a failure (`{resumed}`): the steps before it were not repeated"


# Prefect's UI shows a markdown code block unwrapped, in a box as wide as the page, cutting what does not fit (its
# markdown keeps no style or raw HTML): the summary's code is folded to this width, staying code that runs as is.
CODE_WIDTH = 79


def _py_str(value: str, indent: int) -> str:
    """A Python string literal for value, as adjacent literals in parentheses over several lines where one line would pass
    CODE_WIDTH (split after a space, a slash or a newline where one is near)."""
    if indent + len(repr(value)) <= CODE_WIDTH:
        return repr(value)
    room = max(CODE_WIDTH - indent - 3, 20)
    chunks: list[str] = []
    while value:
        end = len(value)
        while len(repr(value[:end])) > room:
            end -= 1
        if end < len(value):
            cut = max(value.rfind(mark, 0, end) for mark in (" ", "/", "\n"))
            end = cut + 1 if cut >= end // 2 else end
        chunks.append(repr(value[:end]))
        value = value[end:]
    return "(" + ("\n" + " " * (indent + 1)).join(chunks) + ")"


def usage_snippet(config: dict, records: dict[str, StageRecord], example: str = "Give three tips for staying healthy.") -> str:
    """Python that loads the adapter onto its base with PEFT (and the merged model), real paths filled in."""
    adapter = records[ADAPTER.name].uri
    merged = records.get(MERGED.name)
    prompt = generation_prompt(config["data"]["format"], config["data"]["template"], example)
    lines = ["import torch", "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    if "://" in adapter:  # a remote store: PEFT and transformers read local folders
        local = f"./{run_uri_of(records).rsplit('/', 1)[-1]}-adapter"
        lines += ["import fsspec", "", f"fs, path = fsspec.core.url_to_fs({_py_str(adapter, 32)})",
                  f"fs.get(path + '/', {_py_str(local + '/', 19)}, recursive=True)", f"adapter = {_py_str(local, 10)}"]
    else:
        lines += [f"adapter = {_py_str(adapter, 10)}"]
    lines += [
        "tokenizer = AutoTokenizer.from_pretrained(adapter)",
        "base = AutoModelForCausalLM.from_pretrained(",
        f"    {_py_str(config['model']['base'], 4)},", "    dtype=torch.float32)",
        *(["# the tokens the run added (data.new_tokens)", "base.resize_token_embeddings(len(tokenizer))"]
          if config["data"].get("new_tokens") else []),
        "# the base with the trained adapter",
        "model = PeftModel.from_pretrained(base, adapter).eval()",
        "",
        f"# the run's template ({config['data']['template']})",
        f"prompt = {_py_str(prompt, 9)}",
        "inputs = tokenizer(prompt, return_tensors='pt')",
        *(["# (no cache: transformers' own would replace the prefix-tuning adapter's",
           "# keys and values)",
           "output = model.generate(**inputs, max_new_tokens=64, do_sample=False,",
           "                        use_cache=False)"]
          if not adapters.of_section(config["lora"]).generates_with_cache else
          ["output = model.generate(**inputs, max_new_tokens=64, do_sample=False)"]),
        "answer = output[0, inputs['input_ids'].shape[1]:]",
        "print(tokenizer.decode(answer, skip_special_tokens=True))",
    ]
    if merged is not None and "://" not in merged.uri:
        lines += ["", "# or the merged model: plain transformers, no PEFT",
                  "merged = AutoModelForCausalLM.from_pretrained(",
                  f"    {_py_str(merged.uri, 4)},", "    dtype=torch.float32)"]
    return "\n".join(lines)


def generate_command(config: dict, records: dict[str, StageRecord], folded: bool = False) -> str:
    """The `loraflow generate` command for this run: one line, or folded (an option per line, for the summary's block)."""
    run = run_uri_of(records).rsplit("/", 1)[-1]
    # The venv's own loraflow (a bare `loraflow` is on PATH only in an activated venv).
    program = shlex.quote(str(Path(sys.executable).parent / "loraflow"))
    parts = [f"{program} generate {run}", f"--storage {shlex.quote(config['storage'])}",
             "--prompt 'Give three tips for staying healthy.'"]
    return (" \\\n  " if folded else " ").join(parts)


def rows_text(data: dict) -> str:
    """The data stage's rows: read, kept, the split (and why it is smaller than asked), dropped."""
    dropped = ", ".join(f"{count} {reason}" for reason, count in (data.get("rows_dropped") or {}).items()) or "none"
    note = f" — {data['val_note']}" if data.get("val_note") else ""
    return (f"{data.get('rows_read')} rows read, {data.get('rows_kept')} kept ({data.get('train_rows')} train / "
            f"{data.get('val_rows')} validation{note}); dropped: {dropped}")


def _data_lines(data: dict, percentiles: dict) -> list[str]:
    lengths = "token length " + ", ".join(f"{k} {v}" for k, v in percentiles.items())
    if "cutoff_len" not in data:  # preference pairs
        cuts = ", ".join(f"{count} {what}" for what, count in data.get("truncations", {}).items()) or "none"
        return [f"- {data.get('truncated_rows')} pairs truncated to max prompt {data.get('max_prompt_length')} / max length "
                f"{data.get('max_length')} tokens ({cuts}); {lengths} (prompt + longer answer)",
                f"- {data.get('tokens')} tokens; format `{data.get('format')}`, template {data.get('template')}"]
    return [f"- {data.get('truncated_rows')} rows truncated at cutoff {data.get('cutoff_len')}; {lengths}",
            f"- {data.get('tokens')} tokens, {_fmt(100 * data.get('label_token_fraction', 0), 3)}% of them trained; "
            f"template `{data.get('template')}`, train_on_inputs {data.get('train_on_inputs')}"]


def evaluation_text(metrics: dict) -> list[str]:
    """The evaluation stage's numbers, before (the base model) → after (with the adapter), one line per check."""
    lines = []
    if "exact_match_after" in metrics:
        lines.append(f"task metrics on {metrics['task_rows']} prompts: exact match {metrics['exact_match_before']:.3f} → "
                     f"{metrics['exact_match_after']:.3f}, ROUGE-L {metrics['rouge_l_before']:.3f} → {metrics['rouge_l_after']:.3f}")
    if "general_loss_after" in metrics:
        before, after = metrics["general_loss_before"], metrics["general_loss_after"]
        lines.append(f"forgetting check on {metrics['general_rows']} general-text rows: loss {before:.4f} → {after:.4f} "
                     f"({'+' if after >= before else ''}{100 * (after - before) / before:.1f}%)")
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip() or "(empty)"


def evaluation_lines(record: StageRecord) -> list[str]:
    """The summary's Evaluation section: the numbers, then the first prompts with their answers before and after."""
    metrics = record.metrics
    lines = [f"- {line} (before: the base model; after: with this adapter)" for line in evaluation_text(metrics)]
    if metrics.get("examples"):
        lines += ["", "| prompt | reference | before | after |", "|---|---|---|---|",
                  *(f"| {_cell(row['prompt'])} | {_cell(row['reference'])} | {_cell(row['before'])} | {_cell(row['after'])} |"
                    for row in metrics["examples"])]
    lines += ["", f"Every answer: {_link(record.uri + '/outputs.jsonl')}" if "examples" in metrics else f"Output: {_link(record.uri)}"]
    return lines


def summary_markdown(config: dict, records: dict[str, StageRecord], stage_rows: list[dict], run_uri: str,
                     started_by: str | None = None) -> str:
    """stage_rows: [{stage, outcome, seconds}] in pipeline order; started_by: what started the run (markdown)."""
    data = records[DATASET.name].metrics
    lora = records[LORA.name].metrics
    train = records[TRAIN.name].metrics
    merged = records.get(MERGED.name)
    percentiles = data.get("token_length_percentiles", {})
    resumed = _resume_note(train)
    adapter = adapter_settings(config["lora"])
    lines = [
        f"# Fine-tune `{run_uri.rsplit('/', 1)[-1]}`",
        "",
        f"**{loss_text(train, lambda v: _fmt(v))}** · **{eval_text(train, lambda v: _fmt(v))}** · **{_fmt(train.get('tokens_per_s'), 6)} tokens/s** · "
        f"peak RSS {_fmt(train.get('peak_rss_mb'), 6)} MB"
        + (f" · peak device {_fmt(train.get('peak_device_mb'), 6)} MB" if train.get("peak_device_mb") else "")
        + f" · {train.get('global_step')} steps on {train.get('device')} ({train.get('precision')})",
        "",
        *([reward_text(train), ""] if reward_text(train) else []),
        *([f"**Training {resumed}.**", ""] if resumed else []),
        *([f"Started by {started_by}.", ""] if started_by else []),
        "## Use it",
        "",
        "```python",
        usage_snippet(config, records),
        "```",
        "",
        "Or in a terminal (streams the answer" + ("; `--merged` uses the merged model):" if merged is not None else "):"),
        "",
        "```bash",
        generate_command(config, records, folded=True),
        "```",
        "",
        "## How it ran",
        "",
        *run_plan_lines(train),
        "",
        "## Stages",
        "",
        "| stage | outcome | seconds | output |",
        "|---|---|---|---|",
        *(f"| {row['stage']} | {row['outcome']} | {_fmt(row.get('seconds'), 3)} | {_link(records[row['stage']].uri)} |"
          for row in stage_rows if row["stage"] in records),
        "",
        "## Data",
        "",
        f"- source {_link(data.get('source'))}: {rows_text(data)}",
        *(_data_lines(data, percentiles)),
        "",
        "## Adapter",
        "",
        (f"- started from the adapter {_link(lora['start_from'])}: {lora.get('description') or _older_start_description(lora)}"
         if lora.get("start_from") else
         f"- {adapter.describe(', '.join(lora.get('target_modules', [])))}: {lora.get('trainable_params'):,} trainable of "
         f"{lora.get('total_params'):,} parameters ({lora.get('trainable_percent')}%)"),
        f"- base quantization: {records[BASE.name].metrics.get('quantization')}",
    ]
    if not (method := adapters.method(adapter.method)).merges:
        lines.append(f"- not merged: {method.words} trains {method.trains}, not weights, so there is nothing "
                     "to fold into the base; load the adapter with PeftModel.from_pretrained, as above")
    if merged is not None:
        lines.append(f"- merged model checked: max |logit difference| {_fmt(merged.metrics.get('max_abs_logit_diff'), 3)} "
                     f"(allowed {_fmt(merged.metrics.get('tolerance'), 3)}, {merged.metrics.get('dtype')})")
    if (evaluation := records.get(EVALUATION.name)) is not None:
        lines += ["", "## Evaluation", "", *evaluation_lines(evaluation)]
    lines += ["", "## Outputs", "",
              *([FILE_LINK_NOTE, ""] if (browser_url(run_uri) or "").startswith("file:") else []),
              f"- adapter: {_link(records[ADAPTER.name].uri)}",
              *([f"- merged model: {_link(merged.uri)}"] if merged is not None else []),
              f"- metrics: {_link(run_uri + '/metrics/metrics.jsonl')}, loss curve: {_link(run_uri + '/loss.png')}",
              "", "## Config", "", "```json", json.dumps(redact(config), indent=2), "```", ""]
    return "\n".join(lines)


def write_report(store: ArtifactStore, config: dict, records: dict[str, StageRecord], stage_rows: list[dict],
                 started_by: str | None = None) -> dict:
    """Write summary.md, summary.json and loss.png into the run folder; return what was written."""
    run_uri = run_uri_of(records)
    rows = read_metrics(store, run_uri)
    markdown = summary_markdown(config, records, stage_rows, run_uri, started_by)
    png = loss_curve_png(rows, run_uri.rsplit("/", 1)[-1])
    store.write_bytes(f"{run_uri}/summary.md", markdown.encode())
    store.write_bytes(f"{run_uri}/loss.png", png)
    train = records[TRAIN.name].metrics
    summary = {
        "run": run_uri.rsplit("/", 1)[-1], "run_uri": run_uri, "final_loss": train.get("final_loss"),
        "eval_loss": train.get("eval_loss"), "tokens_per_s": train.get("tokens_per_s"), "resumed_from": train.get("resumed_from"),
        "stages": stage_rows, "outputs": {name: record.uri for name, record in records.items() if record.uri},
    }
    store.write_json(f"{run_uri}/summary.json", summary)
    return {"run_uri": run_uri, "markdown": markdown, "png": png, "metrics": metrics_table(rows), "summary": summary}


def _older_start_description(lora: dict) -> str:
    # (a record written before the lora stage described a start_from adapter itself: those were LoRA)
    return f"LoRA r{lora.get('r')} on {', '.join(lora.get('target_modules', []))}"
