"""The `lora` section's type: one of the registered methods' settings, chosen by `method` (LoRA when absent).

Built from the registry (loraflow.adapters.settings_union): the config's union, its form (one tab per method, in the
registry's order) and its errors (a field of another method named as that method's) follow the registered methods.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Union

import yaml
from pydantic import BeforeValidator, Discriminator, Field, Tag

from loraflow.adapters.base import AdapterMethod, MethodSettings
from loraflow.forms import tabs_per_option


def method_of(value) -> str:
    # A config written by hand often leaves the method out: LoRA, as before the other methods existed.
    return value.get("method", "lora") if isinstance(value, dict) else getattr(value, "method", "lora")


def one_of_methods(offered: tuple[AdapterMethod, ...], every: tuple[AdapterMethod, ...], objective: str, refused: str = ""):
    """The `lora` section's type for `objective`: one of the `offered` methods' settings, each with its own fields.

    The UI form then shows one tab per method with only that method's fields. Its JSON schema is an anyOf, not the
    oneOf (with a discriminator) pydantic writes for a tagged union: Prefect's form renders a oneOf as raw JSON, and the
    server's check refuses a value without `method` that two options accept. Both Prefect forms (the UI's v1 and v2)
    show a value in the tab with the most field names in common with it, the first on a tie: so no method's fields may
    all be fields of a method before it (IA3's feedforward; prefix before prompt tuning), or the form shows its value
    in the other's tab (tests/test_adapter_methods.py checks the order). `every`: all registered methods, whose fields
    a mistaken setting is named after."""
    by_method = {entry.name: entry.settings_class(objective) for entry in offered}

    def owners_of(name: str, but: str) -> list[type[MethodSettings]]:
        # The methods whose field it is, as this objective defines them (DPO's LoRA defaults to r16), and the methods it
        # lacks too: their setting is named as theirs.
        return [entry.settings_class(objective) for entry in every if name in entry.settings.model_fields and entry.name != but]

    def fields_of_the_method(value):
        """A field of another method is a mistake worth saying (a DoRA run that is plain IA3) unless it holds that method's
        default: a config dumped from one method and switched to another (a sweep over lora.method) carries them."""
        if isinstance(value, str):
            raise ValueError(f"the lora section is a mapping of settings: for the method write lora: {{method: {value}}} "
                             f"(or --set lora.method={value})")
        if not isinstance(value, dict):
            return value
        method = method_of(value)
        chosen = by_method.get(method) if isinstance(method, str) else None
        if chosen is None:
            lowered = str(method).lower().replace("_", "-")
            close = difflib.get_close_matches(lowered, list(by_method), n=1, cutoff=0.5)
            hint = ("; QLoRA is lora with model.quantization nf4 (the default)" if lowered == "qlora"
                    else f"; did you mean {close[0]}?" if close else "")
            raise ValueError(f"method {method!r} is not one of {', '.join(by_method)}" + (f" ({refused})" if refused else "") + hint)
        kept, wrong = {}, []
        for name, given in value.items():
            owners = owners_of(name, method)
            if name in chosen.model_fields or not owners:
                kept[name] = given  # (an unknown name is left to extra="forbid")
            elif all(given != owner.model_fields[name].default for owner in owners):
                wrong.append((name, owners[0]))
        if wrong:
            raise ValueError(_not_this_methods_fields(wrong, method, "method" in value, every, offered=tuple(by_method), refused=refused))
        return kept

    choice = Union[tuple(Annotated[settings, Tag(method)] for method, settings in by_method.items())]  # noqa: UP007 (built at runtime)
    return Annotated[choice, Discriminator(method_of), BeforeValidator(fields_of_the_method), Field(json_schema_extra=tabs_per_option)]


def _not_this_methods_fields(wrong: list[tuple[str, type[MethodSettings]]], method: str, method_given: bool,
                             every: tuple[AdapterMethod, ...], offered: tuple[str, ...], refused: str) -> str:
    """What to do about fields (name, a method it belongs to) set for a method they do not apply to."""
    names = [name for name, _ in wrong]
    it = "it" if len(names) == 1 else "them"
    owners: dict[str, list[str]] = {}  # the methods a field belongs to -> those fields
    for name in names:
        owners.setdefault(" or ".join(entry.name for entry in every if name in entry.settings.model_fields), []).append(name)
    if not any(tag in offered for methods in owners for tag in methods.split(" or ")):
        return (f"{', '.join(names)} {'is a setting' if len(names) == 1 else 'are settings'} of {' and '.join(owners).replace(' or ', ' and ')}, not "
                f"offered here ({refused}): remove {it}")
    defaults = " ".join(f"--set lora.{name}={_yaml_scalar(owner.model_fields[name].default)}" for name, owner in wrong)
    assumed = "" if method_given else " (lora.method is not set: LoRA)"
    choose = next(iter(owners)) if len(owners) == 1 else ", ".join(f"{methods} for {', '.join(fields)}" for methods, fields in owners.items())
    return (f"{', '.join(names)} do{'es' if len(names) == 1 else ''} not apply to method {method}{assumed}: remove {it} "
            f"(or set the default{'' if len(names) == 1 else 's'}: {defaults}), or choose the method {choose}")


def _yaml_scalar(value) -> str:
    """A default as it is written after --set (false, '', 8): YAML, not Python."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()
