import re
import tempfile
from pathlib import Path

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from loraflow import launch, stages
from loraflow.config import FinetuneConfig
from loraflow.errors import LoraflowError
from loraflow.lease import build_once
from loraflow.storage import ArtifactStore, StageRecord
from loraflow.train import USER_ERROR_EXIT
from tasks.common import log_info


class TrainingProgress:
    """Streams the trainer's lines into the run log and keeps a progress artifact (`<run>-progress`) at the percentage of steps.

    The artifact is made when the line naming the run (RUN_LINE) passes, so the same class serves the
    train task and a fine-tune relaying a pool job's log.
    """

    STEP = re.compile(r"^\[(\d+)/(\d+)\]")
    RUN_LINE = "training run {run}: {uri}"
    RUN = re.compile(r"^training run ([a-z0-9-]+): ")

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.artifact_id = None
        self.percent = 0.0
        self.error = None  # the trainer's last "error: …" line (a LoraflowError's message)

    def on_line(self, line: str) -> None:
        log_info(self.prefix + line)
        if line.startswith("error: "):
            self.error = line.removeprefix("error: ")
        if self.artifact_id is None and (named := self.RUN.match(line)):
            run = named.group(1)
            self.artifact_id = create_progress_artifact(0.0, key=f"{run}-progress", description=f"training steps done, {run}")
        match = self.STEP.match(line)
        if match and self.artifact_id is not None and int(match.group(2)) > 0:
            percent = round(100 * int(match.group(1)) / int(match.group(2)), 1)
            if percent > self.percent:
                self.percent = percent
                update_progress_artifact(self.artifact_id, percent)


def _train_cache_key(_, p) -> str:
    return "train-" + stages.train_key(p["config"], p["dataset"], p["lora"], p["env"])


@task(name="train", cache_key_fn=_train_cache_key)
def train_adapter(config: FinetuneConfig, env: StageRecord, dataset: StageRecord, base: StageRecord, lora: StageRecord) -> StageRecord:
    """Write the run spec, launch `python -m loraflow.train` (local/torchrun/deepspeed/mpirun), stream its log."""
    store = ArtifactStore(config.storage)
    key, run, spec = stages.train_spec(config, env, dataset, base, lora)
    # One trainer per run folder, even when a retry races a rerun of the same content: the other waits and reuses.
    with build_once(store, f"train-{key[:16]}", lambda: store.is_committed(f"{run}/checkpoints/final"), log_info) as must_train:
        if must_train:
            return _launch_trainer(config, store, key, run, spec)
    log_info(f"train: reusing committed adapter {run}/checkpoints/final")
    return stages.trained_record(store, key, run, reused=True)


def _launch_trainer(config: FinetuneConfig, store: ArtifactStore, key: str, run: str, spec: dict) -> StageRecord:
    spec_uri = f"{run}/spec.json"
    store.write_json(spec_uri, spec)
    topology = launch.Topology.from_train(config.train)
    progress = TrainingProgress()
    progress.on_line(TrainingProgress.RUN_LINE.format(run=run.rsplit("/", 1)[-1], uri=run))
    with tempfile.TemporaryDirectory(prefix="loraflow-launch-") as scratch:
        command = launch.build_command(topology, spec_uri, hostfile=launch.write_hostfile(topology, Path(scratch)),
                                       trust_remote_code=config.model.trust_remote_code)
        log_info(f"launching: {' '.join(command.argv)}")
        if topology.launcher == "torchrun" and topology.nnodes > 1:
            trust = " --trust-remote-code" if config.model.trust_remote_code else ""
            log_info(f"on each other host N of {topology.hosts}: python -m loraflow.launch {spec_uri} --node-rank N{trust}")
        code = launch.run_streaming(command, progress.on_line, timeout=config.train.timeout_s or None)
    if code == USER_ERROR_EXIT and progress.error:
        raise LoraflowError(progress.error)  # a user error: not retried (tasks.common.retry_unless_user_error)
    if code != 0:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        raise RuntimeError(f"the training process {how} (its log is above); a retry resumes from the newest checkpoint in {run}/checkpoints")
    record = stages.trained_record(store, key, run, reused=False)
    if record is None:
        raise LoraflowError(f"the training process exited cleanly but committed no adapter at {run}/checkpoints/final")
    return record
