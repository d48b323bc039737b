import re

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from loraflow import stages
from loraflow.config import FinetuneConfig
from loraflow.registry import TRAIN
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
        self.percent = 0.0

    def on_line(self, line: str) -> None:
        log_info(self.prefix + line)
        if self.artifact_id is None and (named := self.RUN.match(line)):
            run = named.group(1)
            self.artifact_id = create_progress_artifact(0.0, key=f"{run}-progress", description=f"training steps done, {run}")
        match = self.STEP.match(line)
        if match and self.artifact_id is not None and int(match.group(2)) > 0:
            percent = round(100 * int(match.group(1)) / int(match.group(2)), 1)
            if percent > self.percent:
                self.percent = percent
                update_progress_artifact(self.artifact_id, percent)


@task(name=TRAIN.task, description=TRAIN.summary,
      cache_key_fn=lambda _, p: TRAIN.cache_key(stages.train_key(p["config"], p["dataset"], p["lora"], p["env"])))
def train_adapter(config: FinetuneConfig, env: StageRecord, dataset: StageRecord, base: StageRecord, lora: StageRecord,
                  reference: StageRecord | None = None) -> StageRecord:
    """Launch `python -m loraflow.train` (local/torchrun/deepspeed/mpirun) and stream its log and progress."""
    return stages.train(config, env, dataset, base, lora, reference, log_info, TrainingProgress().on_line)
