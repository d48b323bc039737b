"""Launchers as data, rank discovery from torch and MPI variables, and real 2-process training on CPU."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from loraflow import stages
from loraflow.config import build_config
from loraflow.launch import build_command, distributed_backend
from loraflow.storage import ArtifactStore
from loraflow.train import rank_info


def test_torchrun_and_mpirun_commands():
    torchrun = build_command("torchrun", "s3://b/spec.json", 4, python="/py")
    assert torchrun.argv == ["/py", "-m", "torch.distributed.run", "--nproc-per-node=4", "-m", "loraflow.train", "s3://b/spec.json"]
    mpirun = build_command("mpirun", "/s.json", 2, python="/py")
    assert mpirun.argv[:3] == ["mpirun", "-n", "2"] and mpirun.argv[-4:] == ["/py", "-m", "loraflow.train", "/s.json"]
    assert "MASTER_ADDR" in mpirun.env and "-x" in mpirun.argv
    assert build_command("local", "/s.json", python="/py").argv == ["/py", "-m", "loraflow.train", "/s.json"]


@pytest.mark.parametrize("env, expected", [
    ({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}, (3, 1, 4)),
    ({"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1"}, (5, 1, 8)),  # Intel MPI, second host
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}, (2, 0, 4)),  # Open MPI
    ({}, (0, 0, 1)),
])
def test_global_rank_is_never_the_local_rank(monkeypatch, env, expected):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID",
                 "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    info = rank_info()
    assert (info["rank"], info["local_rank"], info["world_size"]) == expected


def test_distributed_backend_per_device():
    assert distributed_backend("cpu") == "gloo" and distributed_backend("cuda") == "nccl"
    assert distributed_backend("xpu") in ("xccl", "ccl")


def _train_with(launcher, tiny_model, tmp_path):
    sample = str(Path(__file__).parents[1] / "loraflow/data/sample/alpaca_gpt4_sample.json")
    config = build_config({
        "name": "ddp", "storage": str(tmp_path / "store"), "model": {"base": str(tiny_model)},
        "data": {"path": sample, "val_set_size": 16, "cutoff_len": 128},
        "train": {"learning_rate": 1e-2, "batch_size": 16, "micro_batch_size": 4, "max_steps": 4, "eval_steps": 2,
                  "save_steps": 2, "gradient_checkpointing": False, "launcher": launcher, "nproc_per_node": 2},
    })
    log = lambda _: None  # noqa: E731
    env = stages.env_check(config)
    sources = stages.inspect_sources(config)
    dataset = stages.prepare_data(config, sources, log)
    base = stages.quantize_base(config, env, sources, log)
    lora = stages.inject_lora(config, env, base, log)
    key, run, spec = stages.train_spec(config, env, dataset, base, lora)
    store = ArtifactStore(config.storage)
    store.write_json(f"{run}/spec.json", spec)
    command = build_command(launcher, f"{run}/spec.json", 2)
    result = subprocess.run(command.argv, env={**os.environ, **command.env}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    record = stages.trained_record(store, key, run, reused=False)
    assert record.metrics["world_size"] == 2
    assert record.metrics["final_loss"] < record.metrics["first_loss"]
    assert result.stdout.count("trained adapter committed") == 1  # rank 0 alone writes
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model)), record.uri)
    return record


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tiny_model, tmp_path):
    _train_with("torchrun", tiny_model, tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI (openmpi-bin) is not installed")
def test_mpirun_two_processes_on_cpu(tiny_model, tmp_path):
    _train_with("mpirun", tiny_model, tmp_path)
