"""IA3 (lora.method: ia3): learned rescaling of attention keys/values and of the feed-forward block's input.

Supports: SFT and DPO, the native backend, merging, packing, new tokens; targets all-linear (PEFT's modules for the
architecture) or a list of module names, with the feed-forward ones among them recognised or listed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from loraflow.adapters.base import AdapterMethod, MethodSettings, module_list, non_empty
from loraflow.adapters.targets import linear_module_names, target_modules
from loraflow.errors import LoraflowError
from loraflow.forms import choice_or_module_names

# IA3 rescales the keys and values of attention and the input of the feed-forward block's output projection (the IA3
# paper's choice). PEFT knows these per architecture; a list in lora.target picks them by hand, and unless
# lora.feedforward names them, the feed-forward ones among them are recognised by these names (the down projection of
# Llama/Mistral/Qwen, GPT-2's and Falcon's).
FEEDFORWARD_OUTPUT_NAMES = ("down_proj", "fc2", "c_proj", "w2", "dense_4h_to_h", "fc_out")


class Ia3Adapter(MethodSettings):
    """IA3: learned rescaling of attention keys/values and of the feed-forward block's input (far fewer parameters)."""

    model_config = ConfigDict(title="IA3")

    method: Literal["ia3"] = Field("ia3", title="Method", description="ia3: learned rescaling vectors (IA3 paper).")
    target: Literal["all-linear"] | list[str] = Field(
        "all-linear", title="Target modules", json_schema_extra=choice_or_module_names,
        description="all-linear: PEFT's modules for the architecture (attention keys and values, the feed-forward down "
        "projection). Or an explicit list of module names.")
    feedforward: Literal["auto"] | list[str] = Field(
        "auto", title="Feed-forward modules", json_schema_extra=choice_or_module_names,
        description="Which targets are feed-forward layers, whose input is rescaled (the others' output is). auto: PEFT's for "
        "the architecture, or among an explicit target list the down projections (down_proj, fc2, c_proj, w2, "
        "dense_4h_to_h, fc_out). Or a list, each one of the targets.")

    @field_validator("target", mode="before")
    @classmethod
    def _target_list(cls, value):
        if value in ("attention-qv", "auto"):
            raise ValueError(f"{value} is not a choice of IA3's target: use all-linear (PEFT's modules for the architecture: "
                             "attention keys and values, the feed-forward down projection) or list the modules")
        return module_list(value, ("all-linear",))

    _target_named = field_validator("target")(non_empty)
    _feedforward_list = field_validator("feedforward", mode="before")(lambda value: module_list(value, ("auto",)))
    _feedforward_named = field_validator("feedforward")(non_empty)

    @model_validator(mode="after")
    def _feedforward_among_targets(self) -> Ia3Adapter:
        if isinstance(self.feedforward, list) and isinstance(self.target, list) and set(self.feedforward) - set(self.target):
            outside = sorted(set(self.feedforward) - set(self.target))
            raise ValueError(f"feedforward names {', '.join(outside)}, which target does not: PEFT rescales feed-forward "
                             f"modules among the targets; add {'it' if len(outside) == 1 else 'them'} to target or remove "
                             f"{'it' if len(outside) == 1 else 'them'} from feedforward")
        return self

    def describe(self, targets: str) -> str:
        return f"IA3 on {targets}"


def ia3_modules(model, target, feedforward="auto") -> tuple[list[str], list[str]]:
    """IA3's target modules on this model and the feed-forward ones among them (PEFT's IA3Config fields)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS

    model_type = model.config.model_type
    if isinstance(target, list):
        targets = target_modules(model, target)
        automatic = [name for name in targets if name in FEEDFORWARD_OUTPUT_NAMES]
    elif target == "attention-qv" or model_type not in TARGETS:
        raise LoraflowError(f"IA3 on {model_type}: {'PEFT has no default modules for this architecture; ' if model_type not in TARGETS else ''}"
                            f"lora.target {target} does not apply to IA3: list the attention key/value modules and the "
                            f"feed-forward down projection (its input is rescaled) in lora.target (its linear layers: {', '.join(sorted(linear_module_names(model)))})")
    else:
        targets = list(TARGETS[model_type])
        automatic = [name for name in FEEDFORWARD[model_type] if name in targets]
    if feedforward == "auto":
        return targets, automatic
    outside = [name for name in feedforward if name not in targets]
    if outside:
        raise LoraflowError(f"lora.feedforward names {', '.join(outside)}, which IA3 does not target on {model_type} (its targets: "
                            f"{', '.join(targets)}): name feed-forward modules among them, or list them in lora.target too")
    return targets, list(feedforward)


def _peft_config(model, settings: Ia3Adapter, tokenizer_dir: Path | None = None):
    from peft import IA3Config

    targets, feedforward = ia3_modules(model, settings.target, settings.feedforward)
    return IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type="CAUSAL_LM")


def _compare_columns(adapter_config: dict) -> dict:
    return {"lora.target": sorted(adapter_config.get("target_modules") or []) or None,
            "lora.feedforward": sorted(adapter_config["feedforward_modules"]) if adapter_config.get("feedforward_modules") else None}


METHOD = AdapterMethod(
    name="ia3", peft_type="IA3", settings=Ia3Adapter, peft_config=_peft_config,
    targets=lambda model, settings: ia3_modules(model, settings.target, settings.feedforward)[0],
    from_saved=lambda adapter_config: Ia3Adapter(), compare_columns=_compare_columns,
)
