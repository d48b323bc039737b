"""Preference tuning (DPO): env → sources → pairs → quantize → lora → ref-logps → train → export → merge.

The same stages as the SFT flow; the data stage makes tokenized preference pairs, and the reference
model's log-probs are a cached stage of their own, so training (and every retry or rerun that changes
only beta, the loss or the schedule) runs no reference forward pass and keeps one base copy in memory.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.common import announce_upload, finetune_run_name
from flows.train import run_training
from loraflow.config import FinetuneConfig
from loraflow.errors import LoraflowError
from loraflow.stages import check_token_ids
from loraflow.storage import StageRecord
from tasks.common import hide_user_error_tracebacks, stage_options
from tasks.data import prepare_dataset
from tasks.env import check_env, inspect_sources
from tasks.export import export_adapter, merge_adapter
from tasks.model import inject_lora, quantize_base, reference_logps, starting_adapter
from tasks.report import publish_report

hide_user_error_tracebacks()


@flow(name="loraflow-dpo", flow_run_name=finetune_run_name,
      description="DPO preference tuning: env → pairs → quantize → lora → reference log-probs → train → export → merge, every stage cached.")
def dpo(config: FinetuneConfig, dataset: str = "", upload_event: str = "") -> dict[str, StageRecord]:
    """Tune a base model on chosen/rejected pairs with DPO and publish the run's report.

    Args:
        config: The fine-tune with `objective: dpo`: base model, preference data, LoRA adapter, the DPO section
            (beta, loss, lengths, reference), training and the artifact store. Defaults follow the DPO recipe.
        dataset: A preference file (local path or fsspec URL) to use instead of config.data.path; the upload
            trigger sets it to the file that just landed. Empty: config.data.path.
        upload_event: The id of the upload event that started this run (set by the upload trigger; leave it empty).
    """
    if config.objective != "dpo":
        raise LoraflowError("the loraflow-dpo flow trains objective dpo; set objective: dpo in the config (or run loraflow-sft)")
    config = config.for_run(dataset)
    if upload_event:
        announce_upload(config, upload_event)
    cached = stage_options(config.storage)

    env = check_env(config)
    sources = inspect_sources(config)
    pairs = prepare_dataset.with_options(**cached)(config, sources)
    check_token_ids(pairs, sources)  # a tokenizer that does not fit the model stops here, before quantizing
    base = quantize_base.with_options(**cached)(config, env, sources)
    lora = starting_adapter(config, sources) if config.dpo.start_from else inject_lora.with_options(**cached)(config, env, base)
    reference = reference_logps.with_options(**cached)(config, env, pairs, base, lora) if config.dpo.reference == "precomputed" else None
    trained = run_training(config, env, pairs, base, lora, reference)  # here, or a job on train.pool
    adapter = export_adapter(config, pairs, trained)
    records = {"env": env, "sources": sources, "dataset": pairs, "quantized": base, "lora": lora,
               **({"ref_logps": reference} if reference is not None else {}), "train": trained, "adapter": adapter}
    if config.merge.enabled:
        records["merged"] = merge_adapter(config, env, sources, pairs, adapter)

    publish_report(config, records, upload_event)

    logger = get_run_logger()
    for name in ("dataset", "quantized", "lora", "ref_logps", "train", "adapter", "merged"):
        if name in records:
            logger.info(f"{name:>9}: {records[name].uri}")
    return records
