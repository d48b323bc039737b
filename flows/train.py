"""Training: in the fine-tune's own flow run (a task), or on the XPU work pool (a deployment's flow run).

With `train.pool` empty, the SFT flow runs the train task itself: its trainer log and progress
artifact are on the fine-tune's run. With a pool, it starts the `loraflow-train/train-<pool>`
deployment through `run_deployment`, with an idempotency key derived from the training's content, so
a retried (or repeated) fine-tune attaches to the job already running or finished instead of starting
a second one; while it waits it relays that job's log and progress into the fine-tune's run.
"""

from __future__ import annotations

import datetime
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as current_flow_run

from loraflow.backends import backend
from loraflow.config import FinetuneConfig
from loraflow.objectives import AnyFinetuneConfig
from loraflow.errors import LoraflowError
from loraflow.launch import Topology, deepspeed_config, start_warm_trainer, stop_warm_trainer
from loraflow.registry import DATASET, ENV, LORA, TRAIN, Records
from loraflow.stages import objective_stages, training_fields
from loraflow.storage import ArtifactStore, StageRecord, sha256_hex
from tasks.common import prepare_flow_process, retry_unless_user_error, stage_options
from tasks.env import check_env
from tasks.model import OBJECTIVE_STAGE_TASKS
from tasks.train import TrainingProgress, train_adapter

TRAIN_FLOW = "loraflow-train"
RECORDS = "train-records"  # <store>/train-records/<flow run id>.json: what a pool job trained
RELAY_OVERLAP_S = 30  # how far before the newest relayed line each read of a pool job's log starts again

prepare_flow_process()


# A parallel sweep runs its variants' fine-tunes in threads of one process. Importing the libraries and loading models
# there is not thread-safe (transformers' lazy imports, its meta-device initialisation), so each variant holds this
# lock for its work in this process and lets go of it only while its training runs elsewhere, as a pool's job.
_LOCAL_WORK = threading.Lock()
_holds_local_work = ContextVar("holds_local_work", default=False)  # (a context variable: Prefect copies it into its threads)


@contextmanager
def local_work_one_at_a_time():
    """Around a fine-tune that runs beside others in this process (loraflow.sweep with parallel > 1)."""
    with _LOCAL_WORK:
        token = _holds_local_work.set(True)
        try:
            yield
        finally:
            _holds_local_work.reset(token)


@contextmanager
def _local_work_allowed_meanwhile():
    """While this fine-tune only waits for its pool job: the other fine-tunes in this process may work."""
    if not _holds_local_work.get():
        yield
        return
    _LOCAL_WORK.release()
    try:
        yield
    finally:
        _LOCAL_WORK.acquire()


def train_task(config: FinetuneConfig):
    """The train task as every flow runs it: cached on its key, persisted in the store, retried (each retry resumes)."""
    return train_adapter.with_options(**stage_options(config.storage), retries=config.train.retries, retry_delay_seconds=1,
                                      retry_condition_fn=retry_unless_user_error)


@contextmanager
def trainer_started_early(config: FinetuneConfig, trains_here: bool):
    """A one-process trainer started now, so that its imports (about 4 s) run beside the stages before training; the
    train task hands it the run spec (loraflow.launch), and it is ended with the block if nothing did. Only where
    this process launches the trainer itself: the local launcher, no DeepSpeed."""
    train = config.train
    if (not trains_here or Topology.from_train(train).launcher != "local" or deepspeed_config(train.deepspeed_zero) is not None
            or not backend(config.model.backend).trains_in_this_python):  # (the ipex-llm backend's runs in its own Python)
        yield
        return
    process = start_warm_trainer(config.storage, config.model.trust_remote_code)
    try:
        yield
    finally:
        stop_warm_trainer(process)


@flow(name=TRAIN_FLOW, description="Train a LoRA/QLoRA adapter on this worker's host (started by a fine-tune whose train.pool names this pool).")
def train_flow(config: AnyFinetuneConfig, records: dict[str, StageRecord]) -> StageRecord:
    """Check this host (its device decides precision and backend), then train with retries that resume.

    Args:
        config: The fine-tune (any objective's config).
        records: The train stage's input records but env (loraflow.registry: TRAIN.inputs), by stage name; this
            host checks its own env.

    The stages the objective adds before training (DPO's precomputed reference: a forward over every pair) run here
    too, on the pool's device, not on the host that started the fine-tune; they are the same cached stages.
    """
    with trainer_started_early(config, trains_here=True):
        # (this host trains: the checks the fine-tune's host left to it, the trackers and memory, run here)
        env = check_env(config.model_copy(update={"train": config.train.model_copy(update={"pool": ""})}))
        records = {**records, ENV.name: env}
        TRAIN.inputs_from(records)  # (the job's parameters, validated on arrival: a missing or unknown record is named)
        run_objective_stages(config, records)
        record = train_task(config)(config, TRAIN.inputs_from(records))
    # A caller on another host cannot read this flow's result from the worker's disk; it reads this.
    store = ArtifactStore(config.storage)
    store.write_json(store.uri(RECORDS, f"{current_flow_run.id}.json"), record.model_dump(mode="json"))
    return record


def deployment_name(pool: str) -> str:
    return f"{TRAIN_FLOW}/train-{pool}"


def run_objective_stages(config: FinetuneConfig, records: Records) -> None:
    """The stages the config's objective adds before training (loraflow.objectives), each the cached task of its stage,
    into records; one already there (made by the fine-tune that started this pool job) is not run again."""
    for stage in objective_stages(config):
        if stage.name not in records:
            task = OBJECTIVE_STAGE_TASKS[stage.name].with_options(**stage_options(config.storage))
            records[stage.name] = task(config, stage.inputs_from(records))


def run_training(config: FinetuneConfig, records: Records) -> StageRecord:
    """The train stage on the fine-tune's records (TRAIN.inputs: env, dataset, base, lora and, for a precomputed DPO
    reference, reference): here, or as a job on train.pool."""
    if not config.train.pool:
        return train_task(config)(config, TRAIN.inputs_from(records))
    return _run_on_pool(config, TRAIN.inputs_from(records))


def _run_on_pool(config: FinetuneConfig, records: Records) -> StageRecord:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    logger = get_run_logger()
    store = ArtifactStore(config.storage)
    name = deployment_name(config.train.pool)
    # (env is the job's own: its host checks itself)
    parameters = {"config": config.model_dump(mode="json"),
                  "records": {name: record.model_dump(mode="json") for name, record in records.items() if name != ENV.name}}
    # Content, not the caller's run id: any fine-tune asking for this training joins the same job.
    job = sha256_hex(TRAIN_FLOW, config.storage, config.name, training_fields(config), records[DATASET.name].key,
                     records[LORA.name].key)[:24]
    for attempt in range(1000):
        run = run_deployment(name, parameters=parameters, idempotency_key=f"{job}-{attempt}", timeout=0)
        finished_without_adapter = run.state.is_final() and _read_record(store, run.id) is None
        if not finished_without_adapter:
            break
        # An earlier attempt's job ended (failed, cancelled, or its store was emptied): a new job
        # resumes from the newest committed checkpoint.
        logger.info(f"training job {run.name} ended {run.state.name} without an adapter; starting attempt {attempt + 1}")
    logger.info(f"training runs on work pool {config.train.pool!r} as flow run {run.name} ({run.id}); its log follows")
    relay = _LogRelay(run.id)
    try:
        with _local_work_allowed_meanwhile(), get_client(sync_client=True) as client:
            while not run.state.is_final():
                relay.poll(client)
                time.sleep(2)
                run = client.read_flow_run(run.id)
            # The job's last lines reach the server after its final state: wait (briefly) for its closing line. A job
            # that crashed (its process killed) may never send one: it is waited for only a few seconds.
            deadline = time.time() + (30 if run.state.is_completed() else 5)
            while not relay.poll(client) and time.time() < deadline:
                time.sleep(0.5)
    except BaseException:
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run.id, Cancelling(message="the fine-tune that started it stopped"), force=True)
        raise
    record = _read_record(store, run.id)
    if not run.state.is_completed() or record is None:
        # A user error: the job's own log (relayed above) has the details; a traceback from here would add nothing.
        why = (run.state.message or "see its log above").removeprefix("Flow run encountered an exception: ").removeprefix("LoraflowError: ")
        raise LoraflowError(f"the training job {run.name} on pool {config.train.pool!r} ended {run.state.name}: {why}\n"
                            "(its log is above, as [pool job] lines; once fixed, running the fine-tune again resumes from "
                            "its newest checkpoint)")
    return record


class _LogRelay:
    """Copies a pool job's log lines into this flow run's log, and its step lines into a progress artifact here.

    So the fine-tune's own run page shows its training, wherever the training ran.
    """

    def __init__(self, flow_run_id):
        self.flow_run_id = flow_run_id
        self.seen: set = set()
        self.since = None
        self.finished = False
        self.progress = TrainingProgress(prefix="[pool job] ")

    def poll(self, client) -> bool:
        """Relay the lines logged since the last poll; True once the job's closing line ("Finished in state …") has passed."""
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTimestamp
        from prefect.client.schemas.sorting import LogSort

        # Lines reach the server in batches, each stamped when it was logged: one may arrive after a later one was
        # read. So each poll reads again from a while before the newest line seen (the ids already relayed are
        # skipped), page by page.
        after = self.since - datetime.timedelta(seconds=RELAY_OVERLAP_S) if self.since else None
        offset = 0
        while True:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[self.flow_run_id]),
                                     timestamp=LogFilterTimestamp(after_=after) if after else None),
                sort=LogSort.TIMESTAMP_ASC, limit=200, offset=offset)
            for log in logs:
                if log.id not in self.seen:
                    self.seen.add(log.id)
                    self.progress.on_line(log.message)
                    self.finished |= log.task_run_id is None and log.message.startswith("Finished in state")
                    self.since = max(self.since or log.timestamp, log.timestamp)
            if len(logs) < 200:
                return self.finished
            offset += len(logs)


def _read_record(store: ArtifactStore, flow_run_id) -> StageRecord | None:
    try:
        return StageRecord.model_validate(store.read_json(store.uri(RECORDS, f"{flow_run_id}.json")))
    except FileNotFoundError:
        return None
