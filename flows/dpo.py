"""Preference tuning (DPO): env → sources → dataset → base → lora → reference → train → adapter → merged.

The same stages as the SFT flow; the dataset stage makes tokenized preference pairs, and the reference
model's log-probs are a cached stage of their own, so training (and every retry or rerun that changes
only beta, the loss or the schedule) runs no reference forward pass and keeps one base copy in memory.
With train.pool set, the pool's job runs that stage before training, on the pool's device.
"""

from __future__ import annotations

from prefect import flow

from flows.common import announce_upload, finetune_run_name, inputs, outputs
from flows.train import run_training, trainer_started_early
from loraflow.config import DpoFinetuneConfig
from loraflow.errors import LoraflowError
from loraflow.stages import start_from_adapter
from loraflow.storage import StageRecord
from loraflow.registry import BASE, DATASET, ENV, LORA, REFERENCE, TRAIN
from tasks.common import prepare_flow_process, stage_options
from tasks.model import reference_logps

prepare_flow_process()


@flow(name="loraflow-dpo", flow_run_name=finetune_run_name,
      description="DPO preference tuning: env → dataset → base → lora → reference log-probs → train → adapter → merged, every stage cached.")
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
    if config.starts_from_an_adapter:
        start_from_adapter(config)  # (a wrong dpo.start_from fails now, not after the data and base stages)
    if upload_event:
        announce_upload(config, upload_event)
    with trainer_started_early(config, trains_here=not config.train.pool):  # its imports beside the stages before it
        config, records = inputs(config)  # env → sources → dataset (pairs) → base → lora (fresh, or dpo.start_from's)
        if config.precomputes_reference and not config.train.pool:  # (on a pool, the job computes it on its device)
            records[REFERENCE.name] = reference_logps.with_options(**stage_options(config.storage))(
                config, *(records[stage.name] for stage in (ENV, DATASET, BASE, LORA)))
        records[TRAIN.name] = run_training(config, records)  # here, or a job on train.pool
    return outputs(config, records, upload_event)  # adapter → merged → report
