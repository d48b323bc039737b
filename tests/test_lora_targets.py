"""LoRA target presets resolve on the real module names of several architectures."""

import pytest
import torch

from loraflow.adapters import LoraAdapter
from loraflow.errors import LoraflowError
from loraflow.adapters.targets import target_modules
from loraflow.models.native import inject_adapter

SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
LLAMA_LIKE = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def build(kind):
    import transformers as t

    if kind == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=4))
    config_class, model_class = {
        "llama": (t.LlamaConfig, t.LlamaForCausalLM),
        "mistral": (t.MistralConfig, t.MistralForCausalLM),
        "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM),
        "gemma": (t.GemmaConfig, t.GemmaForCausalLM),
    }[kind]
    extra = {"head_dim": 8} if kind == "gemma" else {}
    return model_class(config_class(**SMALL, **extra))


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "gemma"])
def test_llama_style_names(kind):
    model = build(kind)
    assert target_modules(model, "all-linear") == LLAMA_LIKE
    assert target_modules(model, "attention-qv") == ["q_proj", "v_proj"]


def test_gpt2_conv1d_names_and_the_head_is_never_a_target():
    model = build("gpt2")
    assert target_modules(model, "all-linear") == ["c_attn", "c_fc", "c_proj"]
    assert target_modules(model, "attention-qv") == ["c_attn"]
    assert "lm_head" not in target_modules(model, "all-linear")


def test_explicit_list_is_checked_against_the_model():
    model = build("llama")
    assert target_modules(model, ["q_proj", "k_proj"]) == ["q_proj", "k_proj"]
    with pytest.raises(LoraflowError, match="c_attn, which this model does not have; its linear layers are: down_proj"):
        target_modules(model, ["q_proj", "c_attn"])


def test_injection_counts_trainable_parameters_and_is_seeded():
    first, report = inject_adapter(build("llama"), LoraAdapter(), seed=7)
    # r=8 on 7 projections of one layer: q(32→32), k(32→16), v(32→16), o(32→32), gate/up(32→64), down(64→32)
    expected = sum(8 * (i + o) for i, o in [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)])
    assert report["trainable_params"] == expected and report["total_params"] > expected
    second, _ = inject_adapter(build("llama"), LoraAdapter(), seed=7)
    a = dict(first.named_parameters())
    b = dict(second.named_parameters())
    lora_a = [n for n in a if "lora_A" in n]
    assert lora_a and all(torch.equal(a[n], b[n]) for n in lora_a)


@pytest.mark.parametrize("kind, qv", [("gpt2", ["c_attn"]), ("qwen2", ["q_proj", "v_proj"])])
def test_targets_resolve_from_the_config_alone_and_a_fused_projection_is_named_as_such(kind, qv, tmp_path):
    from loraflow.adapters.targets import describe_targets
    from loraflow.models.native import targets_without_weights

    build(kind).config.save_pretrained(tmp_path)  # config.json only: no weight file exists
    assert targets_without_weights(tmp_path, LoraAdapter(target="attention-qv")) == qv
    with pytest.raises(LoraflowError, match="lora.target names nope, which this model does not have"):
        targets_without_weights(tmp_path, LoraAdapter(target=["nope"]))
    assert describe_targets(["c_attn"]) == "c_attn (query, key and value in one fused projection, a Conv1D in GPT-2)"
    assert describe_targets(["q_proj", "v_proj"]) == "q_proj, v_proj"


def test_one_module_name_is_a_list_of_one():  # `--set lora.target=q_proj`
    assert LoraAdapter(target="q_proj").target == ["q_proj"] and LoraAdapter(target="attention-qv").target == "attention-qv"


def test_ia3_feedforward_modules_are_peft_s_or_the_ones_named():
    from loraflow.adapters import Ia3Adapter
    from loraflow.models.native import adapter_config

    model = build("llama")
    automatic = adapter_config(model, Ia3Adapter())  # PEFT's modules for Llama
    assert set(automatic.target_modules) == {"k_proj", "v_proj", "down_proj"} and set(automatic.feedforward_modules) == {"down_proj"}
    by_name = adapter_config(model, Ia3Adapter(target=["k_proj", "up_proj"]))  # among a list: the down projections, none here
    assert set(by_name.target_modules) == {"k_proj", "up_proj"} and not by_name.feedforward_modules
    named = adapter_config(model, Ia3Adapter(target=["k_proj", "up_proj"], feedforward=["up_proj"]))
    assert set(named.feedforward_modules) == {"up_proj"}
    model, _ = inject_adapter(model, Ia3Adapter(target=["k_proj", "up_proj"], feedforward="up_proj"), seed=0)
    up = model.base_model.model.model.layers[0].mlp.up_proj
    assert up.is_feedforward and up.ia3_l["default"].shape == (1, 32)  # rescales the input (32), not the output (64)
    with pytest.raises(LoraflowError, match=r"lora.feedforward names gate_proj, which IA3 does not target on llama \(its "
                                            r"targets: k_proj, v_proj, down_proj\)"):
        adapter_config(build("llama"), Ia3Adapter(feedforward=["gate_proj"]))
