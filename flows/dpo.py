"""Preference tuning (DPO): env → sources → pairs → quantize → lora → ref-logps → train → export → merge.

The same stages as the SFT flow; the data stage makes tokenized preference pairs, and the reference
model's log-probs are a cached stage of their own, so training (and every retry or rerun that changes
only beta, the loss or the schedule) runs no reference forward pass and keeps one base copy in memory.
With train.pool set, the pool's job runs that stage before training, on the pool's device.
"""

from __future__ import annotations

from prefect import flow

from flows.common import announce_upload, finetune_run_name, inputs, outputs
from flows.train import run_training
from loraflow.config import DpoFinetuneConfig
from loraflow.errors import LoraflowError
from loraflow.storage import StageRecord
from tasks.common import hide_user_error_tracebacks, stage_options
from tasks.model import inject_lora, reference_logps, starting_adapter

hide_user_error_tracebacks()


@flow(name="loraflow-dpo", flow_run_name=finetune_run_name,
      description="DPO preference tuning: env → pairs → quantize → lora → reference log-probs → train → export → merge, every stage cached.")
def dpo(config: DpoFinetuneConfig, dataset: str = "", upload_event: str = "") -> dict[str, StageRecord]:
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

    records = inputs(config)  # env → sources → pairs → quantize
    env, pairs, base = records["env"], records["dataset"], records["quantized"]
    lora = records["lora"] = (starting_adapter(config, records["sources"]) if config.dpo.start_from
                              else inject_lora.with_options(**cached)(config, env, base))
    reference = None
    if config.dpo.reference == "precomputed" and not config.train.pool:  # (on a pool, the job computes it on its device)
        reference = records["ref_logps"] = reference_logps.with_options(**cached)(config, env, pairs, base, lora)
    records["train"] = run_training(config, env, pairs, base, lora, reference)  # here, or a job on train.pool
    return outputs(config, records, upload_event)  # export → merge → report
