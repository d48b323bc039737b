from prefect import task

from loraflow import stages
from loraflow.config import FinetuneConfig
from loraflow.registry import BASE, BY_NAME, LORA, REFERENCE, Records, Stage
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


def _objective_stage_task(stage: Stage):
    """The task of a stage an objective adds before training: the stage logic and key that loraflow.stages registers
    for it (OBJECTIVE_STAGES), named and described by the registry, cached on its key."""
    build, key = stages.OBJECTIVE_STAGES[stage.name]

    def run(config: FinetuneConfig, records: Records) -> StageRecord:
        return build(config, stage.inputs_from(records), log_info)

    run.__name__ = run.__qualname__ = f"{stage.name}_stage"  # (Prefect's task key: one per stage)
    run.__doc__ = stage.summary
    return task(name=stage.task, description=stage.summary,
                cache_key_fn=lambda _, p: stage.cache_key(key(p["config"], p["records"])))(run)


# The objectives' own stages' tasks, by stage name (the flows run them: flows.train.run_objective_stages).
OBJECTIVE_STAGE_TASKS = {name: _objective_stage_task(BY_NAME[name]) for name in stages.OBJECTIVE_STAGES}
reference_logps = OBJECTIVE_STAGE_TASKS[REFERENCE.name]  # DPO: the frozen reference's log-probs of the pairs, once
