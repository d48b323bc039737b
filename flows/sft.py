"""Supervised (Q)LoRA fine-tuning: env → sources → dataset → base → lora → train → adapter → merged.

Training runs in this flow run (a task) or, with `train.pool` set, on that Prefect work pool.

Each stage is a cached task returning a JSON StageRecord; a second run with the same inputs reuses
every finished stage (Prefect cache, or the committed output in the store with a cold database).
The body is every objective's (flows.common.fine_tune); this flow gives the SFT objective its name and form.
"""

from __future__ import annotations

from prefect import flow

from flows.common import fine_tune, finetune_run_name
from loraflow.config import FinetuneConfig
from loraflow.objectives import Sft
from loraflow.storage import StageRecord
from tasks.common import prepare_flow_process

prepare_flow_process()


@flow(name=Sft.flow, flow_run_name=finetune_run_name,
      description="Supervised QLoRA/LoRA fine-tune: env → dataset → base → lora → train → adapter → merged, every stage cached.")
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
    return fine_tune(Sft, config, dataset, upload_event)
