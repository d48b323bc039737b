"""SFT then DPO in one flow run: sft → dpo (starting from the SFT adapter, the reference being base + that adapter).

Both stages share the store, so the DPO half reuses the quantized base the SFT half built (its quantize stage
comes back Cached). The DPO half gets the SFT adapter's URI as `dpo.start_from`, a plain string, never a
subflow's result object (see docs/architecture.md on task inputs the UI cannot render).
"""

from __future__ import annotations

from prefect import flow

from flows.common import finetune_run_name
from flows.dpo import dpo as dpo_flow
from flows.sft import sft as sft_flow
from loraflow import adapters
from loraflow.backends import backend
from loraflow.adapters import DpoLoraAdapter
from loraflow.config import FinetuneConfig
from loraflow.objectives import DpoFinetuneConfig
from loraflow.errors import LoraflowError
from loraflow.storage import StageRecord
from tasks.common import prepare_flow_process

prepare_flow_process()


@flow(name="loraflow-align", flow_run_name=finetune_run_name,
      description="SFT then DPO on its adapter, sharing the quantized base: instruction tuning, then preference tuning.")
def align(config: FinetuneConfig, preferences: DpoFinetuneConfig) -> dict[str, dict[str, StageRecord]]:
    """Supervised fine-tune, then preference-tune the result.

    Args:
        config: The SFT half (objective sft): base model, instruction data, LoRA adapter, training, store.
        preferences: The DPO half (objective dpo): preference data, the DPO section and its training. Its
            model and store are the SFT half's; its starting adapter is the SFT half's adapter.
    """
    if config.objective != "sft" or preferences.objective != "dpo":
        raise LoraflowError("align takes an SFT config (objective sft) and a DPO config (objective dpo), in that order")
    if preferences.objective not in backend(config.model.backend).objectives:  # (checked now, not after the SFT half has trained)
        raise LoraflowError(f"align's DPO half shares the SFT half's model section, and model.backend {config.model.backend} "
                            f"trains {' and '.join(name.upper() for name in backend(config.model.backend).objectives)} only: use model.backend: native")
    if preferences.objective not in adapters.method(config.lora.method).objectives:  # (checked now, not after the SFT half has trained)
        able = adapters.for_objective(preferences.objective)
        raise LoraflowError(f"align's DPO half continues the SFT half's adapter, and TRL's DPOTrainer trains {adapters.titles(able)} "
                            f"adapters, not {config.lora.method}: set the SFT half's lora.method to {adapters.choices(able)}")
    if preferences.lora != DpoLoraAdapter():
        raise LoraflowError("align's DPO half continues the SFT half's adapter with its settings, so the DPO config's lora "
                            "section does not apply: remove it (the SFT half's lora section chooses the adapter)")
    supervised = sft_flow(config)
    start = supervised["adapter"].uri
    preferences = preferences.model_copy(update={
        "storage": config.storage, "model": config.model,
        "dpo": preferences.dpo.model_copy(update={"start_from": start})})
    preferred = dpo_flow(preferences)
    return {"sft": supervised, "dpo": preferred}
