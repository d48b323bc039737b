from prefect import task

from loraflow import stages
from loraflow.config import FinetuneConfig
from loraflow.registry import ADAPTER, EVALUATION, MERGED
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


@task(name=EVALUATION.task, description=EVALUATION.summary)
def evaluate_run(config: FinetuneConfig, env: StageRecord, base: StageRecord, adapter: StageRecord) -> StageRecord:
    """Task metrics and the forgetting check, base model vs the trained adapter (reused when already in the store)."""
    return stages.evaluation(config, env, base, adapter, log_info)
