"""model.backend ipex-llm: the SFT flow quantizes, initialises and trains through ipex-llm 2.2 in its own pinned
environment (infra/envs/ipex-llm: torch 2.1, transformers 4.36, peft 0.10), and the main environment loads the adapter
with its PEFT and merges it. The environment is built by `scripts/setup --test` (CI) or infra/envs/ipex-llm/setup; where
it is missing the tests that need it are skipped, saying how to build it."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from loraflow.config_loader import build_config
from loraflow.errors import LoraflowError
from loraflow.models import ipex_llm

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "loraflow/data/sample/alpaca_gpt4_sample.json"


@pytest.fixture(scope="module")
def pinned_python() -> str:
    try:
        return ipex_llm.python_executable()
    except LoraflowError as error:
        pytest.skip(f"no ipex-llm environment here: {error}")


def ipex_config(model: Path, store: Path, **sections) -> dict:
    return {"name": "ipex", "storage": str(store), "model": {"base": str(model), "backend": "ipex-llm"},
            "data": {"path": str(SAMPLE), "val_set_size": 8, "cutoff_len": 128},
            "train": {"learning_rate": 1e-2, "batch_size": 8, "micro_batch_size": 4, "max_steps": 6, "save_steps": 3,
                      "eval_steps": 3, "gradient_checkpointing": "off", "retries": 1},
            "merge": {"check_rows": 3}, **sections}


@pytest.fixture(scope="module")
def ipex_run(pinned_python, prefect_server, tiny_model, tmp_path_factory):
    """One fine-tune through the backend, its trainer killed right after the step-3 checkpoint (the retry resumes)."""
    import os

    from flows.sft import sft

    store = tmp_path_factory.mktemp("ipex-store")
    config = build_config(ipex_config(tiny_model, store))
    os.environ["LORAFLOW_TEST_KILL_AT_STEP"] = "3"
    try:
        state = sft(config, return_state=True)
    finally:
        del os.environ["LORAFLOW_TEST_KILL_AT_STEP"]
    assert state.is_completed(), state.message
    return {"records": state.result(), "store": store, "flow_run_id": state.state_details.flow_run_id}


def test_the_base_is_ipex_llm_low_bit_in_safetensors_only(ipex_run):
    base = Path(ipex_run["records"]["base"].uri)
    assert ipex_run["records"]["base"].metrics["quantization"] == "sym_int4"  # (ipex-llm has no NF4 kernel for the CPU)
    assert json.loads((base / "config.json").read_text())["bigdl_transformers_low_bit"] == "sym_int4"
    files = {p.name for p in base.iterdir()}
    assert "model.safetensors" in files and not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl"))]


def test_training_ran_in_the_pinned_environment_and_resumed_after_the_kill(ipex_run, pinned_python):
    summary = json.loads(Path(ipex_run["records"]["train"].uri, "train_summary.json").read_text())
    assert summary["backend"] == "ipex-llm" and summary["python"] == pinned_python
    assert summary["libraries"]["transformers"] == "4.36.2" and summary["libraries"]["ipex-llm"] == "2.2.0"
    assert summary["global_step"] == 6 and summary["resumed_from"].endswith("checkpoint-3")
    assert summary["final_loss"] < summary["first_loss"]
    assert not summary["packed"] and "transformers 4.36" in summary["padded_because"]
    # compare (and its artifact) tells this run from a native one by its backend and low-bit format
    from loraflow.compare import read_run
    from loraflow.storage import ArtifactStore

    settings = read_run(ArtifactStore(str(ipex_run["store"])), Path(ipex_run["records"]["train"].uri).parents[1].name).settings
    assert settings["model.backend"] == "ipex-llm" and settings["model.quantization"] == "sym_int4"
    # No numpy RNG state in a committed checkpoint: torch 2.1's restricted unpickler could not read it back.
    checkpoint = Path(ipex_run["records"]["train"].uri).parent / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").is_file() and not list(checkpoint.glob("rng_state*"))


def test_the_main_environment_loads_the_adapter_with_peft_and_it_matches_the_merged_model(ipex_run, tiny_model, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = Path(ipex_run["records"]["adapter"].uri)
    assert "training_mode" not in json.loads((adapter / "adapter_config.json").read_text())  # ipex-llm's own field
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter))
    trained_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert trained_b and all(float(p.abs().max()) > 0 for p in trained_b)  # (B starts at zero: these were trained)
    merged = AutoModelForCausalLM.from_pretrained(ipex_run["records"]["merged"].uri, dtype=torch.float32)
    batch = tokenizer(["Give three tips for staying healthy."], return_tensors="pt")
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, merged(**batch).logits, atol=1e-4)
        assert not torch.allclose(plain(**batch).logits, merged(**batch).logits, atol=1e-3)  # (the merge changed it)


def test_the_pinned_environment_reads_the_data_stage_tokenizer_as_the_main_one_does(ipex_run, pinned_python, tokenizer):
    """Saved by transformers 5 (class TokenizersBackend, BPE merges as pairs), read by transformers 4.36 / tokenizers 0.15."""
    folder = Path(ipex_run["records"]["dataset"].uri) / "tokenizer"
    text = "Give three tips for staying healthy. Über 123 — end"
    script = ("import json, sys; from loraflow.data.tokenize import load_tokenizer; t = load_tokenizer(sys.argv[1]); "
              "print(json.dumps([t(sys.argv[2])['input_ids'], t.pad_token_id, t.eos_token_id]))")
    pinned = subprocess.run([pinned_python, "-c", script, str(folder), text], capture_output=True, text=True, timeout=120)
    from loraflow.data.tokenize import load_tokenizer

    main = load_tokenizer(str(folder))
    assert json.loads(pinned.stdout.strip().splitlines()[-1]) == [main(text)["input_ids"], main.pad_token_id, main.eos_token_id], pinned.stderr[-2000:]


def test_two_ranks_train_through_torchrun_in_the_pinned_environment(pinned_python, prefect_server, tiny_model, tmp_path):
    """DDP would broadcast the frozen low-bit weights, whose packed type gloo refuses: only the adapter is synchronised."""
    from flows.sft import sft

    config = ipex_config(tiny_model, tmp_path / "store", merge={"enabled": False})
    config["train"] |= {"launcher": "torchrun", "nproc_per_node": 2, "max_steps": 4, "save_steps": 4, "eval_steps": 4}
    state = sft(build_config(config), return_state=True)
    assert state.is_completed(), state.message
    summary = json.loads(Path(state.result()["train"].uri, "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["backend"] == "ipex-llm" and summary["final_loss"] < summary["first_loss"]


def test_what_the_backend_cannot_train_is_refused_before_any_stage(tiny_model, tmp_path):
    config = ipex_config(tiny_model, tmp_path, lora={"method": "ia3"})
    config["data"]["new_tokens"] = ["<|im_start|>"]
    with pytest.raises(LoraflowError) as refused:
        build_config(config)
    message = str(refused.value)
    assert "model.backend ipex-llm does not support" in message
    assert "- lora.method ia3 (ipex-llm's QLoRA layers are LoRA's): use lora.method: lora" in message
    assert "- data.new_tokens: remove them" in message and "compile" not in message


def test_a_missing_pinned_environment_stops_the_env_check_saying_how_to_build_it(tiny_model, tmp_path, monkeypatch):
    from loraflow.envcheck import check_environment

    monkeypatch.setenv(ipex_llm.PYTHON_VARIABLE, str(tmp_path / "no-such-env" / "bin" / "python"))
    with pytest.raises(LoraflowError, match="infra/envs/ipex-llm/setup"):
        check_environment(build_config(ipex_config(tiny_model, tmp_path)))


def test_a_python_without_ipex_llm_is_refused_by_the_env_check_in_one_line(tiny_model, tmp_path, monkeypatch):
    import sys

    from loraflow.envcheck import check_environment

    monkeypatch.setenv(ipex_llm.PYTHON_VARIABLE, str(Path(sys.executable).parents[1]))  # (a venv's folder: its bin/python)
    with pytest.raises(LoraflowError) as refused:
        check_environment(build_config(ipex_config(tiny_model, tmp_path)))
    assert str(refused.value).startswith(f"{Path(sys.executable).parents[1]}/bin/python cannot import ipex-llm")
    assert "Traceback" not in str(refused.value)


def test_served_deployments_of_an_ipex_llm_config_keep_dpo_on_the_native_backend(tiny_model, tmp_path):
    """`loraflow serve --config` with backend ipex-llm: the SFT deployments train through it; the DPO one, whose model
    section is the served config's, stays on the native backend (ipex-llm trains SFT only) and validates."""
    from loraflow.cli import served_deployments
    from loraflow.config_loader import build_config

    served = {deployment.name: deployment for deployment in served_deployments(ipex_config(tiny_model, tmp_path), None, 60)}
    assert served["sft-local"].parameters["config"]["model"]["backend"] == "ipex-llm"
    dpo = served["dpo-local"].parameters["config"]
    assert dpo["model"]["backend"] == "native" and build_config(dpo).objective == "dpo"


def test_align_refuses_an_ipex_llm_config_before_training(tiny_model, tmp_path):
    from flows.align import align

    preferences = {"objective": "dpo", "storage": str(tmp_path), "model": {"base": str(tiny_model)},
                   "data": {"path": str(REPO / "loraflow/data/sample/orca_dpo_pairs_sample.jsonl")}}
    with pytest.raises(LoraflowError, match="trains SFT only"):
        align.fn(build_config(ipex_config(tiny_model, tmp_path)), build_config(preferences))


def test_plan_and_doctor_speak_of_the_pinned_environment(pinned_python, tiny_model, tmp_path, capsys):
    import yaml

    from loraflow.cli import main

    config = tmp_path / "ipex.yaml"
    config.write_text(yaml.safe_dump(ipex_config(tiny_model, tmp_path / "store")))
    assert main(["plan", str(config)]) == 0
    assert "quantization sym_int4 with ipex-llm" in capsys.readouterr().out.splitlines()[0]
    assert main(["doctor"]) == 0
    assert json.loads(capsys.readouterr().out)["ipex_llm_environment"]["python"] == pinned_python
