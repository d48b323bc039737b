import base64
from datetime import datetime, timezone

from prefect import runtime, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from loraflow.config import FinetuneConfig
from loraflow.registry import ADAPTER, MERGED, REPORT, STAGES, TRAIN
from loraflow.report import eval_text, loss_text, write_report
from loraflow.storage import FILE_LINK_NOTE, ArtifactStore, StageRecord, browser_url
from tasks.common import event_url
from tasks.runs import stage_outcomes, task_runs


def artifact_key(run: str, what: str) -> str:
    """Stable keys (lowercase letters, digits, dashes): the Artifacts page versions them per run."""
    return f"{run}-{what}".lower()


@task(name=REPORT.task, description=REPORT.summary)
def publish_report(config: FinetuneConfig, records: dict[str, StageRecord], upload_event: str | None = None) -> StageRecord:
    """Summary, metrics table, loss curve and output links: in the run folder and as UI artifacts."""
    runs = task_runs(runtime.flow_run.id)
    outcomes = stage_outcomes(records, {name: run["state"] for name, run in runs.items()})
    stage_rows = [{"stage": stage.name, "outcome": outcomes.get(stage.name), "seconds": runs.get(stage.task, {}).get("seconds")}
                  for stage in STAGES if stage.name in records and stage.name in outcomes]
    store = ArtifactStore(config.storage)
    started_by = None
    if upload_event:
        url = event_url(upload_event, runtime.flow_run.scheduled_start_time or datetime.now(timezone.utc))
        started_by = f"the upload of `{config.data.path}` (event " + (f"[{upload_event}]({url})" if url else f"`{upload_event}`") + ")"
    report = write_report(store, config.model_dump(mode="json"), records, stage_rows, started_by)
    run = report["summary"]["run"]
    train = records[TRAIN.name].metrics
    headline = f"{loss_text(train, '{:.4f}'.format)}, {eval_text(train, '{:.4f}'.format)}" + (", resumed after a failure" if train.get("resumed_from") else "")
    create_markdown_artifact(report["markdown"], key=artifact_key(run, "summary"), description=headline)
    create_table_artifact(report["metrics"], key=artifact_key(run, "metrics"), description=f"logged metrics per step of {run}")
    image = base64.b64encode(report["png"]).decode()
    create_markdown_artifact(
        f"![loss curve](data:image/png;base64,{image})\n\nPNG in the store: `{report['run_uri']}/loss.png`",
        key=artifact_key(run, "loss-curve"), description=f"train and eval loss vs step, {run}",
    )
    for name, text, what in ((ADAPTER.name, "adapter (PEFT, safetensors)", "the exported adapter: PeftModel.from_pretrained(base, this folder)"),
                             (MERGED.name, "merged model", "base + adapter merged, checked against base+adapter logits")):
        if name in records:
            uri = records[name].uri
            # The link opens where a browser can (the store server, the S3 console); the description keeps the URI to
            # copy, and says why a file:// link does nothing when clicked.
            url = browser_url(uri) or uri
            create_link_artifact(url, link_text=text, key=artifact_key(run, name),
                                 description=f"`{uri}` — {what} ({run})" + (f". {FILE_LINK_NOTE}" if url.startswith("file:") else ""))
    return StageRecord(stage=REPORT.name, key=records[TRAIN.name].key, uri=report["run_uri"], metrics={"run": run})
