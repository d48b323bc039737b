"""Preference tuning (DPO): env → sources → dataset → base → lora → reference → train → adapter → merged.

The same stages as the SFT flow (flows.common.fine_tune, the body of every objective's flow); the dataset stage makes
tokenized preference pairs, and the reference model's log-probs are a cached stage of their own (the DPO objective's,
loraflow/objectives/dpo.py), so training (and every retry or rerun that changes only beta, the loss or the schedule)
runs no reference forward pass and keeps one base copy in memory. With train.pool set, the pool's job runs that stage
before training, on the pool's device.
"""

from __future__ import annotations

from prefect import flow

from flows.common import fine_tune, finetune_run_name
from loraflow.objectives import Dpo, DpoFinetuneConfig
from loraflow.storage import StageRecord
from tasks.common import prepare_flow_process

prepare_flow_process()


@flow(name=Dpo.flow, flow_run_name=finetune_run_name,
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
    return fine_tune(Dpo, config, dataset, upload_event)
