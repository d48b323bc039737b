"""A sweep of three LoRA ranks on one base: data and quantization once, a failed variant leaves the others finished
and is retried alone, and the comparison ranks the variants; an Optuna search on the same machinery."""

import importlib
import json
from pathlib import Path

import pytest

from loraflow.errors import LoraflowError
from loraflow.sweep import variant_configs, variant_overrides

pytestmark = pytest.mark.slow

tokenize_module = importlib.import_module("loraflow.data.tokenize")


def test_a_grid_is_every_combination_and_each_variant_is_validated(tiny_model, tmp_path):
    from test_sft_pipeline import sft_config

    assert variant_overrides({"lora.r": [8, 16], "train.learning_rate": [1e-4, 2e-4]}, None) == [
        {"lora.r": 8, "train.learning_rate": 1e-4}, {"lora.r": 8, "train.learning_rate": 2e-4},
        {"lora.r": 16, "train.learning_rate": 1e-4}, {"lora.r": 16, "train.learning_rate": 2e-4}]
    configs = variant_configs(sft_config(tiny_model, tmp_path), [{"lora.r": 4}, {"lora.r": 16, "train.learning_rate": 2e-4}])
    assert [(c.name, c.lora.r, c.train.learning_rate) for c in configs] == [("test-v1", 4, 1e-2), ("test-v2", 16, 2e-4)]
    with pytest.raises(LoraflowError, match="one of the two"):
        variant_overrides({"lora.r": [8]}, [{"lora.r": 16}])
    with pytest.raises(LoraflowError, match=r"sweep variant 1 \(lora.rank=8\): invalid configuration"):
        variant_configs(sft_config(tiny_model, tmp_path), [{"lora.rank": 8}])


def test_a_sweep_shares_data_and_base_survives_a_failed_variant_and_retries_it_alone(prefect_server, tiny_model, tmp_path, monkeypatch):
    from flows.sweep import sweep
    from loraflow.models import native
    from test_sft_pipeline import sft_config

    config = sft_config(tiny_model, tmp_path / "store")
    config = config.model_copy(update={
        "merge": config.merge.model_copy(update={"enabled": False}),
        "train": config.train.model_copy(update={"max_steps": 4, "eval_steps": 2, "save_steps": 2, "retries": 0})})
    quantized = []
    original_quantize = native.quantize
    monkeypatch.setattr(native, "quantize", lambda *a, **k: quantized.append(1) or original_quantize(*a, **k))
    calls = tokenize_module.TOKENIZE_CALLS
    monkeypatch.setenv("LORAFLOW_TEST_FAIL_AT_STEP", "3")
    monkeypatch.setenv("LORAFLOW_TEST_FAIL_RUN", "/test-v2-")  # the second variant's run folder only

    state = sweep(config, grid={"lora.r": [4, 8, 16]}, return_state=True)
    assert state.is_failed() and "1 of 3 variants failed (test-v2)" in state.message
    assert tokenize_module.TOKENIZE_CALLS - calls == 1 and len(quantized) == 1  # shared by all three
    store = tmp_path / "store"
    finished = {path.parent.name.rsplit("-", 1)[0]: path for path in store.glob("runs/*/adapter")}
    assert set(finished) == {"test-v1", "test-v3"}
    first_adapters = {name: (path / "_manifest.json").read_text() for name, path in finished.items()}

    monkeypatch.delenv("LORAFLOW_TEST_FAIL_AT_STEP")
    state = sweep(config, grid={"lora.r": [4, 8, 16]}, return_state=True)
    assert state.is_completed(), state.message
    results = state.result()
    assert set(results) == {"test-v1", "test-v2", "test-v3"}
    assert results["test-v2"]["train"].metrics["resumed_from"].endswith("checkpoint-2")  # the failed one, resumed
    for name, manifest in first_adapters.items():  # the finished ones were not trained again
        assert Path(results[name]["adapter"].uri, "_manifest.json").read_text() == manifest
    assert tokenize_module.TOKENIZE_CALLS - calls == 1 and len(quantized) == 1

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        [*_, artifact] = sorted(client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["test-sweep"]))),
                                key=lambda a: a.created)
    losses = {name: records["train"].metrics["eval_loss"] for name, records in results.items()}
    best = min(losses, key=losses.get)
    assert f"1. `{best}` eval_loss {losses[best]:.4g}: lora.r=" in artifact.data and "← **best**" in artifact.data
    assert "| lora.r | 4 | 8 | 16 |" in artifact.data and "![loss curves](data:image/png;base64," in artifact.data


def test_parallel_variants_need_a_pool_to_train_on(prefect_server, tiny_model, tmp_path):
    from flows.sweep import sweep
    from test_sft_pipeline import sft_config

    state = sweep(sft_config(tiny_model, tmp_path / "store"), grid={"lora.r": [4, 8]}, parallel=2, return_state=True)
    assert state.is_failed() and ("parallel 2 runs variants at once, but test-v1, test-v2 would train in this process, side by "
                                  "side on one device: set train.pool") in state.message
    assert not (tmp_path / "store").exists()  # refused before any stage


def test_an_optuna_search_tries_variants_from_its_space_and_asks_for_the_same_ones_again(prefect_server, tiny_model, tmp_path):
    from flows.sweep import sweep
    from loraflow.compare import read_run
    from loraflow.storage import ArtifactStore
    from loraflow.sweep import search_distributions
    from test_sft_pipeline import sft_config

    config = sft_config(tiny_model, tmp_path / "store")
    config = config.model_copy(update={"merge": config.merge.model_copy(update={"enabled": False}),
                                       "train": config.train.model_copy(update={"max_steps": 2, "eval_steps": 2, "save_steps": 2})})
    space = {"train.learning_rate": {"low": "1e-3", "high": 5e-2, "log": True}, "lora.r": [4, 8]}  # ("1e-3": as YAML reads it)
    calls = tokenize_module.TOKENIZE_CALLS
    state = sweep(config, search_space=space, trials=3, return_state=True)
    assert state.is_completed(), state.message
    results = state.result()
    assert list(results) == ["test-v1", "test-v2", "test-v3"] and tokenize_module.TOKENIZE_CALLS - calls == 1
    store = ArtifactStore(str(tmp_path / "store"))
    tried = [read_run(store, records["adapter"].uri.rsplit("/", 2)[-2]).settings for records in results.values()]
    rates = [settings["train.learning_rate"] for settings in tried]
    assert all(1e-3 <= rate <= 5e-2 for rate in rates) and len(set(rates)) == 3, rates  # three points of the range
    assert {settings["lora.r"] for settings in tried} <= {4, 8}

    again = sweep(config, search_space=space, trials=3, return_state=True)  # seeded: the same variants, from the cache
    assert again.is_completed()
    assert {name: records["train"].uri for name, records in again.result().items()} == {name: records["train"].uri for name, records in results.items()}

    with pytest.raises(LoraflowError, match=r"search space lora.r: give a list of values, e.g. \[8, 16, 32\], or a range"):
        search_distributions({"lora.r": {"low": 16, "high": 8}})


def test_the_sweep_command_ranks_variants_of_different_methods_by_their_metric(prefect_server, tiny_model, tmp_path, capsys):
    """`loraflow sweep --grid lora.method=[lora,ia3]`: a variant switched to IA3 drops LoRA's settings at their defaults;
    the ranking prints each variant's eval loss and only the settings its method has."""
    import re

    import yaml

    from loraflow.cli import main
    from test_sft_pipeline import sft_config

    tree = sft_config(tiny_model, tmp_path / "store").model_dump(mode="json")
    tree["merge"]["enabled"] = False
    tree["train"].update(max_steps=2, eval_steps=2, save_steps=2)
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(tree))
    assert main(["sweep", str(config), "--grid", "lora.method=[lora,ia3]"]) == 0
    shown = capsys.readouterr().out
    ranked = dict(re.findall(r"^  \d\. (test-v\d) +(\S+)  ", shown, flags=re.MULTILINE))
    losses = {path.parent.parent.parent.name.rsplit("-", 1)[0]: json.loads(path.read_text())["eval_loss"]
              for path in (tmp_path / "store" / "runs").glob("*/checkpoints/final/train_summary.json")}
    assert set(ranked) == {"test-v1", "test-v2"} and all(float(ranked[name]) == pytest.approx(losses[name], rel=1e-3) for name in ranked), (ranked, losses)
    [ia3_line] = [line for line in shown.splitlines() if "lora.method=ia3" in line]
    assert "lora.feedforward=['down_proj']" in ia3_line and "lora.r=" not in ia3_line
