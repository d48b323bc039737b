from prefect import task

from loraflow import stages
from loraflow.config import FinetuneConfig
from loraflow.storage import StageRecord


@task(name="env-check")
def check_env(config: FinetuneConfig) -> StageRecord:
    """Device, memory, library versions, distributed backend; fails early on what the machine lacks."""
    return stages.env_check(config)


@task(name="inspect-sources")
def inspect_sources(config: FinetuneConfig) -> StageRecord:
    """Content hashes of the dataset file, the base model's weights and its tokenizer."""
    return stages.inspect_sources(config)
