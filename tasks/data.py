from prefect import task

from loraflow import stages
from loraflow.config import FinetuneConfig
from loraflow.registry import DATASET
from loraflow.storage import StageRecord
from tasks.common import log_info


@task(name=DATASET.task, description=DATASET.summary,
      cache_key_fn=lambda _, p: DATASET.cache_key(stages.dataset_key(p["config"], p["sources"])))
def prepare_dataset(config: FinetuneConfig, sources: StageRecord) -> StageRecord:
    """Format with the template, tokenize, mask labels, split; parquet + stats.json in the store."""
    return stages.prepare_data(config, sources, log_info)
