"""Keys cover everything an output depends on: the tokenizer as built, not only its files; and a
tokenizer that does not fit the model stops before quantization, with a message naming both."""

import json
import shutil
from pathlib import Path

import pytest

from loraflow import stages
from loraflow.errors import LoraflowError
from loraflow.launch import Topology, build_command, run_streaming
from test_sft_pipeline import sft_config


def _variant(tiny_model: Path, folder: Path, model_type: str, architecture: str, **config_changes) -> Path:
    """A copy of the built model with byte-identical tokenizer files and another model_type: with no
    tokenizer_class in tokenizer_config.json, transformers picks the tokenizer class from model_type."""
    shutil.copytree(tiny_model, folder)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.pop("tokenizer_class", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    config = json.loads((folder / "config.json").read_text()) | {"model_type": model_type, "architectures": [architecture], **config_changes}
    (folder / "config.json").write_text(json.dumps(config))
    if model_type == "qwen2":  # Qwen2's query, key and value projections have biases Llama's weights lack: zeros, not
        # whatever memory an uninitialised tensor holds (it gave NaN gradients on one machine)
        from safetensors.torch import load_file, save_file
        import torch

        [weights] = folder.glob("*.safetensors")
        tensors = load_file(str(weights))
        for name in [name for name in tensors if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))]:
            tensors[name.replace(".weight", ".bias")] = torch.zeros(tensors[name].shape[0], dtype=tensors[name].dtype)
        save_file(tensors, str(weights), metadata={"format": "pt"})
    return folder


def test_identical_tokenizer_files_built_as_different_tokenizers_get_different_dataset_keys(tiny_model, tmp_path):
    llama = _variant(tiny_model, tmp_path / "llama", "llama", "LlamaForCausalLM")
    qwen2 = _variant(tiny_model, tmp_path / "qwen2", "qwen2", "Qwen2ForCausalLM")
    mistral = _variant(tiny_model, tmp_path / "mistral", "mistral", "MistralForCausalLM")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (llama / name).read_bytes() == (qwen2 / name).read_bytes() == (mistral / name).read_bytes()
    store = tmp_path / "store"  # one shared store
    runs = {}
    for model in (llama, qwen2, mistral):
        config = sft_config(model, store).for_run()
        config = config.model_copy(update={"train": config.train.model_copy(update={"max_steps": 2, "save_steps": 2, "eval_steps": 2})})
        sources = stages.inspect_sources(config)
        runs[model.name] = (config, sources, stages.dataset_key(config, sources))
    assert runs["llama"][1].metrics["tokenizer_class"] != runs["qwen2"][1].metrics["tokenizer_class"]
    assert runs["llama"][2] != runs["qwen2"][2]  # built differently: two datasets
    assert runs["llama"][2] == runs["mistral"][2]  # built the same way: one dataset, shared
    for name in ("llama", "qwen2"):
        config = runs[name][0]
        shared, key, run, spec_uri = stages.prepare_training(config, log=lambda _: None)
        lines = []
        assert run_streaming(build_command(Topology(), spec_uri), lines.append, timeout=300, forkable=True) == 0, "\n".join(lines)[-3000:]
        assert stages.trained_record(shared, key, run, reused=False).metrics["global_step"] == 2


def test_a_tokenizer_that_does_not_fit_the_model_stops_before_quantization(tiny_model, tmp_path):
    small = _variant(tiny_model, tmp_path / "small", "llama", "LlamaForCausalLM", vocab_size=300)
    config = sft_config(small, tmp_path / "store").for_run()
    sources = stages.inspect_sources(config)
    dataset = stages.prepare_data(config, sources, log=lambda _: None)
    with pytest.raises(LoraflowError) as error:
        stages.check_token_ids(dataset, sources)
    message = str(error.value)
    assert f"token id {dataset.metrics['max_token_id']} in the tokenized data ({dataset.uri}) is outside the model's vocabulary of 300" in message
    assert f"(vocab_size in {small}/config.json): the tokenizer (TokenizersBackend, 2048 tokens) does not belong to this model" in message
    stages.check_token_ids(dataset, stages.inspect_sources(sft_config(tiny_model, tmp_path / "store").for_run()))  # 2048 fits


def test_chatml_markers_that_are_not_tokens_are_warned_about(tiny_model, tmp_path, shared_data):
    config = sft_config(tiny_model, tmp_path / "store", path=str(shared_data / "sharegpt_dummy_conversation.json"),
                        format="sharegpt", template="chatml", val_set_size=2).for_run()
    logged = []
    dataset = stages.prepare_data(config, stages.inspect_sources(config), log=logged.append)
    assert dataset.metrics["template_markers_split"] == ["<|im_start|>", "<|im_end|>"]
    [warning] = [line for line in logged if line.startswith("warning:")]
    assert "the chatml template's markers <|im_start|>, <|im_end|> are not tokens of this tokenizer" in warning


def test_user_errors_are_not_retried_and_other_failures_are():
    from prefect.states import Failed

    from tasks.common import retry_unless_user_error

    assert retry_unless_user_error(None, None, Failed(data=LoraflowError("data.path: no rows"))) is False
    assert retry_unless_user_error(None, None, Failed(data=RuntimeError("the training process was killed by signal 9"))) is True


@pytest.mark.parametrize("stage, library", [("dataset", "tokenizers"), ("base", "bitsandbytes")])
def test_a_library_upgrade_that_can_change_a_stage_s_bytes_rebuilds_it(stage, library, tiny_model, tmp_path, monkeypatch):
    """A tokenizers upgrade that changes token ids, or a bitsandbytes one that changes the NF4 layout, must not reuse
    the outputs the old versions made: the versions are part of the stage's key."""
    import importlib.metadata

    from loraflow.registry import BY_NAME

    config = sft_config(tiny_model, tmp_path / "store").for_run()
    env, sources = stages.env_check(config), stages.inspect_sources(config)

    def build():
        if stage == "dataset":
            return stages.prepare_data(config, sources, log=lambda _: None)
        return stages.quantize_base(config, env, sources, log=lambda _: None)

    first = build()
    assert build().uri == first.uri  # the same versions: reused
    installed = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "999.0" if name == library else installed(name))
    assert library in BY_NAME[stage].libraries
    upgraded = build()
    assert upgraded.key != first.key and upgraded.uri != first.uri and not upgraded.reused
