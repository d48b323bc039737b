"""What every adapter method is made of: its settings model's base, its registry entry (AdapterMethod), and the
field helpers its settings share. No torch, transformers or PEFT import at module level: config.py (and so every
command and form) reads the registry, and those imports cost seconds."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo


class MethodSettings(BaseModel):
    """A method's settings: the `lora` section of a config when lora.method names it."""

    # (as loraflow.config's sections: validate_default makes a default and the same value written in a file hash alike)
    model_config = ConfigDict(extra="forbid", validate_default=True)

    method: str  # (each method's own Literal; declared here so that it comes first in every method's form)

    def describe(self, targets: str) -> str:
        """The adapter in a few words, as the logs, the summary and `loraflow plan` name it."""
        raise NotImplementedError

    def as_counted(self) -> MethodSettings:
        """These settings as the memory plan builds them on a meta model (no weights, no tokenizer): by default the same."""
        return self


class VirtualTokens(MethodSettings):
    """What prompt and prefix tuning share: trained virtual tokens put before every input (PEFT's prompt learning)."""

    num_virtual_tokens: int = Field(20, title="Virtual tokens", ge=1, le=512, description="Trained virtual tokens put before "
                                    "every input (SFT only, trained without packing, not merged).")

    def describe(self, targets: str) -> str:
        return f"{self.method.replace('-', ' ')} with {self.num_virtual_tokens} virtual tokens"


# What a method that trains virtual tokens cannot do, as its registration says it (prompt and prefix tuning).
VIRTUAL_TOKENS_CAPABILITIES = dict(
    objectives=("sft",),  # TRL's DPOTrainer trains weights
    merges=False,  # virtual tokens, not weights: nothing to fold into the base
    packs=False,  # the virtual tokens would come before the first of a packed row's examples only
    trains_new_tokens=False,
    loads_trainable=False,  # PEFT: "cannot set a prompt learning adapter to trainable"
    trains="virtual tokens",
    unpacked_because="puts its virtual tokens before every row",
)


def same_field(section: type[BaseModel], name: str, default: Any) -> Any:
    """The parent's field (title, description, bounds) with another default: an objective's recipe's, which the form shows."""
    return FieldInfo.merge_field_infos(section.model_fields[name], default=default)


@dataclass(frozen=True)
class AdapterMethod:
    """One adapter method as the rest of loraflow asks about it. Each module of loraflow/adapters/ registers one.

    Capabilities are facts about what PEFT and the trainers do with the method; a command that needs one asks here
    (never compares a method's name)."""

    name: str  # lora.method
    peft_type: str  # adapter_config.json's peft_type (how a saved adapter says which method it is)
    settings: type[MethodSettings]
    # (model, settings, tokenizer folder) -> PEFT config, the targets resolved on the model
    peft_config: Callable[[Any, MethodSettings, Path | None], Any]
    # adapter_config.json -> the settings that built it (for describe: a saved adapter is named as a configured one)
    from_saved: Callable[[dict], MethodSettings]
    # adapter_config.json -> `loraflow compare`'s settings columns (lora.<field>: value)
    compare_columns: Callable[[dict], dict]
    # (model, settings) -> the modules the adapter changes; None: it targets no modules (virtual tokens)
    targets: Callable[[Any, MethodSettings], list[str]] | None = None
    # objective -> the settings class that objective offers (its recipe's defaults), where not `settings`
    settings_for: Mapping[str, type[MethodSettings]] = field(default_factory=dict)
    objectives: tuple[str, ...] = ("sft", "dpo")
    backends: tuple[str, ...] = ("native",)
    merges: bool = True  # folds into the base's weights (the merge stage, generate --merged)
    packs: bool = True  # trains on packed rows (several examples per row)
    trains_new_tokens: bool = True  # data.new_tokens: trains the grown embeddings with it (modules_to_save)
    loads_trainable: bool = True  # PeftModel.from_pretrained(is_trainable=True) continues it (prompt learning: no)
    generates_with_cache: bool = True  # generation may use transformers' KV cache (prefix tuning's is the adapter)
    trains: str = "weights"  # what it trains, in the refusals' words: weights or virtual tokens
    unpacked_because: str = ""  # why it trains padded, in the summary's words (packs False)

    @property
    def title(self) -> str:
        return self.settings.model_config["title"]

    @property
    def words(self) -> str:
        """The method's name in a sentence (prompt tuning, not prompt-tuning)."""
        return self.name.replace("-", " ")

    def settings_class(self, objective: str) -> type[MethodSettings]:
        return self.settings_for.get(objective, self.settings)


def module_list(value, keywords: tuple[str, ...]):
    # `--set lora.target=q_proj`: one module name, the same as a list of one; `q_proj,v_proj` (no module name has a
    # comma) the same as [q_proj, v_proj].
    return [name.strip() for name in value.split(",") if name.strip()] if isinstance(value, str) and value not in keywords else value


def non_empty(value):
    if isinstance(value, list) and not value:
        raise ValueError("an explicit list must name at least one module")
    choices = [name for name in value if name in ("all-linear", "attention-qv", "auto")] if isinstance(value, list) else []
    if choices:
        raise ValueError(f"{choices[0]} is a choice of its own, not a module name: give it alone, or list module names only")
    return value
