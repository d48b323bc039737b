"""What the fine-tune flows (one per objective: SFT, DPO) share: the fine-tune itself (`fine_tune`, each objective's
flow is one call of it), how a run is named and tells the upload that started it, the stages before training (env →
sources → dataset → base → lora, then the objective's own, e.g. DPO's reference) and after training (export → merge
→ evaluation → report)."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from flows.train import run_objective_stages, run_training, trainer_started_early
from loraflow import adapters
from loraflow.config import FinetuneConfig
from loraflow.errors import LoraflowError
from loraflow.objectives import OBJECTIVES, Objective
from loraflow.paths import FLOW_HINT, check_local_inputs
from loraflow.plan import planned_steps, short_run_note
from loraflow.registry import ADAPTER, BASE, DATASET, ENV, EVALUATION, LORA, MERGED, SOURCES, TRAIN, Records
from loraflow.stages import check_token_ids, start_from_adapter, with_data_shape
from loraflow.storage import StageRecord
from loraflow.watch import RESOURCE_PREFIX
from tasks.common import event_url, stage_options
from tasks.data import prepare_dataset
from tasks.env import check_env, inspect_sources
from tasks.export import evaluate_run, export_adapter, merge_adapter
from tasks.model import initial_adapter, quantize_base
from tasks.report import publish_report

FINETUNE_STARTED = "loraflow.finetune.started"


def parameter_field(value, name: str):
    return value.get(name) if isinstance(value, dict) else getattr(value, name, None)


def finetune_run_name() -> str:
    """`<config name>-<dataset file stem>-<4 hex>`: a run started by an upload is named after its file.

    The hex is the flow run id's first four: Prefect names the run again on each Retry (same flow run id), and the name
    must stay the one `loraflow runs` and `loraflow artifacts NAME` showed before it."""
    from prefect.runtime import flow_run

    parameters = flow_run.parameters
    config = parameters.get("config")
    dataset = parameters.get("dataset") or parameter_field(parameter_field(config, "data"), "path") or "data"
    stem = PurePosixPath(str(dataset).rstrip("/")).name.split(".")[0]
    slug = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")[:40] or "data"
    return f"{parameter_field(config, 'name') or 'loraflow'}-{slug}-{str(flow_run.id).replace('-', '')[:4]}"


def announce_upload(config: FinetuneConfig, upload_event: str) -> None:
    """Point the run and the upload at each other: the run's log names the event, and an event on the
    dataset's resource names this run (so the dataset's event feed leads to the fine-tune it started)."""
    from datetime import datetime, timezone

    from prefect import get_run_logger
    from prefect.events import emit_event
    from prefect.runtime import flow_run

    resource = RESOURCE_PREFIX + config.data.path
    url = event_url(upload_event, datetime.now(timezone.utc))
    get_run_logger().info(f"started by upload event {upload_event} for {config.data.path}" + (f" ({url})" if url else ""))
    emit_event(
        event=FINETUNE_STARTED,
        resource={"prefect.resource.id": resource, "prefect.resource.name": config.data.path.rsplit("/", 1)[-1]},
        related=[
            {"prefect.resource.id": f"prefect.flow-run.{flow_run.id}", "prefect.resource.role": "flow-run",
             "prefect.resource.name": flow_run.name},
            {"prefect.resource.id": f"prefect.event.{upload_event}", "prefect.resource.role": "triggering-event"},
        ],
        payload={"flow_run_id": str(flow_run.id), "flow_run_name": flow_run.name, "upload_event": upload_event},
    )


def finetune_flow(objective: str):
    """The Prefect flow of a registered objective (its `entrypoint`, a module of flows/ that imports this one)."""
    import importlib

    module, _, name = OBJECTIVES[objective].entrypoint.partition(":")
    return getattr(importlib.import_module(module), name)


def fine_tune(objective: type[Objective], config: FinetuneConfig, dataset: str, upload_event: str) -> Records:
    """An objective's fine-tune flow: the stages before training, the objective's own stages (here, or in the pool's
    job when training runs on train.pool), training (here, or a job on train.pool), then export → merge → evaluation →
    report. The records of every stage, by stage name."""
    if config.objective != objective.name:
        other = OBJECTIVES.get(config.objective)
        raise LoraflowError(f"the {objective.flow} flow trains objective {objective.name}, not {config.objective}: set "
                            f"objective: {objective.name} in the config" + (f", or run {other.flow}" if other else ""))
    config = config.for_run(dataset)
    if config.starts_from_an_adapter:
        start_from_adapter(config)  # (a wrong starting adapter fails now, not after the data and base stages)
    if upload_event:
        announce_upload(config, upload_event)
    with trainer_started_early(config, trains_here=not config.train.pool):  # its imports beside the stages before it
        config, records = inputs(config)  # env → sources → dataset → base → lora (fresh, or dpo.start_from's)
        if not config.train.pool:  # (on a pool, the job runs them on its device)
            run_objective_stages(config, records)  # DPO with a precomputed reference: reference
        records[TRAIN.name] = run_training(config, records)  # here, or a job on train.pool
    return outputs(config, records, upload_event)  # adapter → merged → evaluation → report


def inputs(config: FinetuneConfig) -> tuple[FinetuneConfig, dict[str, StageRecord]]:
    """env → sources → dataset → base → lora: the records every objective trains from (dataset, base and lora cached),
    and the config as the sources stage read the data (data.format and data.template resolved from the file's shape:
    the one every later stage, key and report uses)."""
    from prefect import get_run_logger

    check_local_inputs(config, FLOW_HINT)  # a missing model or data file stops here, before the store or a block is created
    env = check_env(config)
    sources = inspect_sources(config)
    config = with_data_shape(config, sources)
    get_run_logger().info(f"data: {config.data.path} read as {config.data.format} rows, template {config.data.template}")
    cached = stage_options(config.storage)
    dataset = prepare_dataset.with_options(**cached)(config, sources)
    check_token_ids(dataset, sources)  # a tokenizer that does not fit the model stops here, before quantizing
    train_rows = dataset.metrics.get("train_rows", config.train.batch_size)
    if val_note := dataset.metrics.get("val_note"):
        get_run_logger().info(val_note)
    if train_rows < config.train.batch_size:
        get_run_logger().warning(f"only {train_rows} training rows, fewer than one batch "
                                 f"(train.batch_size {config.train.batch_size}): each step sees them all")
    if too_short := short_run_note(planned_steps(train_rows, config.train), train_rows, config.train):
        get_run_logger().warning(too_short)
    base = quantize_base.with_options(**cached)(config, env, sources)
    lora = initial_adapter.with_options(**cached)(config, env, sources, base)  # fresh, or dpo.start_from's
    return config, {ENV.name: env, SOURCES.name: sources, DATASET.name: dataset, BASE.name: base, LORA.name: lora}


def outputs(config: FinetuneConfig, records: dict[str, StageRecord], upload_event: str) -> dict[str, StageRecord]:
    """export → merge → evaluation → report, after training; logs where each output is."""
    from prefect import get_run_logger

    records[ADAPTER.name] = export_adapter(config, records[DATASET.name], records[TRAIN.name])
    failures = []  # a merge or evaluation that fails still leaves the trained adapter reported, then fails the run
    for stage, wanted, task, inputs in (
            (MERGED, config.merge.enabled and adapters.method(config.lora.method).merges, merge_adapter, (ENV, SOURCES, DATASET, ADAPTER)),
            (EVALUATION, config.evaluation.enabled, evaluate_run, (ENV, BASE, ADAPTER))):
        if wanted:
            state = task(config, *(records[name.name] for name in inputs), return_state=True)
            if state.is_completed():
                records[stage.name] = state.result()
            else:
                failures.append(state)
    publish_report(config, records, upload_event)
    for state in failures:
        state.result()  # raises the stage's error
    logger = get_run_logger()
    for name, record in records.items():
        if name not in (ENV.name, SOURCES.name) and record.uri:
            logger.info(f"{name:>9}: {record.uri}")
    return records
