"""The training plan: what `auto` decides (micro batch, gradient checkpointing, precision) and why."""

import json

import pytest

from loraflow import plan
from loraflow.errors import LoraflowError

# An 8B-class Llama config: activations, not weights, decide the plan.
LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "vocab_size": 128256}
GIB = 1024 ** 3


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    return tmp_path


def test_a_roomy_accelerator_trains_the_whole_batch_at_once_without_checkpointing(model_dir, monkeypatch):
    monkeypatch.setattr(plan, "free_memory_bytes", lambda device: 400 * GIB)
    chosen = plan.plan_memory(model_dir, "cuda", "bf16", per_device_batch=16, tokens_per_example=256)
    assert (chosen.micro_batch_size, chosen.gradient_checkpointing) == (16, False)
    assert chosen.reason.startswith("micro batch 16 x accumulation 1 (auto: the largest of the 16 examples per device and step "
                                    "that fits), gradient checkpointing off (auto: not needed); its activations (4,096 tokens: about ")


def test_less_memory_means_a_smaller_micro_batch_then_checkpointing(model_dir, monkeypatch):
    monkeypatch.setattr(plan, "free_memory_bytes", lambda device: 16 * GIB)
    smaller = plan.plan_memory(model_dir, "cuda", "bf16", per_device_batch=16, tokens_per_example=256)
    assert 1 <= smaller.micro_batch_size < 16 and not smaller.gradient_checkpointing
    assert smaller.activations_mb * 1024 * 1024 <= plan.ACTIVATIONS_SHARE * 16 * GIB

    monkeypatch.setattr(plan, "free_memory_bytes", lambda device: 2 * GIB)
    tight = plan.plan_memory(model_dir, "cuda", "bf16", per_device_batch=16, tokens_per_example=2048)
    assert tight.gradient_checkpointing and "gradient checkpointing on (auto: a micro batch of one does not fit without it)" in tight.reason

    monkeypatch.setattr(plan, "free_memory_bytes", lambda device: 1 * GIB // 8)
    hopeless = plan.plan_memory(model_dir, "cuda", "bf16", per_device_batch=16, tokens_per_example=4096)
    assert (hopeless.micro_batch_size, hopeless.gradient_checkpointing) == (1, True)
    assert "do NOT fit (expect running out of memory: lower micro_batch_size or data lengths)" in hopeless.reason


def test_settings_given_in_the_config_are_kept(model_dir, monkeypatch):
    monkeypatch.setattr(plan, "free_memory_bytes", lambda device: 400 * GIB)
    kept = plan.plan_memory(model_dir, "cuda", "bf16", 16, 256, micro_batch_size=2, gradient_checkpointing="on")
    assert (kept.micro_batch_size, kept.gradient_checkpointing) == (2, True)
    # Nothing was decided, only checked; the line still says what runs.
    assert kept.reason.startswith("micro batch 2 x accumulation 8 (set), gradient checkpointing on (set); its activations (512 tokens")


def test_a_cpu_micro_batch_stops_where_larger_ran_no_faster(model_dir, monkeypatch):
    monkeypatch.setattr(plan, "free_memory_bytes", lambda device: 400 * GIB)
    cpu = plan.plan_memory(model_dir, "cpu", "bf16", per_device_batch=16, tokens_per_example=256)
    assert cpu.micro_batch_size == plan.CPU_MICRO_BATCH_TOKENS // 256 == 8
    assert "at most 2048 tokens on a CPU" in cpu.reason


def test_auto_precision_is_bf16_only_where_it_is_fast(monkeypatch):
    assert plan.choose_precision("fp32", "cpu", True) == ("fp32", "set in the config")
    assert plan.choose_precision("auto", "cuda", True) == ("bf16", "this cuda supports bf16")
    assert plan.choose_precision("auto", "cuda", False) == ("fp32", "this cuda has no bf16")
    with pytest.raises(LoraflowError, match="precision bf16 requested, but this cuda does not support bf16; use precision: fp16 or auto"):
        plan.choose_precision("bf16", "cuda", False)
    monkeypatch.setattr(plan, "cpu_has_fast_bf16", lambda: True)
    assert plan.choose_precision("auto", "cpu", True) == ("bf16", "this CPU has AVX512-BF16/AMX instructions")
    monkeypatch.setattr(plan, "cpu_has_fast_bf16", lambda: False)
    assert plan.choose_precision("auto", "cpu", True)[0] == "fp32"
