"""Supervised (Q)LoRA fine-tuning: env → sources → data → quantize → lora → train → export → merge.

Training runs in this flow run (a task) or, with `train.pool` set, on that Prefect work pool.

Each stage is a cached task returning a JSON StageRecord; a second run with the same inputs reuses
every finished stage (Prefect cache, or the committed output in the store with a cold database).
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.common import announce_upload, finetune_run_name
from flows.train import run_training
from loraflow.config import FinetuneConfig
from loraflow.stages import check_token_ids
from loraflow.storage import StageRecord
from tasks.common import hide_user_error_tracebacks, stage_options
from tasks.data import prepare_dataset
from tasks.env import check_env, inspect_sources
from tasks.export import export_adapter, merge_adapter
from tasks.model import inject_lora, quantize_base
from tasks.report import publish_report

hide_user_error_tracebacks()


@flow(name="loraflow-sft", flow_run_name=finetune_run_name,
      description="Supervised QLoRA/LoRA fine-tune: env → data → quantize → lora → train → export → merge, every stage cached.")
def sft(config: FinetuneConfig, dataset: str = "", upload_event: str = "") -> dict[str, StageRecord]:
    """Fine-tune a base model on an instruction dataset and publish the run's report.

    Args:
        config: The fine-tune: base model, data and template, LoRA adapter, training (and where it
            runs), merge, and the artifact store. Defaults follow the alpaca-lora / QLoRA recipes.
        dataset: A dataset file (local path or fsspec URL) to use instead of config.data.path; the
            upload trigger sets it to the file that just landed. Empty: config.data.path.
        upload_event: The id of the upload event that started this run (set by the upload trigger;
            leave it empty).
    """
    config = config.for_run(dataset)
    if upload_event:
        announce_upload(config, upload_event)
    cached = stage_options(config.storage)

    env = check_env(config)
    sources = inspect_sources(config)
    dataset = prepare_dataset.with_options(**cached)(config, sources)
    check_token_ids(dataset, sources)  # a tokenizer that does not fit the model stops here, before quantizing
    if dataset.metrics.get("train_rows", config.train.batch_size) < config.train.batch_size:
        get_run_logger().warning(f"only {dataset.metrics['train_rows']} training rows, fewer than one batch "
                                 f"(train.batch_size {config.train.batch_size}): each step sees them all")
    base = quantize_base.with_options(**cached)(config, env, sources)
    lora = inject_lora.with_options(**cached)(config, env, base)
    trained = run_training(config, env, dataset, base, lora)  # here, or a job on train.pool
    adapter = export_adapter(config, dataset, trained)
    records = {"env": env, "sources": sources, "dataset": dataset, "quantized": base, "lora": lora, "train": trained, "adapter": adapter}
    if config.merge.enabled:
        records["merged"] = merge_adapter(config, env, sources, dataset, adapter)

    publish_report(config, records, upload_event)

    logger = get_run_logger()
    for name in ("dataset", "quantized", "lora", "train", "adapter", "merged"):
        if name in records:
            logger.info(f"{name:>9}: {records[name].uri}")
    return records
