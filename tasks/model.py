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


@task(name="ref-logps", cache_key_fn=lambda _, p: "ref-logps-" + stages.ref_logps_key(p["dataset"], p["base"], p["lora"], p["env"]))
def reference_logps(config: FinetuneConfig, env: StageRecord, dataset: StageRecord, base: StageRecord, lora: StageRecord) -> StageRecord:
    """DPO: the frozen reference's log-probs of every chosen and rejected answer, once, for every run that shares them."""
    return stages.reference_logps(config, env, dataset, base, lora, log_info)


@task(name="start-from")
def starting_adapter(config: FinetuneConfig, sources: StageRecord) -> StageRecord:
    """DPO from an SFT run: its exported adapter, checked and keyed by content, in place of a fresh LoRA init."""
    return stages.starting_adapter(config, sources, log_info)
