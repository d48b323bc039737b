from prefect import task

from loraflow import stages
from loraflow.config import FinetuneConfig
from loraflow.storage import StageRecord
from tasks.common import log_info


@task(name="quantize-base", cache_key_fn=lambda _, p: "quantized-" + stages.quantize_key(p["config"], p["env"], p["sources"]))
def quantize_base(config: FinetuneConfig, env: StageRecord, sources: StageRecord) -> StageRecord:
    """NF4-quantize the base once and keep it in the store for every later fine-tune of that base."""
    return stages.quantize_base(config, env, sources, log_info)


@task(name="inject-lora", cache_key_fn=lambda _, p: "lora-init-" + stages.lora_key(p["config"], p["base"]))
def inject_lora(config: FinetuneConfig, env: StageRecord, base: StageRecord) -> StageRecord:
    """Resolve LoRA targets on the real model, count trainable parameters, save the initial adapter."""
    return stages.inject_lora(config, env, base, log_info)
