"""A config as a command or a flow builds it: a YAML file, `--set key=value` overrides, and the error a user reads.

loraflow.config is the schema alone (the pydantic models, which Prefect also renders as forms); this module turns
a user's text into a validated config: YAML parsed safely, overrides applied by dotted key, relative paths resolved
as typed (loraflow.paths), and pydantic's errors rewritten as one message per field with a hint for names other
tools use (PEFT, LLaMA-Factory, axolotl) or a close spelling.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from loraflow import paths
from loraflow.config import ADAPTER_METHODS, FinetuneConfig
from loraflow.errors import LoraflowError
from loraflow.objectives import AnyFinetuneConfig, config_class


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise LoraflowError(f"--set {dotted}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`key.sub=value` strings to (key, YAML-parsed value) pairs."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise LoraflowError(f"--set {item!r}: expected key=value, e.g. --set train.learning_rate=1e-4")
        key, raw = item.split("=", 1)
        try:
            parsed.append((key.strip(), yaml.safe_load(raw) if raw else ""))
        except yaml.YAMLError as error:
            problem = str(getattr(error, "problem", None) or error).strip()
            raise LoraflowError(f"--set {item!r}: the value is not valid YAML ({problem}); e.g. --set lora.target=[q_proj,v_proj], "
                                "and quote values with special characters") from None
    return parsed


# Names other fine-tuning tools (PEFT, LLaMA-Factory, axolotl) give these settings, mapped to loraflow's.
OTHER_TOOLS_NAMES = {"lora_r": "r", "rank": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
                     "target_modules": "target", "lora_target": "target", "lora_target_modules": "target",
                     "feedforward_modules": "feedforward", "lr": "learning_rate", "epochs": "num_epochs",
                     "num_train_epochs": "num_epochs", "per_device_train_batch_size": "micro_batch_size",
                     "gradient_accumulation_steps": "batch_size", "sequence_len": "cutoff_len", "max_seq_length": "cutoff_len",
                     "base_model": "base", "model_name_or_path": "base", "datasets": "path", "dataset": "path"}


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models a field's type can hold (a section; each method's settings in the adapter union)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for argument in typing.get_args(annotation) for model in _models_in(argument)]


def known_names(section: list) -> set[str]:
    """The field names a config section has, in any objective's config (the adapter section: any method's)."""
    models: list[type[BaseModel]] = _models_in(AnyFinetuneConfig)
    for part in section:
        models = [model for parent in models if str(part) in parent.model_fields
                  for model in _models_in(parent.model_fields[str(part)].annotation)]
    return {name for model in models for name in model.model_fields}


def did_you_mean(loc: list) -> str:
    """For a name the section does not have: the name loraflow gives it, or a close one (difflib: spelling slips)."""
    known = known_names(loc[:-1])
    name, prefix = str(loc[-1]), ".".join(str(part) for part in loc[:-1])
    suggestion = OTHER_TOOLS_NAMES.get(name) if OTHER_TOOLS_NAMES.get(name) in known else None
    suggestion = suggestion or next(iter(difflib.get_close_matches(name, sorted(known), n=1)), None)
    return f"; did you mean {prefix + '.' if prefix else ''}{suggestion}?" if suggestion else ""


def format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for problem in error.errors():
        # (the lora section's loc names the method's tag too: lora.ia3.target is lora.target in the config)
        loc = [part for index, part in enumerate(problem["loc"]) if not (index and problem["loc"][index - 1] == "lora" and part in ADAPTER_METHODS)]
        where = ".".join(str(p) for p in loc)
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden" and loc:
            message += did_you_mean(loc)
        given = problem.get("input")
        shown = "" if isinstance(given, dict) or given is None else f" (got {given!r})"
        # (a check across sections names its fields in the message)
        lines.append(f"  {where}: {message}{shown}" if where else f"  {message}{shown}")
    return "\n".join(lines)


def build_config(tree: dict, overrides: list[str] = (), source: str = "config",
                 parsed_overrides: list[tuple[str, Any]] = ()) -> FinetuneConfig:
    """A validated config of its objective's class (config_class), with that objective's defaults where it is silent."""
    tree = dict(tree)
    for key, value in [*parse_overrides(list(overrides)), *parsed_overrides]:
        set_dotted(tree, key, value)
    try:
        return config_class(tree).model_validate(tree)
    except ValidationError as error:
        raise LoraflowError(format_validation_error(error, source)) from None


def load_config(path: str | Path, overrides: list[str] = ()) -> FinetuneConfig:
    """Read a YAML config, apply `--set` overrides, validate. A relative path in the YAML resolves against the YAML's
    folder, one in an override against where the command runs (loraflow.paths)."""
    path = Path(path)
    if not path.is_file():
        raise LoraflowError(f"{path}: config file not found")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise LoraflowError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(tree, dict):
        raise LoraflowError(f"{path}: expected a mapping of sections (model, data, lora, train, …)")
    tree = paths.resolve_tree_paths(tree, path.parent)
    typed_here = [(key, paths.resolve_override(key, value, Path.cwd())) for key, value in parse_overrides(list(overrides))]
    config = build_config(tree, source=str(path), parsed_overrides=typed_here)
    return paths.resolve_config_paths(config, path.parent)  # the defaults the YAML left out (storage: ./loraflow-store)
