"""The training plan: what `auto` decides (micro batch, gradient checkpointing, precision) and why."""

import json
import os
import subprocess
import sys

import pytest
import torch

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
    monkeypatch.delenv(plan.CPU_BF16_SETTING, raising=False)
    assert plan.choose_precision("fp32", "cpu") == ("fp32", "set in the config")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert plan.choose_precision("auto", "cuda") == ("bf16", "this cuda supports bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert plan.choose_precision("auto", "cuda") == ("fp32", "this cuda has no bf16")
    with pytest.raises(LoraflowError, match="precision bf16 requested, but this cuda does not support bf16; use precision: fp16 or auto"):
        plan.choose_precision("bf16", "cuda")
    monkeypatch.setattr(plan, "cpu_has_fast_bf16", lambda: True)
    assert plan.choose_precision("auto", "cpu") == ("bf16", "this CPU has AVX512-BF16/AMX instructions")
    monkeypatch.setattr(plan, "cpu_has_fast_bf16", lambda: False)
    assert plan.choose_precision("auto", "cpu") == (
        "fp32", "this CPU has no AVX512-BF16/AMX instructions (bf16 would be emulated, slower than fp32)")
    assert plan.choose_precision("bf16", "cpu") == ("bf16", "set in the config")  # emulated, but it runs


def test_the_cpu_bf16_setting_decides_as_the_other_kind_of_cpu_would(monkeypatch):
    for detected in (True, False):
        monkeypatch.setattr(plan, "cpu_has_fast_bf16", lambda: detected)
        monkeypatch.setenv(plan.CPU_BF16_SETTING, "0")
        assert plan.choose_precision("auto", "cpu") == ("fp32", "LORAFLOW_CPU_BF16=0: decided as if this CPU has no "
                                                        "AVX512-BF16/AMX instructions (bf16 would be emulated, slower than fp32)")
        monkeypatch.setenv(plan.CPU_BF16_SETTING, "1")
        assert plan.choose_precision("auto", "cpu") == ("bf16", "LORAFLOW_CPU_BF16=1: decided as if this CPU has AVX512-BF16/AMX instructions")
        monkeypatch.setenv(plan.CPU_BF16_SETTING, "auto")
        assert plan.choose_precision("auto", "cpu")[0] == ("bf16" if detected else "fp32")
    monkeypatch.setenv(plan.CPU_BF16_SETTING, "yes")
    with pytest.raises(LoraflowError, match=r"LORAFLOW_CPU_BF16='yes': use 0 \(decide as on a CPU without AVX512-BF16/AMX: fp32\)"):
        plan.choose_precision("auto", "cpu")


def test_doctor_plan_and_the_env_check_give_one_precision_answer(tmp_path, monkeypatch):
    """`loraflow doctor`, `loraflow plan` and the env check every run starts with say the same precision and reason
    (doctor said `bf16_supported: true` where every run said fp32). Under the setting, so as not to depend on the host;
    the reason shows the setting was read (the trainer's side: tests/test_evaluation.py's cpu_bf16 runs)."""
    from loraflow.config_loader import build_config
    from loraflow.envcheck import check_environment

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({**LLAMA_2_7B, "hidden_size": 64, "intermediate_size": 128,
                                                            "num_hidden_layers": 2, "vocab_size": 1000}))
    (tmp_path / "c.yaml").write_text(f"model: {{base: {tmp_path / 'm'}}}\ndata: {{path: d.json}}\n")
    env = {**os.environ, plan.CPU_BF16_SETTING: "0", "CUDA_VISIBLE_DEVICES": ""}
    doctor = json.loads(subprocess.run([sys.executable, "-m", "loraflow.cli", "doctor"], capture_output=True, text=True,
                                       env=env, check=True).stdout)
    expected = ("fp32", "LORAFLOW_CPU_BF16=0: decided as if this CPU has no AVX512-BF16/AMX instructions (bf16 would be "
                "emulated, slower than fp32)")
    assert (doctor["precision"], doctor["precision_reason"]) == expected
    said = subprocess.run([sys.executable, "-m", "loraflow.cli", "plan", str(tmp_path / "c.yaml")], capture_output=True,
                          text=True, env=env).stdout
    assert f"on cpu ({expected[0]}: {expected[1]})" in said
    monkeypatch.setenv(plan.CPU_BF16_SETTING, "0")
    report = check_environment(build_config({"model": {"base": str(tmp_path / "m")}, "data": {"path": "d.json"}}))
    assert (report["precision"], report["precision_reason"]) == expected


# ---- the footprint before loading -----------------------------------------------------------------
LLAMA_2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
              "max_position_embeddings": 4096}


@pytest.fixture
def llama_7b(tmp_path):
    """Llama-2-7B's config.json alone: no weights exist, and none are read."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_2_7B))
    return tmp_path


def _config(tmp_path, **train):
    from loraflow.config_loader import build_config

    return build_config({"storage": str(tmp_path), "model": {"base": "unused"}, "data": {"path": "d.json", "cutoff_len": 256},
                         "train": {"micro_batch_size": 2, "batch_size": 16, **train}})


def test_the_estimate_of_a_7b_qlora_counts_nf4_weights_and_the_adapter_exactly(llama_7b, tmp_path):
    estimate = plan.estimate_memory(_config(tmp_path, gradient_checkpointing="on"), llama_7b, "bf16")
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # q, k, v, o and gate, up, down of every layer
    unquantized = 2 * 32000 * 4096 + (2 * 32 + 1) * 4096  # embeddings, head, norms (bf16)
    assert estimate.parts["weights"] == pytest.approx(linear * (0.5 + 1 / 64 + 4 / (64 * 256)) + unquantized * 2)
    assert 3.5 * GIB < estimate.parts["weights"] < 3.7 * GIB  # (the QLoRA paper's 7B base: about 3.9 GB, 3.6 GiB)
    lora_r8 = 32 * 8 * (4 * (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096))  # r x (in + out) of each projection
    assert lora_r8 == 19_988_480
    assert (estimate.parts["adapter"], estimate.parts["gradients"], estimate.parts["optimizer"]) == (lora_r8 * 4, lora_r8 * 4, lora_r8 * 8)
    assert estimate.parts["activations"] == plan.activation_bytes(LLAMA_2_7B, 2 * 256, 2, checkpointing=True)


def test_zero_2_splits_gradients_and_optimizer_state_over_the_ranks(llama_7b, tmp_path):
    one = plan.estimate_memory(_config(tmp_path), llama_7b, "bf16")
    two = plan.estimate_memory(_config(tmp_path, launcher="deepspeed", nproc_per_node=2, deepspeed_zero=2), llama_7b, "bf16")
    assert two.parts["weights"] == one.parts["weights"] and two.parts["gradients"] == one.parts["gradients"] / 2
    assert two.parts["optimizer"] == one.parts["optimizer"] / 2 and "ZeRO-2 over 2 ranks" in two.lines()[-1]


def test_a_config_that_cannot_fit_stops_in_the_env_check_with_what_would_make_it_fit(llama_7b, tmp_path, monkeypatch):
    """The estimate is a lower bound: settings given in the config that exceed the free memory cannot fit (stop);
    settings on auto are decided as the trainer will decide them, for the memory there is."""
    from loraflow import envcheck, plan

    # (the precision and the free memory set: auto would decide them from the host, and the figures would follow)
    config = _config(tmp_path, gradient_checkpointing="off", precision="bf16").model_copy(deep=True)
    config.model.base = str(llama_7b)
    for module in (envcheck, plan):
        monkeypatch.setattr(module, "free_memory_bytes", lambda device: 6 * GIB)
    with pytest.raises(LoraflowError, match=r"training needs at least [\d.]+ GiB on this cpu and 6.00 GiB are free: it does not "
                                             r"fit \(weights 3.6\d GiB, .*\)\. Try: train.gradient_checkpointing: on \(or auto\); "
                                             r"a smaller train.micro_batch_size \(or 0: auto\); a shorter data.cutoff_len \(now 256 "
                                             r"tokens an example\); a device with more memory$"):
        envcheck.check_environment(config)
    auto = config.model_copy(update={"train": config.train.model_copy(update={"gradient_checkpointing": "auto", "micro_batch_size": 0})})
    assert envcheck.check_environment(auto)["memory"].startswith("training needs at least ")  # auto checkpoints to fit
    long = auto.model_copy(update={"data": auto.data.model_copy(update={"cutoff_len": 8192})})
    for module in (envcheck, plan):
        monkeypatch.setattr(module, "free_memory_bytes", lambda device: 400 * GIB)
    assert envcheck.check_environment(long)["memory"].startswith(
        "warning: data.cutoff_len 8192 is beyond the model's context window of 4096 tokens (max_position_embeddings); ")


def test_a_separate_dpo_reference_counts_a_second_base_and_the_advice_names_the_dpo_lengths(llama_7b, tmp_path):
    from loraflow.config_loader import build_config

    config = build_config({"objective": "dpo", "storage": str(tmp_path), "model": {"base": "unused"}, "data": {"path": "d.json"},
                           "dpo": {"reference": "separate", "max_length": 1536}, "train": {"micro_batch_size": 4, "gradient_checkpointing": "off"}})
    estimate = plan.estimate_memory(config, llama_7b, "bf16")
    assert estimate.parts["reference"] == estimate.parts["weights"] and estimate.tokens_per_example == 3072
    fits, said = plan.check_fits(estimate, "xpu", 8 * GIB)
    assert not fits and "a shorter dpo.max_length (now 3072 tokens a pair: chosen and rejected)" in said
    assert "dpo.reference: precomputed (no second copy of the base)" in said and "more cards or hosts with DeepSpeed ZeRO-2" in said


def test_loraflow_plan_prints_the_parts_without_loading_anything(llama_7b, tmp_path, capsys):
    import yaml

    from loraflow.cli import main

    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"model": {"base": str(llama_7b)}, "data": {"path": "d.json"},
                                                     "storage": str(tmp_path)}))
    code = main(["plan", str(tmp_path / "c.yaml"), "--set", "train.micro_batch_size=1"])
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()[1:7]] == ["weights", "adapter", "gradients", "optimizer", "activations", "total"]
    assert "GiB per process, at least (micro batch 1 x 256 tokens" in out
    assert code == (0 if "fits: " in out else 1)
