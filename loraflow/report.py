"""A run's report: summary (markdown), metrics rows, loss curve (PNG), written into the run folder.

Prefect-free: tasks/report.py publishes the same content as UI artifacts, and `loraflow artifacts`
prints it from the store.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

from loraflow.storage import ArtifactStore, StageRecord

METRIC_COLUMNS = ("step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s", "peak_rss_mb", "peak_device_mb")
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


def run_uri_of(records: dict[str, StageRecord]) -> str:
    return records["train"].uri.rsplit("/checkpoints/", 1)[0]


def read_metrics(store: ArtifactStore, run_uri: str) -> list[dict]:
    if not store.is_committed(f"{run_uri}/metrics"):
        return []
    return [json.loads(line) for line in store.read_text(f"{run_uri}/metrics/metrics.jsonl").splitlines() if line.strip()]


def metrics_table(rows: list[dict]) -> list[dict]:
    return [{column: row.get(column) for column in METRIC_COLUMNS if any(column in r for r in rows)} for row in rows]


def loss_curve_png(rows: list[dict], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
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
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return "—" if value is None else str(value)


def summary_markdown(config: dict, records: dict[str, StageRecord], stage_rows: list[dict], run_uri: str) -> str:
    """stage_rows: [{stage, outcome, seconds}] in pipeline order."""
    data = records["dataset"].metrics
    lora = records["lora"].metrics
    train = records["train"].metrics
    merged = records.get("merged")
    dropped = ", ".join(f"{count} {reason}" for reason, count in data.get("rows_dropped", {}).items()) or "none"
    percentiles = data.get("token_length_percentiles", {})
    lines = [
        f"# Fine-tune `{run_uri.rsplit('/', 1)[-1]}`",
        "",
        f"**final train loss** {_fmt(train.get('final_loss'))} (first {_fmt(train.get('first_loss'))}) · "
        f"**eval loss** {_fmt(train.get('eval_loss'))} · **{_fmt(train.get('tokens_per_s'), 6)} tokens/s** · "
        f"peak RSS {_fmt(train.get('peak_rss_mb'), 6)} MB"
        + (f" · peak device {_fmt(train.get('peak_device_mb'), 6)} MB" if train.get("peak_device_mb") else "")
        + f" · {train.get('global_step')} steps on {train.get('device')} ({train.get('precision')})",
        "",
        "## Stages",
        "",
        "| stage | outcome | seconds | output |",
        "|---|---|---|---|",
        *(f"| {row['stage']} | {row['outcome']} | {_fmt(row.get('seconds'), 3)} | {records[row['stage']].uri or ''} |"
          for row in stage_rows if row["stage"] in records),
        "",
        "## Data",
        "",
        f"- source `{data.get('source')}`: {data.get('rows_read')} rows read, {data.get('rows_kept')} kept "
        f"({data.get('train_rows')} train / {data.get('val_rows')} validation); dropped: {dropped}",
        f"- {data.get('truncated_rows')} rows truncated at cutoff {data.get('cutoff_len')}; token length "
        + ", ".join(f"{k} {v}" for k, v in percentiles.items()),
        f"- {data.get('tokens')} tokens, {_fmt(100 * data.get('label_token_fraction', 0), 3)}% of them trained; "
        f"template `{data.get('template')}`, train_on_inputs {data.get('train_on_inputs')}",
        "",
        "## Adapter",
        "",
        f"- LoRA r{config['lora']['r']}/alpha{config['lora']['alpha']}/dropout {config['lora']['dropout']} on "
        f"{', '.join(lora.get('target_modules', []))}: {lora.get('trainable_params'):,} trainable of "
        f"{lora.get('total_params'):,} parameters ({lora.get('trainable_percent')}%)",
        f"- base quantization: {records['quantized'].metrics.get('quantization')}",
    ]
    if merged is not None:
        lines.append(f"- merged model checked: max |logit difference| {_fmt(merged.metrics.get('max_abs_logit_diff'), 3)} "
                     f"(allowed {_fmt(merged.metrics.get('tolerance'), 3)}, {merged.metrics.get('dtype')})")
    lines += ["", "## Outputs", "",
              f"- adapter: `{records['adapter'].uri}`",
              *( [f"- merged model: `{merged.uri}`"] if merged is not None else []),
              f"- metrics: `{run_uri}/metrics/metrics.jsonl`, loss curve: `{run_uri}/loss.png`",
              "", "## Config", "", "```json", json.dumps(redact(config), indent=2), "```", ""]
    return "\n".join(lines)


def write_report(store: ArtifactStore, config: dict, records: dict[str, StageRecord], stage_rows: list[dict]) -> dict:
    """Write summary.md, summary.json and loss.png into the run folder; return what was written."""
    run_uri = run_uri_of(records)
    rows = read_metrics(store, run_uri)
    markdown = summary_markdown(config, records, stage_rows, run_uri)
    png = loss_curve_png(rows, run_uri.rsplit("/", 1)[-1])
    store.write_bytes(f"{run_uri}/summary.md", markdown.encode())
    store.write_bytes(f"{run_uri}/loss.png", png)
    train = records["train"].metrics
    summary = {
        "run": run_uri.rsplit("/", 1)[-1], "run_uri": run_uri, "final_loss": train.get("final_loss"),
        "eval_loss": train.get("eval_loss"), "tokens_per_s": train.get("tokens_per_s"),
        "stages": stage_rows, "outputs": {name: record.uri for name, record in records.items() if record.uri},
    }
    store.write_json(f"{run_uri}/summary.json", summary)
    return {"run_uri": run_uri, "markdown": markdown, "png": png, "metrics": metrics_table(rows), "summary": summary}
