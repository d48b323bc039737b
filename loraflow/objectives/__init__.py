"""The training objectives, one module each, and their registry: what differs between objectives lives in its module.

Supports:
- `sft` (loraflow/objectives/sft.py): supervised fine-tuning with transformers' Trainer.
- `dpo` (loraflow/objectives/dpo.py): preference tuning with TRL's DPOTrainer, its reference log-probs a cached stage.

An objective's module owns its config class (the form of its flow and deployments), the data shapes it takes (asked of
loraflow.data.shapes), the stages it adds before training, what its keys read, its part of the trainer (arguments,
trainer class, tokens seen, summary numbers) and its summary lines. Everything else asks OBJECTIVES: config loading
(`config_class`), the flows and deployments (flow name, entrypoint, deployment name), the watcher's routing (a shape's
objective), the report and compare. Adding an objective: a module with an `Objective` subclass, registered below, its
flow (flows/<name>.py, one call of flows.common.fine_tune) and its prefect.yaml entry; tests check the registry
against the flows and deployments (tests/test_deployments_and_triggers.py).

Everything else in training (model setup, resume, checkpoint commits, metrics, ranks) is the shared path in
loraflow/train.py.
"""

from __future__ import annotations

from typing import Union

from loraflow.config import FinetuneConfig
from loraflow.errors import LoraflowError
from loraflow.objectives.common import Objective, arguments_for, load_split, longest
from loraflow.objectives.dpo import (
    Dpo, DpoDataSettings, DpoFinetuneConfig, DpoSettings, DpoTrainSettings, ReferenceProgress,
)
from loraflow.objectives.sft import Sft

OBJECTIVES: dict[str, type[Objective]] = {objective.name: objective for objective in (Sft, Dpo)}

# A flow parameter that takes any objective's config (the training job on a pool, merge, sweep), told apart by
# `objective`. Not a discriminated union: its JSON schema would be a oneOf that a config without `objective` (an
# SFT one, as written by hand) matches twice, which the server refuses; as a plain union such a config is SFT's.
AnyFinetuneConfig = Union[tuple(objective.config for objective in OBJECTIVES.values())]  # noqa: UP007 (built from the registry)


def config_class(tree: dict) -> type[FinetuneConfig]:
    """The config class of the objective a config tree names (none named: SFT, the default); an unknown objective is
    left to the SFT class, whose `objective` field then names the valid ones."""
    name = tree.get("objective", Sft.name) if isinstance(tree, dict) else Sft.name
    return OBJECTIVES.get(name, Sft).config if isinstance(name, str) else Sft.config  # (objective: {} → SFT's error)


def objective_of(config: FinetuneConfig) -> type[Objective]:
    """The registered objective of a validated config."""
    try:
        return OBJECTIVES[config.objective]
    except KeyError:
        raise LoraflowError(f"objective {config.objective!r} is not one of {', '.join(OBJECTIVES)}") from None


__all__ = [
    "OBJECTIVES", "AnyFinetuneConfig", "Objective", "Sft", "Dpo", "DpoSettings", "DpoDataSettings", "DpoTrainSettings",
    "DpoFinetuneConfig", "ReferenceProgress", "arguments_for", "config_class", "load_split", "longest", "objective_of",
]
