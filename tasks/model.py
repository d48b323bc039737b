from prefect import task

from loraflow import stages
from loraflow.config import FinetuneConfig
from loraflow.registry import BASE, LORA, REFERENCE
from loraflow.storage import StageRecord
from tasks.common import log_info


@task(name=BASE.task, description=BASE.summary,
      cache_key_fn=lambda _, p: BASE.cache_key(stages.quantize_key(p["config"], p["env"], p["sources"])))
def quantize_base(config: FinetuneConfig, env: StageRecord, sources: StageRecord) -> StageRecord:
    """NF4-quantize the base once and keep it in the store for every later fine-tune of that base."""
    return stages.quantize_base(config, env, sources, log_info)


@task(name=LORA.task, description=LORA.summary, cache_key_fn=lambda _, p: stages.lora_cache_key(p["config"], p["base"]))
def initial_adapter(config: FinetuneConfig, env: StageRecord, sources: StageRecord, base: StageRecord) -> StageRecord:
    """A fresh LoRA init (targets resolved on the real model, trainable parameters counted), or dpo.start_from's adapter."""
    return stages.initial_adapter(config, env, sources, base, log_info)


@task(name=REFERENCE.task, description=REFERENCE.summary,
      cache_key_fn=lambda _, p: REFERENCE.cache_key(stages.reference_key(p["config"], p["dataset"], p["base"], p["lora"], p["env"])))
def reference_logps(config: FinetuneConfig, env: StageRecord, dataset: StageRecord, base: StageRecord, lora: StageRecord) -> StageRecord:
    """DPO: the frozen reference's log-probs of every chosen and rejected answer, once, for every run that shares them."""
    return stages.reference_logps(config, env, dataset, base, lora, log_info)
