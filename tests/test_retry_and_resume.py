"""Retrying a failed run redoes nothing that finished; a killed trainer resumes from the store."""

import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from loraflow.launch import LaunchCommand, run_streaming
from loraflow.storage import ArtifactStore
from tasks.runs import task_states
from test_sft_pipeline import sft_config

pytestmark = pytest.mark.slow
tokenize_module = importlib.import_module("loraflow.data.tokenize")


def run_flow(config, retries=0):
    from flows.sft import sft

    flow = sft.with_options(retries=retries, retry_delay_seconds=0) if retries else sft
    state = flow(config, return_state=True)
    return state, task_states(state.state_details.flow_run_id)


def retried_config(model, store, **train):
    config = sft_config(model, store)
    return config.model_copy(update={"train": config.train.model_copy(update={"retries": 0, **train})})


def test_rerun_after_a_training_failure_reuses_data_quantization_and_lora(prefect_server, tiny_model, tmp_path, monkeypatch):
    config = retried_config(tiny_model, tmp_path / "store")
    monkeypatch.setenv("LORAFLOW_TEST_FAIL_AT_STEP", "8")
    state, states = run_flow(config)
    assert state.is_failed()
    assert states["dataset"] == "Completed" and states["train"] == "Failed"

    monkeypatch.delenv("LORAFLOW_TEST_FAIL_AT_STEP")
    calls = tokenize_module.TOKENIZE_CALLS
    state, states = run_flow(config)
    assert state.is_completed()
    assert tokenize_module.TOKENIZE_CALLS == calls
    assert [states[t] for t in ("dataset", "base", "lora")] == ["Cached"] * 3
    trained = state.result()["train"]
    assert trained.metrics["resumed_from"].endswith("/checkpoints/checkpoint-6")
    assert trained.metrics["global_step"] == 12
    summary = Path(trained.uri.rsplit("/checkpoints/", 1)[0], "summary.md").read_text()
    assert f"**Training resumed from checkpoint-6 after a failure (`{trained.metrics['resumed_from']}`)" in summary
    # Throughput counts only this attempt's tokens (steps 7-12), not those trained before the crash.
    this_attempt = trained.metrics["tokens_per_s"] * trained.metrics["train_runtime_s"]
    assert 0.3 * trained.metrics["tokens_seen"] < this_attempt < 0.75 * trained.metrics["tokens_seen"]

    # A fresh Prefect database (its own PREFECT_HOME and temporary server) over the same store, with
    # Prefect's persisted results gone too: the committed stage outputs alone are found and reused.
    store = ArtifactStore(config.storage)
    committed_at = {name: store.manifest(record.uri)["committed_at"] for name, record in state.result().items() if record.uri}
    shutil.rmtree(Path(config.storage) / "prefect-results")
    home = tmp_path / "fresh-prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": "", "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "results")}
    (tmp_path / "c.yaml").write_text(config.model_dump_json())  # JSON is YAML
    result = subprocess.run([sys.executable, "-m", "loraflow.cli", "run", str(tmp_path / "c.yaml")],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("dataset", "base", "lora", "train", "adapter", "merged"):
        assert any(line.split()[:2] == [stage, "reused"] for line in result.stdout.splitlines()), (stage, result.stdout)
    assert (home / "prefect.db").exists()
    assert {name: store.manifest(record.uri)["committed_at"] for name, record in state.result().items() if record.uri} == committed_at


def test_flow_level_retries_rerun_only_the_failed_stage(prefect_server, tiny_model, tmp_path, monkeypatch):
    config = retried_config(tiny_model, tmp_path / "store")
    monkeypatch.setenv("LORAFLOW_TEST_FAIL_AT_STEP", "8")
    calls = tokenize_module.TOKENIZE_CALLS
    state, states = run_flow(config, retries=1)
    assert state.is_completed()
    assert tokenize_module.TOKENIZE_CALLS == calls + 1  # the first attempt only
    assert state.result()["train"].metrics["resumed_from"].endswith("checkpoint-6")


def test_a_killed_trainer_resumes_and_ends_where_an_uninterrupted_run_ends(prefect_server, tiny_model, tmp_path, monkeypatch):
    """SIGKILL right after checkpoint-6 is committed; the task retries and resumes from it.

    On CPU with a fixed seed the resumed run replays the same batches with the same RNG, optimizer and
    scheduler states, so the adapters are bitwise equal (tolerance 0). Evaluation runs only at the end
    here: on CPU, bitsandbytes repacks NF4 weights into its CPU kernel layout on the first eval-mode
    forward and keeps them packed, so an uninterrupted run that evaluated mid-way continues on other
    kernels than a resumed one (measured: 5e-4 apart after 6 more steps at lr 1e-2; 0 with a plain
    LoRA base, which has no such repacking).
    """
    no_mid_run_eval = {"eval_steps": 1000}
    interrupted = retried_config(tiny_model, tmp_path / "interrupted", retries=1, **no_mid_run_eval)
    monkeypatch.setenv("LORAFLOW_TEST_KILL_AT_STEP", "6")
    state, states = run_flow(interrupted)
    assert state.is_completed() and states["train"] == "Completed"
    resumed = state.result()
    assert resumed["train"].metrics["resumed_from"].endswith("/checkpoints/checkpoint-6")

    monkeypatch.delenv("LORAFLOW_TEST_KILL_AT_STEP")
    state, _ = run_flow(retried_config(tiny_model, tmp_path / "straight", **no_mid_run_eval))
    straight = state.result()
    assert straight["train"].metrics["resumed_from"] is None

    a = load_file(Path(resumed["adapter"].uri) / "adapter_model.safetensors")
    b = load_file(Path(straight["adapter"].uri) / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 28
    assert all(torch.equal(a[k], b[k]) for k in a)
    init = load_file(Path(resumed["lora"].uri) / "adapter" / "adapter_model.safetensors")
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-3  # and training did move them


def _descendants_alive(marker: str) -> list:
    return [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]


def test_timeout_kills_the_whole_process_group(tmp_path):
    marker = f"loraflow-orphan-check-{os.getpid()}"
    # A launcher that starts a "rank" in the background and then goes quiet, like torchrun.
    script = f"sleep 300 # {marker} rank &\nexec sleep 301 # {marker} launcher\n"
    (tmp_path / "launch.sh").write_text(script)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="timeout"):
        run_streaming(LaunchCommand(["bash", str(tmp_path / "launch.sh")]), lambda line: None, timeout=2)
    assert time.monotonic() - started < 30
    time.sleep(0.5)
    assert not _descendants_alive(marker)


def test_an_exception_while_streaming_kills_the_group(tmp_path):
    marker = f"loraflow-cancel-check-{os.getpid()}"
    (tmp_path / "launch.sh").write_text(f"bash -c 'sleep 300; : {marker}' &\necho started\nsleep 300\n")

    def cancel(line):
        raise KeyboardInterrupt  # how a cancellation arrives in the task thread

    with pytest.raises(KeyboardInterrupt):
        run_streaming(LaunchCommand(["bash", str(tmp_path / "launch.sh")]), cancel)
    time.sleep(0.5)
    assert not _descendants_alive(marker)


def test_train_stage_timeout_through_the_flow_leaves_no_trainer(prefect_server, tiny_model, tmp_path):
    config = retried_config(tiny_model, tmp_path / "store", timeout_s=8, max_steps=10_000, save_steps=10_000, eval_steps=10_000)
    state, states = run_flow(config)
    assert state.is_failed() and states["train"] == "TimedOut"
    assert "training exceeded its 8 s timeout (train.timeout_s); its process group was killed" in state.message
    time.sleep(0.5)
    assert not _descendants_alive(str(tmp_path / "store"))


def test_the_first_log_after_a_resume_counts_only_its_own_tokens(tmp_path):
    """A resumed run's state starts at its checkpoint's token count; tokens/s of its first log once counted every token
    since step 0 (about 30x the real speed)."""
    from types import SimpleNamespace

    from loraflow.storage import ArtifactStore
    from loraflow.train import _callbacks

    metrics = tmp_path / "metrics.jsonl"
    [callback] = _callbacks(ArtifactStore(str(tmp_path / "store")), "unused", metrics, "cpu", True, resumed=True)
    args = SimpleNamespace(fp16=False, learning_rate=1e-3)
    started = time.monotonic()
    callback.on_train_begin(args, SimpleNamespace(num_input_tokens_seen=100_000), None)
    time.sleep(0.5)  # (the time the resumed run's first 1,000 tokens take)
    callback.on_log(args, SimpleNamespace(global_step=101, epoch=1.0, max_steps=200, num_input_tokens_seen=101_000), None,
                    logs={"loss": 1.0})
    elapsed = time.monotonic() - started  # (measured, not assumed: a busy machine runs the calls late)
    speed = json.loads(metrics.read_text().splitlines()[-1])["tokens_per_s"]
    assert 1_000 / elapsed - 0.1 <= speed <= 1_000 / 0.5 + 0.1  # 1,000 tokens in about half a second, not 101,000
