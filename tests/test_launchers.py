"""Launchers as data, rank discovery from torch and MPI variables, and real 2-process training on CPU."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from loraflow import stages
from loraflow.config_loader import build_config
from loraflow.errors import LoraflowError
from loraflow.launch import Topology, build_command, deepspeed_config, distributed_backend, run_streaming, write_hostfile
from loraflow.train import rank_info


def test_one_host_commands():
    torchrun = build_command(Topology("torchrun", 4), "s3://b/spec.json", python="/py")
    assert torchrun.argv[:4] == ["/py", "-m", "torch.distributed.run", "--nproc-per-node=4"]
    assert torchrun.argv[4].startswith("--master-port=") and torchrun.argv[5:] == ["-m", "loraflow.train", "s3://b/spec.json"]
    mpirun = build_command(Topology("mpirun", 2, mpi="openmpi"), "/s.json", python="/py")
    assert mpirun.argv[:3] == ["mpirun", "-n", "2"] and mpirun.argv[-4:] == ["/py", "-m", "loraflow.train", "/s.json"]
    assert mpirun.env["MASTER_ADDR"] == "127.0.0.1" and "-x" in mpirun.argv and "--hostfile" not in mpirun.argv
    deepspeed = build_command(Topology("deepspeed", 2, master_port=1234), "/s.json", python="/py")
    assert deepspeed.argv[1:3] == ["--num_gpus=2", "--master_port=1234"] and deepspeed.argv[-3:] == ["--module", "loraflow.train", "/s.json"]
    assert build_command(Topology(), "/s.json", python="/py").argv == ["/py", "-m", "loraflow.train", "/s.json"]
    with pytest.raises(LoraflowError, match="launcher local runs one process"):
        build_command(Topology("local", 2), "/s.json")


HOSTS = ["xpu-a", "xpu-b"]


def test_torchrun_on_two_hosts_uses_static_rendezvous_on_the_first_host():
    topology = Topology("torchrun", 4, hosts=HOSTS)
    first, second = (build_command(topology, "s3://b/spec.json", node_rank=r, python="/py").argv for r in (0, 1))
    assert "--nnodes=2" in first and "--node-rank=0" in first and "--node-rank=1" in second
    assert "--rdzv-backend=static" in first and "--rdzv-endpoint=xpu-a:29500" in first and "--rdzv-endpoint=xpu-a:29500" in second


def test_mpirun_on_two_hosts_in_both_flavours(tmp_path):
    open_mpi = Topology("mpirun", 4, hosts=HOSTS, mpi="openmpi")
    hostfile = write_hostfile(open_mpi, tmp_path / "openmpi")
    assert hostfile.read_text() == "xpu-a slots=4\nxpu-b slots=4\n"
    command = build_command(open_mpi, "/s.json", hostfile=hostfile, python="/py")
    argv = " ".join(command.argv)
    assert "mpirun -n 8 -x MASTER_ADDR -x MASTER_PORT -x PATH" in argv and f"--hostfile {hostfile} --map-by ppr:4:node" in argv
    assert command.env == {"MASTER_ADDR": "xpu-a", "MASTER_PORT": "29500"}

    intel = Topology("mpirun", 4, hosts=HOSTS, mpi="intel", master_port=29600)
    hostfile = write_hostfile(intel, tmp_path / "intel")
    assert hostfile.read_text() == "xpu-a:4\nxpu-b:4\n"
    command = build_command(intel, "/s.json", hostfile=hostfile, python="/py")
    assert command.argv[:9] == ["mpirun", "-n", "8", "-ppn", "4", "-genvlist", "MASTER_ADDR,MASTER_PORT,PATH", "-f", str(hostfile)]
    assert "--allow-run-as-root" not in command.argv and command.env["MASTER_PORT"] == "29600"
    with pytest.raises(LoraflowError, match="needs a hostfile"):
        build_command(intel, "/s.json")


def test_deepspeed_on_two_hosts_and_zero2_offload(tmp_path):
    topology = Topology("deepspeed", 2, hosts=HOSTS)
    hostfile = write_hostfile(topology, tmp_path)
    argv = build_command(topology, "/s.json", hostfile=hostfile, python="/py").argv
    assert {f"--hostfile={hostfile}", "--num_nodes=2", "--num_gpus=2", "--master_addr=xpu-a", "--master_port=29500"} <= set(argv)
    assert deepspeed_config(0) is None and "offload_optimizer" not in deepspeed_config(2)["zero_optimization"]
    offload = deepspeed_config(2, offload_optimizer=True)
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and offload["optimizer"]["params"]["lr"] == "auto"


def test_topology_settings_are_validated():
    base = {"model": {"base": "m"}, "data": {"path": "d.json"}}
    with pytest.raises(LoraflowError, match="need a multi-process launcher"):
        build_config({**base, "train": {"hosts": HOSTS}})
    with pytest.raises(LoraflowError, match="lists a host twice"):
        build_config({**base, "train": {"launcher": "mpirun", "hosts": ["a", "a"]}})
    with pytest.raises(LoraflowError, match="deepspeed_offload_optimizer needs deepspeed_zero"):
        build_config({**base, "train": {"launcher": "deepspeed", "deepspeed_offload_optimizer": True}})
    config = build_config({**base, "train": {"launcher": "torchrun", "nproc_per_node": 4, "hosts": HOSTS}})
    assert Topology.from_train(config.train) == Topology.from_train(config.train.model_dump()) == Topology("torchrun", 4, HOSTS)


def test_other_hosts_start_their_torchrun_agents_from_the_spec(tmp_path, capsys):
    from loraflow.launch import main

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"train": {"launcher": "torchrun", "nproc_per_node": 2, "hosts": HOSTS}}))
    assert main([str(spec), "--node-rank", "1", "--dry-run"]) == 0
    assert "--node-rank=1 --rdzv-backend=static --rdzv-endpoint=xpu-a:29500" in capsys.readouterr().out
    assert main([str(spec), "--node-rank", "2", "--dry-run"]) == 2
    assert "node ranks 1..1" in capsys.readouterr().err


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


def _train_with(launcher, tiny_model, tmp_path, quantization="nf4", val_set_size=16, deepspeed_overrides=None, **train):
    sample = str(Path(__file__).parents[1] / "loraflow/data/sample/alpaca_gpt4_sample.json")
    config = build_config({
        "name": "ddp", "storage": str(tmp_path / "store"), "model": {"base": str(tiny_model), "quantization": quantization},
        "data": {"path": sample, "val_set_size": val_set_size, "cutoff_len": 128},
        "train": {"learning_rate": 1e-2, "batch_size": 16, "micro_batch_size": 4, "max_steps": 4, "eval_steps": 2,
                  "save_steps": 2, "gradient_checkpointing": "off", "launcher": launcher, "nproc_per_node": 2, **train},
    })
    store, key, run, spec_uri = stages.prepare_training(config, log=lambda _: None)
    if deepspeed_overrides:
        spec = store.read_json(spec_uri)
        spec["deepspeed_config"]["zero_optimization"].update(deepspeed_overrides)
        store.write_json(spec_uri, spec)
    command = build_command(Topology(launcher, 2), spec_uri)
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
def test_dpo_with_torchrun_two_processes_on_cpu(tiny_model, shared_data, tmp_path):
    """DPO through the same launcher: the pairs split across two ranks, the precomputed reference log-probs with them."""
    pairs = tmp_path / "hh16.jsonl"
    pairs.write_text("\n".join((shared_data / "hh_rlhf_harmless_base_test_1k.jsonl").read_text().splitlines()[:16]) + "\n")
    config = build_config({
        "name": "ddp-dpo", "objective": "dpo", "storage": str(tmp_path / "store"), "model": {"base": str(tiny_model)},
        "data": {"path": str(pairs)}, "dpo": {"max_prompt_length": 64, "max_length": 128},
        "train": {"learning_rate": 1e-2, "batch_size": 8, "micro_batch_size": 2, "max_steps": 4, "save_steps": 2, "warmup": 0,
                  "gradient_checkpointing": "off", "launcher": "torchrun", "nproc_per_node": 2},
    }).for_run()
    store, key, run, spec_uri = stages.prepare_training(config, log=lambda _: None)
    lines = []
    assert run_streaming(build_command(Topology("torchrun", 2), spec_uri), lines.append, timeout=300) == 0, "\n".join(lines)[-5000:]
    record = stages.trained_record(store, key, run, reused=False)
    assert record.metrics["world_size"] == 2 and record.metrics["objective"] == "dpo" and record.metrics["reference_forwards"] == 0
    assert "\n".join(lines).count("trained adapter committed") == 1  # rank 0 alone writes


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



@pytest.mark.slow
def test_deepspeed_zero3_plain_lora_saves_the_whole_trained_adapter(tiny_model, tmp_path):
    """ZeRO-3 shards the parameters themselves: the saved adapter must be gathered from every rank.

    The same run under ZeRO-2 (whole parameters on every rank) is the reference: same seed, data and
    steps, so the two adapters agree up to the order of floating-point reductions.
    """
    from safetensors.torch import load_file

    # ZeRO-3 keeps parameters under stage3_param_persistence_threshold (1e5 elements) whole on every
    # rank, which every LoRA matrix of the tiny model is: a threshold of 0 shards them all. Without a
    # validation split no evaluation leaves them gathered when training ends.
    zero3 = _train_with("deepspeed", tiny_model, tmp_path / "zero3", deepspeed_zero=3, quantization="none", val_set_size=0,
                        deepspeed_overrides={"stage3_param_persistence_threshold": 0}, precision="fp32")
    # (fp32: in bf16 the two reduction orders differ by more than rounding.)
    zero2 = _train_with("deepspeed", tiny_model, tmp_path / "zero2", deepspeed_zero=2, quantization="none", val_set_size=0,
                        precision="fp32")
    sharded, whole = (load_file(Path(r.uri) / "adapter_model.safetensors") for r in (zero3, zero2))
    assert sharded.keys() == whole.keys() and len(sharded) == 28
    for name in whole:
        assert sharded[name].shape == whole[name].shape  # a rank's shard would be flat or empty
        torch.testing.assert_close(sharded[name], whole[name], rtol=1e-3, atol=1e-5)
    assert all(whole[k].abs().sum() > 0 for k in whole if "lora_B" in k)  # B starts at zero: it trained
