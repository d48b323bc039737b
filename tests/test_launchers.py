"""Launchers as data, rank discovery from torch and MPI variables, and real 2-process training on CPU."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from loraflow import stages
from loraflow.config import build_config
from loraflow.launch import build_command, distributed_backend, run_streaming
from loraflow.train import rank_info


def test_torchrun_and_mpirun_commands():
    torchrun = build_command("torchrun", "s3://b/spec.json", 4, python="/py")
    assert torchrun.argv[:4] == ["/py", "-m", "torch.distributed.run", "--nproc-per-node=4"]
    assert torchrun.argv[4].startswith("--master-port=") and torchrun.argv[5:] == ["-m", "loraflow.train", "s3://b/spec.json"]
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


def test_rank_variables_are_exported_only_for_several_processes(monkeypatch):
    from loraflow.train import export_torch_rank_env

    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK",
             "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID")
    # A private environment: what export_torch_rank_env sets must not reach later tests' launchers.
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in names})
    export_torch_rank_env()
    assert "WORLD_SIZE" not in os.environ and "RANK" not in os.environ
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    export_torch_rank_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "1")
    assert os.environ["MASTER_ADDR"] == "127.0.0.1"


def test_distributed_backend_per_device():
    assert distributed_backend("cpu") == "gloo" and distributed_backend("cuda") == "nccl"
    assert distributed_backend("xpu") in ("xccl", "ccl")


def _train_with(launcher, tiny_model, tmp_path, **train):
    sample = str(Path(__file__).parents[1] / "loraflow/data/sample/alpaca_gpt4_sample.json")
    config = build_config({
        "name": "ddp", "storage": str(tmp_path / "store"), "model": {"base": str(tiny_model)},
        "data": {"path": sample, "val_set_size": 16, "cutoff_len": 128},
        "train": {"learning_rate": 1e-2, "batch_size": 16, "micro_batch_size": 4, "max_steps": 4, "eval_steps": 2,
                  "save_steps": 2, "gradient_checkpointing": False, "launcher": launcher, "nproc_per_node": 2, **train},
    })
    store, key, run, spec_uri = stages.prepare_training(config, log=lambda _: None)
    command = build_command(launcher, spec_uri, 2)
    lines = []
    code = run_streaming(command, lines.append, timeout=300)  # a hang kills every rank, not just the launcher
    output = "\n".join(lines)
    assert code == 0, output[-5000:]
    record = stages.trained_record(store, key, run, reused=False)
    assert record.metrics["world_size"] == 2
    assert record.metrics["final_loss"] < record.metrics["first_loss"]
    assert output.count("trained adapter committed") == 1  # rank 0 alone writes
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


@pytest.mark.slow
def test_deepspeed_zero2_two_processes_on_cpu(tiny_model, tmp_path):
    """ZeRO-2 partitions optimizer state and gradients across the ranks; rank 0 still saves whole tensors."""
    from safetensors.torch import load_file

    record = _train_with("deepspeed", tiny_model, tmp_path, deepspeed_zero=2)
    final = load_file(Path(record.uri) / "adapter_model.safetensors")
    last_checkpoint = load_file(Path(record.uri).parent / "checkpoint-4" / "adapter_model.safetensors")
    assert final.keys() == last_checkpoint.keys() and len(final) == 28
    assert all(final[k].numel() > 0 and torch.equal(final[k], last_checkpoint[k]) for k in final)
