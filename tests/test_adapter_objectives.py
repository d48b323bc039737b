"""Every registered adapter method with every registered objective (generated from loraflow.adapters.METHODS and
loraflow.objectives.OBJECTIVES): the combination trains (two optimizer steps through the stages and the trainer, its
adapter changed and saved as its method's PEFT type), or the config is refused at validation with the reason.

A method or objective registered tomorrow is covered here the day it is registered. Cheap by sharing: one store per
module, so the data stage, the NF4 base and each method's initial adapter are built once; training runs in this
process (loraflow.train.train, as `python -m loraflow.train` runs it, without the interpreter's start-up)."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from loraflow import adapters, stages
from loraflow.config_loader import build_config
from loraflow.errors import LoraflowError
from loraflow.objectives import OBJECTIVES
from loraflow.train import read_spec, train

# Each objective's smallest run: its sample data and its own settings. (A new objective adds its line; the KeyError
# below says so.)
OBJECTIVE_RUNS = {
    "sft": {"data": {"path": str(REPO / "loraflow/data/sample/alpaca_gpt4_sample.json"), "val_set_size": 0, "cutoff_len": 64}},
    "dpo": {"data": {"path": str(REPO / "loraflow/data/sample/orca_dpo_pairs_sample.jsonl"), "val_set_size": 0},
            "dpo": {"max_prompt_length": 48, "max_length": 96}},
}
# Small enough for two steps in seconds on the tiny model; prompt tuning's few virtual tokens, VeRA's lower rank.
METHOD_SETTINGS = {"prompt-tuning": {"num_virtual_tokens": 4}, "prefix-tuning": {"num_virtual_tokens": 4}, "vera": {"r": 16}}

COMBINATIONS = [(method.name, objective) for method in adapters.METHODS for objective in OBJECTIVES]


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adapter-objectives") / "store"


def _tree(method: str, objective: str, model: Path, store: Path) -> dict:
    return {"name": "combo", "objective": objective, "storage": str(store), "model": {"base": str(model)},
            "lora": {"method": method, **METHOD_SETTINGS.get(method, {})},
            "train": {"learning_rate": 1e-2, "batch_size": 2, "micro_batch_size": 2, "max_steps": 2, "save_steps": 2,
                      "logging_steps": 1, "warmup": 0, "lr_scheduler": "constant", "gradient_checkpointing": "off"},
            **OBJECTIVE_RUNS[objective]}


@pytest.mark.parametrize("method,objective", COMBINATIONS, ids=[f"{method}-{objective}" for method, objective in COMBINATIONS])
def test_each_adapter_method_trains_with_each_objective_or_is_refused_with_the_reason(method, objective, tiny_model, shared_store):
    entry = adapters.method(method)
    tree = _tree(method, objective, tiny_model, shared_store)
    if objective not in entry.objectives:
        with pytest.raises(LoraflowError) as refused:
            build_config(tree)
        offered = ", ".join(other.name for other in adapters.for_objective(objective))
        message = str(refused.value)
        # one line that names the field, what is offered, and why this method is not
        assert f"lora: method {method!r} is not one of {offered} (" in message, message
        assert f"{entry.words} " in message and f"train {entry.trains}" in message and "\n" not in message.split("lora: ", 1)[1], message
        return

    config = build_config(tree).for_run()
    _, _, run, spec_uri = stages.prepare_training(config, log=lambda _: None)
    spec = read_spec(spec_uri)
    assert spec.adapter_method == method and spec.objective == objective
    summary = train(spec)
    assert summary["global_step"] == 2 and math.isfinite(summary["final_loss"]), summary

    saved = Path(run, "checkpoints", "final")
    assert adapters.saved_method(json.loads((saved / "adapter_config.json").read_text())) is entry
    initial = load_file(str(Path(spec.lora_uri, "adapter", "adapter_model.safetensors")))
    trained = load_file(str(saved / "adapter_model.safetensors"))
    assert initial.keys() == trained.keys()
    changed = [name for name in trained if not torch.equal(trained[name].float(), initial[name].float())]
    assert changed, "training changed none of the adapter's weights"
