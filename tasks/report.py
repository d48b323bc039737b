import base64

from prefect import runtime, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from flows.runs import STAGE_TASKS, stage_outcomes, task_runs
from loraflow.config import FinetuneConfig
from loraflow.report import write_report
from loraflow.storage import ArtifactStore, StageRecord


def artifact_key(run: str, what: str) -> str:
    """Stable keys (lowercase letters, digits, dashes): the Artifacts page versions them per run."""
    return f"{run}-{what}".lower()


@task(name="publish-report")
def publish_report(config: FinetuneConfig, records: dict[str, StageRecord]) -> StageRecord:
    """Summary, metrics table, loss curve and output links: in the run folder and as UI artifacts."""
    runs = task_runs(runtime.flow_run.id)
    outcomes = stage_outcomes(records, {name: run["state"] for name, run in runs.items()})
    stage_rows = [{"stage": stage, "outcome": outcomes.get(stage), "seconds": runs.get(task_name, {}).get("seconds")}
                  for stage, task_name in STAGE_TASKS.items() if stage in records]
    store = ArtifactStore(config.storage)
    report = write_report(store, config.model_dump(mode="json"), records, stage_rows)
    run = report["summary"]["run"]
    train = records["train"].metrics
    headline = f"final train loss {train.get('final_loss'):.4f}, eval loss {train.get('eval_loss') or float('nan'):.4f}"
    create_markdown_artifact(report["markdown"], key=artifact_key(run, "summary"), description=headline)
    create_table_artifact(report["metrics"], key=artifact_key(run, "metrics"), description=f"logged metrics per step of {run}")
    image = base64.b64encode(report["png"]).decode()
    create_markdown_artifact(
        f"![loss curve](data:image/png;base64,{image})\n\nPNG in the store: `{report['run_uri']}/loss.png`",
        key=artifact_key(run, "loss-curve"), description=f"train and eval loss vs step, {run}",
    )
    create_link_artifact(records["adapter"].uri, link_text="adapter (PEFT, safetensors)", key=artifact_key(run, "adapter"),
                         description=f"the exported adapter of {run}: load with PeftModel.from_pretrained(base, this folder)")
    if "merged" in records:
        create_link_artifact(records["merged"].uri, link_text="merged model", key=artifact_key(run, "merged"),
                             description=f"base + adapter of {run} merged, checked against base+adapter logits")
    return StageRecord(stage="report", key=records["train"].key, uri=report["run_uri"], metrics={"run": run})
