"""Prompt tuning (lora.method: prompt-tuning): trained input embeddings of virtual tokens put before every input.

Supports: SFT on the native backend; started from random embeddings or a text's; trained padded (no packing), not
merged (nothing to merge), no new tokens. PEFT loads it for inference only: training continues it by rebuilding it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field

from loraflow.adapters.base import VIRTUAL_TOKENS_CAPABILITIES, AdapterMethod, VirtualTokens


class PromptTuningAdapter(VirtualTokens):
    """Prompt tuning: trained input embeddings of virtual tokens put before every input."""

    model_config = ConfigDict(title="Prompt tuning")

    method: Literal["prompt-tuning"] = Field("prompt-tuning", title="Method",
                                             description="prompt-tuning: num_virtual_tokens trained input embeddings.")
    prompt_init_text: str = Field(
        "", title="Initial prompt text",
        description="Start the virtual tokens from this text's token embeddings (e.g. 'Answer the question helpfully:'); "
        "empty: random. The text is tokenized with the run's tokenizer and repeated to num_virtual_tokens.")

    def describe(self, targets: str) -> str:
        initial = f", started from the text {self.prompt_init_text!r}" if self.prompt_init_text else ""
        return super().describe(targets) + initial

    def as_counted(self) -> PromptTuningAdapter:
        return self.model_copy(update={"prompt_init_text": ""})  # (a prompt's initial text changes no count, and needs a tokenizer)


def _peft_config(model, settings: PromptTuningAdapter, tokenizer_dir: Path | None = None):
    from peft import PromptTuningConfig, PromptTuningInit

    from_text = dict(prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=settings.prompt_init_text,
                     tokenizer_name_or_path=str(tokenizer_dir)) if settings.prompt_init_text else {}
    return PromptTuningConfig(num_virtual_tokens=settings.num_virtual_tokens, task_type="CAUSAL_LM", **from_text)


METHOD = AdapterMethod(
    name="prompt-tuning", peft_type="PROMPT_TUNING", settings=PromptTuningAdapter, peft_config=_peft_config,
    from_saved=lambda adapter_config: PromptTuningAdapter(num_virtual_tokens=adapter_config["num_virtual_tokens"],
                                                          prompt_init_text=adapter_config.get("prompt_tuning_init_text") or ""),
    compare_columns=lambda adapter_config: {"lora.num_virtual_tokens": adapter_config.get("num_virtual_tokens"),
                                            "lora.prompt_init_text": adapter_config.get("prompt_tuning_init_text")},
    **VIRTUAL_TOKENS_CAPABILITIES,
)
