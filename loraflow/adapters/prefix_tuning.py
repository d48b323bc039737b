"""Prefix tuning (lora.method: prefix-tuning): trained keys and values of virtual tokens in every layer.

Supports: SFT on the native backend; trained padded (no packing), not merged (nothing to merge), no new tokens;
generation without transformers' KV cache (the adapter is PEFT's cache). PEFT loads it for inference only: training
continues it by rebuilding it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field

from loraflow.adapters.base import VIRTUAL_TOKENS_CAPABILITIES, AdapterMethod, VirtualTokens


class PrefixTuningAdapter(VirtualTokens):
    """Prefix tuning: trained keys and values of virtual tokens in every layer."""

    model_config = ConfigDict(title="Prefix tuning")

    method: Literal["prefix-tuning"] = Field("prefix-tuning", title="Method",
                                             description="prefix-tuning: trained keys and values in every layer.")


def _peft_config(model, settings: PrefixTuningAdapter, tokenizer_dir: Path | None = None):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(num_virtual_tokens=settings.num_virtual_tokens, task_type="CAUSAL_LM")


METHOD = AdapterMethod(
    name="prefix-tuning", peft_type="PREFIX_TUNING", settings=PrefixTuningAdapter, peft_config=_peft_config,
    from_saved=lambda adapter_config: PrefixTuningAdapter(num_virtual_tokens=adapter_config["num_virtual_tokens"]),
    compare_columns=lambda adapter_config: {"lora.num_virtual_tokens": adapter_config.get("num_virtual_tokens")},
    # A prefix-tuning adapter is the key/value cache PEFT hands the model; transformers 5's generate builds its own cache
    # and ignores PEFT's (the answer would be the base model's), unless generation runs without a cache.
    generates_with_cache=False,
    **VIRTUAL_TOKENS_CAPABILITIES,
)
