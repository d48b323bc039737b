from prefect import task

from loraflow import stages
from loraflow.config import FinetuneConfig
from loraflow.registry import ADAPTER, MERGED
from loraflow.storage import StageRecord
from tasks.common import log_info


@task(name=ADAPTER.task, description=ADAPTER.summary)
def export_adapter(config: FinetuneConfig, dataset: StageRecord, trained: StageRecord) -> StageRecord:
    """Adapter safetensors + config (pointing at the original base) + tokenizer + resolved config."""
    return stages.export(config, dataset, trained, log_info)


@task(name=MERGED.task, description=MERGED.summary)
def merge_adapter(config: FinetuneConfig, env: StageRecord, sources: StageRecord, dataset: StageRecord, adapter: StageRecord) -> StageRecord:
    """Merge into a full-precision base; fail unless logits match base+adapter within tolerance."""
    return stages.merge(config, env, sources, dataset, adapter, log_info)
