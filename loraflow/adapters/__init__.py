"""The adapter methods loraflow trains (a config's `lora.method`), one module each, and the registry the rest reads.

Registered, in the form's order:
- `lora` (loraflow/adapters/lora.py): low-rank updates, with DoRA and rsLoRA; SFT and DPO; native and ipex-llm.
- `ia3` (ia3.py): learned rescaling of keys, values and the feed-forward input; SFT and DPO.
- `vera` (vera.py): shared random projections, trained scaling vectors; SFT and DPO; trains on an NF4 base.
- `prefix-tuning` (prefix_tuning.py), `prompt-tuning` (prompt_tuning.py): virtual tokens; SFT only, not merged,
  trained padded.

Each module owns its settings model, its PEFT config, how it finds its targets on an architecture, its capabilities
(merge, pack, objectives, backends, new tokens), its description, and how a saved adapter of it reads back. From this
registry come: the config's `lora` union and its form order (`settings_union`), the run spec's method list, the
methods each objective accepts, `loraflow compare`'s columns, and every yes/no a command asks about a method.

Adding a method: a module here with its settings class and `METHOD = AdapterMethod(...)`, its line in `METHODS`, its
tests (tests/test_adapter_methods.py's METHODS, checked complete against this registry), and its docs.
"""

from __future__ import annotations

from loraflow.adapters import ia3, lora, prefix_tuning, prompt_tuning, vera
from loraflow.adapters.base import AdapterMethod, MethodSettings
from loraflow.adapters.section import method_of, one_of_methods
from loraflow.errors import LoraflowError

# The form's order: Prefect's forms show a value in the tab with the most field names in common with it, the first
# on a tie, so no method's fields may all be fields of a method before it (prefix before prompt tuning; checked by
# tests/test_adapter_methods.py).
METHODS: tuple[AdapterMethod, ...] = (lora.METHOD, ia3.METHOD, vera.METHOD, prefix_tuning.METHOD, prompt_tuning.METHOD)
BY_NAME: dict[str, AdapterMethod] = {method.name: method for method in METHODS}
BY_PEFT_TYPE: dict[str, AdapterMethod] = {method.peft_type: method for method in METHODS}
NAMES: tuple[str, ...] = tuple(BY_NAME)

# Re-exported: the settings models, as configs and tests import them.
LoraAdapter, DpoLoraAdapter = lora.LoraAdapter, lora.DpoLoraAdapter
Ia3Adapter = ia3.Ia3Adapter
VeraAdapter = vera.VeraAdapter
PromptTuningAdapter = prompt_tuning.PromptTuningAdapter
PrefixTuningAdapter = prefix_tuning.PrefixTuningAdapter

__all__ = ["AdapterMethod", "MethodSettings", "METHODS", "BY_NAME", "BY_PEFT_TYPE", "NAMES", "method", "of_section", "saved_method",
           "for_objective", "titles", "choices", "refusal", "settings_union", "describe_saved", "LoraAdapter", "DpoLoraAdapter",
           "Ia3Adapter", "VeraAdapter", "PromptTuningAdapter", "PrefixTuningAdapter"]


def method(name: str) -> AdapterMethod:
    """The registered method of lora.method `name` (a validated config's is always one)."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise LoraflowError(f"lora.method {name!r} is not one of {', '.join(NAMES)}") from None


def of_section(lora: dict) -> AdapterMethod:
    """The method of a stored config's lora section (LoRA when it names none, as a config written by hand may)."""
    return method(method_of(lora))


def saved_method(adapter_config: dict) -> AdapterMethod | None:
    """The method of a saved PEFT folder (its adapter_config.json), or None for a PEFT type loraflow does not train."""
    return BY_PEFT_TYPE.get(adapter_config.get("peft_type", ""))


def for_objective(objective: str) -> tuple[AdapterMethod, ...]:
    """The methods an objective trains, in the form's order."""
    return tuple(entry for entry in METHODS if objective in entry.objectives)


def titles(methods: tuple[AdapterMethod, ...]) -> str:
    """`LoRA, IA3 or VeRA`: methods as a sentence names them."""
    # (a title in a sentence: LoRA and IA3 as written, "prompt tuning" in lower case)
    names = [entry.title if entry.title[1:] != entry.title[1:].lower() else entry.title.lower() for entry in methods]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def choices(methods: tuple[AdapterMethod, ...]) -> str:
    """`lora, ia3 or vera`: methods as lora.method values in a sentence."""
    names = [entry.name for entry in methods]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def refusal(objective: str) -> str:
    """Why an objective offers fewer methods than the registry has (empty when it offers all), in the config error's words."""
    refused = [entry for entry in METHODS if objective not in entry.objectives]
    if not refused:
        return ""
    only = sorted({name.upper() for entry in refused for name in entry.objectives})
    trains = sorted({entry.trains for entry in refused})
    return (f"{' and '.join(entry.words for entry in refused)} {'is' if len(refused) == 1 else 'are'} {' and '.join(only)} only, "
            f"as {'it trains' if len(refused) == 1 else 'they train'} {' and '.join(trains)}: {objective.upper()} trains "
            f"{titles(for_objective(objective))} adapters")


def settings_union(objective: str):
    """The `lora` section's type in an `objective`'s config: one of the methods it trains, each with its own fields."""
    return one_of_methods(for_objective(objective), METHODS, objective, refusal(objective))


def describe_saved(adapter_config: dict) -> str:
    """A saved adapter in a few words, as the logs and the summary name a configured one (its settings' own describe)."""
    entry = saved_method(adapter_config)
    targets = ", ".join(sorted(adapter_config.get("target_modules") or []))
    if entry is None:
        return f"a {adapter_config.get('peft_type')} adapter" + (f" on {targets}" if targets else "")
    return entry.from_saved(adapter_config).describe(targets)
