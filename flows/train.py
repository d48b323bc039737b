"""The training flow: runs where the GPUs are (in-process as a subflow, or on the XPU work pool)."""

from prefect import flow

from loraflow.config import FinetuneConfig
from loraflow.storage import StageRecord
from tasks.common import stage_options
from tasks.train import train_adapter


@flow(name="loraflow-train")
def train_flow(config: FinetuneConfig, env: StageRecord, dataset: StageRecord, base: StageRecord, lora: StageRecord) -> StageRecord:
    task = train_adapter.with_options(**stage_options(config.storage), retries=config.train.retries, retry_delay_seconds=1)
    return task(config, env, dataset, base, lora)
