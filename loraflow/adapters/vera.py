"""VeRA (lora.method: vera): one pair of frozen random low-rank projections shared by every target layer, and per
layer two trained scaling vectors (VeRA paper, Kopiczko et al. 2024): a LoRA-like update with far fewer trained
parameters (about r + out_features per layer instead of r x (in + out)).

Supports: SFT and DPO, the native backend on a full-precision or NF4 base (PEFT's VeRA layers wrap bitsandbytes'
Linear4bit through PEFT's quantization backend), merging into a full-precision base, packing, new tokens; targets
all-linear, attention-qv or a list of module names. The shared projections are saved with the adapter, so it loads
to the same model on any host (not regenerated from the seed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from loraflow.adapters.base import AdapterMethod, MethodSettings, module_list, non_empty
from loraflow.adapters.targets import target_modules
from loraflow.forms import choice_or_module_names


class VeraAdapter(MethodSettings):
    """VeRA: shared frozen random projections, trained scaling vectors per target layer (far fewer parameters than LoRA)."""

    model_config = ConfigDict(title="VeRA")

    method: Literal["vera"] = Field("vera", title="Method", description="vera: shared random low-rank projections with "
                                    "trained scaling vectors per layer (VeRA paper).")
    r: int = Field(256, title="Rank (r)", ge=1, description="Rank of the shared random projections (PEFT's default 256: "
                   "VeRA's ranks are higher than LoRA's, as only the scaling vectors train).")
    target: Literal["all-linear", "attention-qv"] | list[str] = Field(
        "all-linear", title="Target modules", json_schema_extra=choice_or_module_names,
        description="all-linear: every linear projection except the output head. attention-qv: the query and value "
        "projections (the VeRA paper's). Or an explicit list of module names.")
    dropout: float = Field(0.0, title="Dropout", ge=0, lt=1, description="Dropout on the VeRA input (0: none).")
    d_initial: float = Field(0.1, title="Initial scale (d)", gt=0, description="Initial value of the trained per-rank "
                             "scaling vector d (the paper's 0.1; the output scaling b starts at zero, so training starts from the base).")
    projection_seed: int = Field(0, title="Projection seed", ge=0, description="Seed of the shared random projections "
                                 "(PEFT's projection_prng_key).")

    _target_list = field_validator("target", mode="before")(lambda value: module_list(value, ("all-linear", "attention-qv")))
    _target_named = field_validator("target")(non_empty)

    def describe(self, targets: str) -> str:
        extras = [word for word, on in ((f"d initial {self.d_initial}", self.d_initial != 0.1), (f"dropout {self.dropout}", self.dropout)) if on]
        return f"VeRA r{self.r}" + (f" ({', '.join(extras)})" if extras else "") + f" on {targets}"


def _targets(model, settings: VeraAdapter) -> list[str]:
    return target_modules(model, settings.target)


def _peft_config(model, settings: VeraAdapter, tokenizer_dir: Path | None = None):
    from peft import VeraConfig

    return VeraConfig(r=settings.r, target_modules=_targets(model, settings), vera_dropout=settings.dropout,
                      d_initial=settings.d_initial, projection_prng_key=settings.projection_seed, save_projection=True,
                      bias="none", task_type="CAUSAL_LM")


def _from_saved(adapter_config: dict) -> VeraAdapter:
    return VeraAdapter(r=adapter_config["r"], dropout=adapter_config.get("vera_dropout") or 0.0,
                       d_initial=adapter_config.get("d_initial", 0.1), projection_seed=adapter_config.get("projection_prng_key", 0))


def _compare_columns(adapter_config: dict) -> dict:
    return {"lora.r": adapter_config.get("r"), "lora.dropout": adapter_config.get("vera_dropout"),
            "lora.d_initial": adapter_config.get("d_initial"), "lora.target": sorted(adapter_config.get("target_modules") or []) or None}


METHOD = AdapterMethod(
    name="vera", peft_type="VERA", settings=VeraAdapter, peft_config=_peft_config, targets=_targets,
    from_saved=_from_saved, compare_columns=_compare_columns,
)
