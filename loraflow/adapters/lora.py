"""LoRA (lora.method: lora): trained low-rank updates of the target layers, with DoRA and rsLoRA as switches.

Supports: SFT and DPO (DPO's recipe: r16/alpha16), the native and ipex-llm backends (ipex-llm: plain LoRA only, its
QLoRA layers), merging, packing, new tokens; targets all-linear, attention-qv or a list of module names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from loraflow.adapters.base import AdapterMethod, MethodSettings, module_list, non_empty, same_field
from loraflow.adapters.targets import target_modules
from loraflow.forms import choice_or_module_names


class LoraAdapter(MethodSettings):
    """LoRA: trained low-rank updates of the target layers (with DoRA and rsLoRA as switches)."""

    model_config = ConfigDict(title="LoRA")

    method: Literal["lora"] = Field("lora", title="Method", description="lora: low-rank updates of the target layers.")
    r: int = Field(8, title="Rank (r)", ge=1, description="LoRA rank.")
    alpha: int = Field(16, title="Alpha", ge=1, description="LoRA alpha (scaling = alpha / r).")
    # 0, not the alpaca-lora/QLoRA recipes' 0.05 (torchtune's LoRA recipes use 0 too): on a CPU, drawing the dropout
    # mask of every LoRA input took a quarter of each training step (bench/train.py), for a regularisation short
    # fine-tunes rarely need.
    dropout: float = Field(0.0, title="Dropout", ge=0, lt=1, description="Dropout on the LoRA input (0: none; 0.05 is the "
                           "QLoRA recipe's, which costs a quarter of a CPU training step).")
    target: Literal["all-linear", "attention-qv"] | list[str] = Field(
        "all-linear", title="Target modules", json_schema_extra=choice_or_module_names,
        description="all-linear: every linear projection except the output head (QLoRA paper, ipex-llm). attention-qv: the "
        "query and value projections (alpaca-lora, FastChat). Or an explicit list of module names.",
    )
    use_dora: bool = Field(False, title="DoRA", description="Weight-decomposed LoRA: a trained magnitude per output beside "
                           "the low-rank direction (DoRA paper); more accurate at low ranks, slower steps.")
    use_rslora: bool = Field(False, title="rsLoRA", description="Scale updates by alpha/sqrt(r) instead of alpha/r, so that "
                             "high ranks keep learning (rsLoRA paper).")
    init: Literal["default", "gaussian"] = Field(
        "default", title="Initialisation",
        description="default: A random (Kaiming), B zero, so training starts from the base itself. gaussian: A drawn from "
        "a Gaussian scaled by the rank. (PiSSA and OLoRA rewrite the base weights and need a full-precision base; PEFT's "
        "LoftQ for a 4-bit base runs on XPU or CUDA only: not offered yet.)")

    _target_list = field_validator("target", mode="before")(lambda value: module_list(value, ("all-linear", "attention-qv")))
    _target_named = field_validator("target")(non_empty)

    def describe(self, targets: str) -> str:
        """The adapter in a few words, as the logs and the summary name it: `DoRA r8/alpha16 on q_proj, v_proj`."""
        extras = [word for word, on in (("rsLoRA scaling", self.use_rslora), (f"{self.init} init", self.init != "default"),
                                        (f"dropout {self.dropout}", self.dropout)) if on]
        return f"{'DoRA' if self.use_dora else 'LoRA'} r{self.r}/alpha{self.alpha}" + (f" ({', '.join(extras)})" if extras else "") + f" on {targets}"


class DpoLoraAdapter(LoraAdapter):
    """LoRA (the DPO recipe's r16/alpha16 on every linear projection)."""

    model_config = ConfigDict(title="LoRA")

    r: int = same_field(LoraAdapter, "r", 16)
    alpha: int = same_field(LoraAdapter, "alpha", 16)


def _targets(model, settings: LoraAdapter) -> list[str]:
    return target_modules(model, settings.target)


def _peft_config(model, settings: LoraAdapter, tokenizer_dir: Path | None = None):
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=_targets(model, settings),
                      bias="none", task_type="CAUSAL_LM", use_dora=settings.use_dora, use_rslora=settings.use_rslora,
                      init_lora_weights=True if settings.init == "default" else settings.init)


def _from_saved(adapter_config: dict) -> LoraAdapter:
    return LoraAdapter(r=adapter_config["r"], alpha=adapter_config["lora_alpha"], dropout=adapter_config.get("lora_dropout") or 0.0,
                       use_dora=bool(adapter_config.get("use_dora")), use_rslora=bool(adapter_config.get("use_rslora")))


def _compare_columns(adapter_config: dict) -> dict:
    return {"lora.r": adapter_config.get("r"), "lora.alpha": adapter_config.get("lora_alpha"),
            "lora.dropout": adapter_config.get("lora_dropout"), "lora.use_dora": adapter_config.get("use_dora"),
            "lora.use_rslora": adapter_config.get("use_rslora"),
            "lora.target": sorted(adapter_config.get("target_modules") or []) or None}


METHOD = AdapterMethod(
    name="lora", peft_type="LORA", settings=LoraAdapter, settings_for={"dpo": DpoLoraAdapter},
    peft_config=_peft_config, targets=_targets, from_saved=_from_saved, compare_columns=_compare_columns,
    backends=("native", "ipex-llm"),
)
