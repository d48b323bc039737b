from prefect import task

from loraflow import stages
from loraflow.config import FinetuneConfig
from loraflow.registry import ENV, SOURCES
from loraflow.storage import StageRecord


@task(name=ENV.task, description=ENV.summary)
def check_env(config: FinetuneConfig) -> StageRecord:
    """Device, memory, library versions, distributed backend; fails early on what the machine lacks."""
    from prefect import get_run_logger

    record = stages.env_check(config)
    said = record.metrics.get("memory", "")
    if said.startswith("warning: "):
        get_run_logger().warning(said.removeprefix("warning: "))
    elif said:
        get_run_logger().info(f"memory: {said}")
    return record


@task(name=SOURCES.task, description=SOURCES.summary)
def inspect_sources(config: FinetuneConfig) -> StageRecord:
    """Content hashes of the dataset file, the base model's weights and its tokenizer."""
    return stages.inspect_sources(config)
