"""A sweep: one base config and its variants (a grid of settings, or a list of overrides), each a fine-tune of its own.

The variants share every stage their settings do not change (the store and Prefect's cache see the same keys), so a
grid over the LoRA rank or the learning rate tokenizes the data and quantizes the base once.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from loraflow.config import FinetuneConfig
from loraflow.config_loader import build_config, set_dotted
from loraflow.errors import LoraflowError


def variant_overrides(grid: dict[str, list] | None, variants: list[dict] | None) -> list[dict[str, Any]]:
    """Each variant's settings: every combination of the grid's values, or the list as given."""
    if bool(grid) == bool(variants):
        raise LoraflowError("a sweep takes a grid (setting → list of values) or a list of variants (their settings), "
                            "one of the two, e.g. grid: {lora.r: [8, 16], train.learning_rate: [1e-4, 2e-4]}")
    if variants:
        if not all(isinstance(variant, dict) and variant for variant in variants):
            raise LoraflowError("each sweep variant is a mapping of settings to values, e.g. {lora.r: 16}")
        return [dict(variant) for variant in variants]
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise LoraflowError(f"sweep grid {key}: give a list of values, e.g. {key}: [{values!r}]")
    keys = list(grid)
    return [dict(zip(keys, combination)) for combination in itertools.product(*(grid[key] for key in keys))]


def variant_configs(config: FinetuneConfig, overrides: list[dict[str, Any]], first: int = 1) -> list[FinetuneConfig]:
    """The base config with each variant's settings, validated, named `<name>-v<N>` (N from first)."""
    base = config.model_dump(mode="json")
    configs = []
    for number, settings in enumerate(overrides, start=first):
        tree = json.loads(json.dumps(base))
        for key, value in settings.items():
            if key == "name":
                raise LoraflowError("a sweep names its variants itself (<name>-v<N>); leave name out of the grid")
            set_dotted(tree, key, value)
        tree["name"] = f"{config.name}-v{number}"
        configs.append(build_config(tree, source=f"sweep variant {number} ({', '.join(f'{k}={v}' for k, v in settings.items())})"))
    return configs


def describe(settings: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in settings.items())


def _number(value: Any) -> Any:
    """YAML 1.1 reads 1e-5 (no dot) as a string: a bound written so is still the number it says."""
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def search_distributions(space: dict[str, Any]) -> dict:
    """Optuna's distributions for a search space: a setting's list of values (one is chosen), or its range
    {low, high, log} (whole numbers when both bounds are, e.g. lora.r; log for a learning rate)."""
    try:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    except ImportError:
        raise LoraflowError("a search space needs Optuna: pip install 'loraflow[search]' (or sweep a grid)") from None

    distributions = {}
    for key, values in space.items():
        if isinstance(values, list) and values:
            distributions[key] = CategoricalDistribution(values)
        elif isinstance(values, dict) and {"low", "high"} <= set(values) <= {"low", "high", "log"} and \
                (values := {**values, "low": _number(values["low"]), "high": _number(values["high"])})["low"] < values["high"]:
            whole = all(isinstance(values[bound], int) for bound in ("low", "high"))
            distributions[key] = (IntDistribution if whole else FloatDistribution)(values["low"], values["high"], log=bool(values.get("log")))
        else:
            raise LoraflowError(f"search space {key}: give a list of values, e.g. [8, 16, 32], or a range, e.g. "
                                f"{{low: 1.0e-5, high: 1.0e-3, log: true}} (low below high); got {values!r}")
    if not distributions:
        raise LoraflowError("an Optuna search needs a search space: setting → values or range, e.g. "
                            "{train.learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}, lora.r: [8, 16, 32]}")
    return distributions
