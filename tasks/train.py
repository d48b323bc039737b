import re

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from loraflow import stages
from loraflow.config import FinetuneConfig
from loraflow.registry import TRAIN, Records
from loraflow.storage import StageRecord
from tasks.common import log_info


class TrainingProgress:
    """Streams the trainer's lines into the run log and keeps a progress artifact (`<run>-progress`) at the percentage of steps.

    The artifact is made when the line naming the run (RUN_LINE) passes, so the same class serves the
    train task and a fine-tune relaying a pool job's log.
    """

    STEP = re.compile(r"^\[(\d+)/(\d+)\]")
    RUN_LINE = stages.TRAINING_RUN_LINE
    RUN = re.compile(r"^training run ([a-z0-9-]+): ")

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.artifact_id = None
        self.run = ""
        self.percent = 0.0

    def on_line(self, line: str) -> None:
        log_info(self.prefix + line)
        if self.artifact_id is None and (named := self.RUN.match(line)):
            self.run = named.group(1)
            self.artifact_id, self.percent = _progress_artifact(self.run)
        match = self.STEP.match(line)
        if match and self.artifact_id is not None and int(match.group(2)) > 0:
            step, total = int(match.group(1)), int(match.group(2))
            percent = round(100 * step / total, 1)
            if percent != self.percent:  # a resume may start below what an earlier attempt showed
                self.percent = percent
                # The run page's artifact card shows the description, not the value: the description says it.
                update_progress_artifact(self.artifact_id, percent, description=progress_description(self.run, step, total))


def progress_description(run: str, step: int | None = None, total: int | None = None) -> str:
    done = f"step {step} of {total} ({100 * step / total:.0f}%)" if total else "not started"
    return f"training {run}: {done}"


def _progress_artifact(run: str) -> tuple:
    """(id, percent) of this flow run's `<run>-progress` artifact: the one an earlier attempt made (a Retry keeps the
    flow run id), else a new one at 0. A new artifact on each attempt left a stale card per attempt on the run's page."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey, ArtifactFilterType
    from prefect.runtime import flow_run

    key = f"{run}-progress"
    if flow_run.id:
        with get_client(sync_client=True) as client:
            earlier = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]), key=ArtifactFilterKey(any_=[key]),
                type=ArtifactFilterType(any_=["progress"])))
        if earlier:
            newest = max(earlier, key=lambda artifact: artifact.created)
            return newest.id, float(newest.data or 0.0)
    return create_progress_artifact(0.0, key=key, description=progress_description(run)), 0.0


@task(name=TRAIN.task, description=TRAIN.summary,
      cache_key_fn=lambda _, p: TRAIN.cache_key(stages.train_key(p["config"], p["records"])))
def train_adapter(config: FinetuneConfig, records: Records) -> StageRecord:
    """Launch `python -m loraflow.train` (local/torchrun/deepspeed/mpirun) and stream its log and progress."""
    return stages.train(config, records, log_info, TrainingProgress().on_line)
