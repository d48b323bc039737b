"""Every adapter method (lora.method and the LoRA variants) through PEFT: it trains, its saved folder loads on the
original base with PeftModel.from_pretrained and reproduces the trained model, and mergeable methods merge."""

import pytest
import torch

from loraflow import adapters
from loraflow.adapters import Ia3Adapter, LoraAdapter, PrefixTuningAdapter, PromptTuningAdapter, VeraAdapter
from loraflow.models import native
from loraflow.objectives import OBJECTIVES

METHODS = {
    "lora": LoraAdapter(),
    "dora": LoraAdapter(use_dora=True),
    "rslora": LoraAdapter(use_rslora=True, r=16),
    "lora-gaussian-init": LoraAdapter(init="gaussian"),
    "ia3": Ia3Adapter(),
    "prompt-tuning": PromptTuningAdapter(num_virtual_tokens=8, prompt_init_text="Answer the question:"),
    "prefix-tuning": PrefixTuningAdapter(num_virtual_tokens=8),
    "vera": VeraAdapter(),
}


def test_every_registered_method_is_tested_here():
    """The tests below run every entry of METHODS: a method registered in loraflow.adapters without one is untested."""
    assert {settings.method for settings in METHODS.values()} == set(adapters.NAMES)


def _load(tiny_model, quantized: bool):
    bnb = native.bnb_config(False, "fp32") if quantized else None
    model = native.load_causal_lm(tiny_model, "cpu", "fp32", bnb)
    return native.prepare_for_training(model, quantized=quantized, gradient_checkpointing=False)


def _batch(tokenizer):
    texts = ["The capital of France is Paris.", "Two plus two is four, and three plus three is six."]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {**batch, "labels": labels}


@pytest.mark.parametrize("name", METHODS)
def test_each_method_trains_and_its_saved_adapter_reproduces_the_trained_model(name, tiny_model, tokenizer, tmp_path):
    from peft import PeftModel

    settings = METHODS[name]
    model, report = native.inject_adapter(_load(tiny_model, quantized=False), settings, seed=0, tokenizer_dir=tiny_model)
    assert report["method"] == settings.method and 0 < report["trainable_params"] < report["total_params"]
    batch = _batch(tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    model.train()
    for _ in range(6):
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0] * 0.9, losses  # it learns
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.save_pretrained(str(tmp_path / "adapter"))
    # Generation (loraflow generate, the evaluation stage) answers with the trained adapter: its first token is the
    # forward pass's most likely one (prefix tuning: not the base's, which transformers' own cache would give).
    from loraflow.generate import answer

    prompt = tokenizer(["The capital of France"], return_tensors="pt")
    with torch.no_grad():
        expected = int(model(**prompt).logits[0, -1].argmax())
        with model.disable_adapter():
            assert expected != int(model(**prompt).logits[0, -1].argmax())  # (else this check could not tell them apart)
    assert answer(model, tokenizer, ["The capital of France"], max_new_tokens=1) == [tokenizer.decode([expected], skip_special_tokens=True)]
    tokenizer.padding_side = "right"

    loaded = PeftModel.from_pretrained(native.load_causal_lm(tiny_model, "cpu", "fp32", None), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        again = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert torch.allclose(again, trained, atol=1e-5), (again - trained).abs().max()
        if adapters.method(settings.method).merges:
            merged = loaded.merge_and_unload()
            assert torch.allclose(merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, trained, atol=1e-4)


@pytest.mark.parametrize("name", METHODS)
def test_each_method_trains_on_an_nf4_base(name, tiny_model, tokenizer, tmp_path):
    """QLoRA with every method: gradients reach every trained parameter through the 4-bit layers, a few steps lower the
    loss, the saved adapter loads on a fresh NF4 base (PeftModel.from_pretrained) to the same logits, and a method that
    merges folds into the full-precision base (as the merge stage does) to that base + adapter's logits."""
    from peft import PeftModel

    settings = METHODS[name]
    model, _ = native.inject_adapter(_load(tiny_model, quantized=True), settings, seed=0, tokenizer_dir=tiny_model)
    batch = _batch(tokenizer)
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = [float(loss)]
    for _ in range(3):
        optimizer.step()
        optimizer.zero_grad()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses
    model.eval()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        trained = model(**inputs).logits
    model.save_pretrained(str(tmp_path / "adapter"))

    loaded = PeftModel.from_pretrained(_load(tiny_model, quantized=True), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, trained, atol=1e-5), (loaded(**inputs).logits - trained).abs().max()
    if adapters.method(settings.method).merges:
        full = PeftModel.from_pretrained(native.load_causal_lm(tiny_model, "cpu", "fp32", None), str(tmp_path / "adapter")).eval()
        with torch.no_grad():
            expected = full(**inputs).logits
            assert torch.allclose(full.merge_and_unload()(**inputs).logits, expected, atol=1e-4)


def test_prompt_tuning_starts_from_the_texts_embeddings(tiny_model, tokenizer):
    settings = PromptTuningAdapter(num_virtual_tokens=8, prompt_init_text="Answer the question:")
    model, _ = native.inject_adapter(_load(tiny_model, quantized=False), settings, seed=0, tokenizer_dir=tiny_model)
    ids = tokenizer("Answer the question:")["input_ids"]  # (as PEFT tokenizes it: with the BOS token)
    expected = (ids * 8)[:8]  # repeated up to num_virtual_tokens
    start = model.prompt_encoder["default"].embedding.weight
    assert torch.equal(start, model.get_input_embeddings().weight[expected])


def test_a_setting_of_another_method_is_refused_with_the_method_it_belongs_to():
    from loraflow.config_loader import build_config
    from loraflow.errors import LoraflowError

    base = {"model": {"base": "m"}, "data": {"path": "d.json"}}
    with pytest.raises(LoraflowError, match=r"lora: use_dora does not apply to method ia3: remove it \(or set the default: --set lora.use_dora=false\), or choose the method lora"):
        build_config({**base, "lora": {"method": "ia3", "use_dora": True}})
    with pytest.raises(LoraflowError, match=r"lora: r does not apply to method prompt-tuning: remove it \(or set the default: --set lora.r=8\), or choose the method lora"):
        build_config({**base, "lora": {"method": "prompt-tuning", "r": 16}})
    with_r = " or ".join(method.name for method in adapters.METHODS if "r" in method.settings.model_fields)  # (lora or vera)
    with pytest.raises(LoraflowError, match=r"lora: r, num_virtual_tokens do not apply to method ia3: remove them \(or set the defaults: "
                                            rf"--set lora.r=8 --set lora.num_virtual_tokens=20\), or choose the method {with_r} for r, "
                                            r"prefix-tuning or prompt-tuning for num_virtual_tokens"):
        build_config({**base, "lora": {"method": "ia3", "r": 16, "num_virtual_tokens": 4}})
    with pytest.raises(LoraflowError, match=r"lora.lora_alpha: Extra inputs are not permitted; did you mean lora.alpha\?"):
        build_config({**base, "lora": {"lora_alpha": 16}})  # (PEFT's and LLaMA-Factory's name)
    with pytest.raises(LoraflowError, match=r"lora: method 'prompt_tuning' is not one of .*; did you mean prompt-tuning\?"):
        build_config({**base, "lora": {"method": "prompt_tuning"}})
    with pytest.raises(LoraflowError, match=r"lora: feedforward does not apply to method lora \(lora.method is not set: LoRA\)"):
        build_config({**base, "lora": {"feedforward": ["down_proj"]}})
    with pytest.raises(LoraflowError, match=r"lora: the lora section is a mapping of settings: for the method write lora: \{method: ia3\}"):
        build_config({**base, "lora": "ia3"})
    with pytest.raises(LoraflowError, match=r"lora: num_virtual_tokens is a setting of prefix-tuning and prompt-tuning, not offered "
                                            r"here \(prefix tuning and prompt tuning are SFT only, as they train virtual tokens: DPO trains"):
        build_config({**base, "objective": "dpo", "lora": {"num_virtual_tokens": 4}})
    assert build_config({**base, "lora": {"target": "q_proj, v_proj"}}).lora.target == ["q_proj", "v_proj"]  # (--set lora.target=q_proj,v_proj)
    with pytest.raises(LoraflowError, match=r"lora: with dpo.start_from, training continues that adapter with its own settings"):
        build_config({**base, "objective": "dpo", "dpo": {"start_from": "sft-1"}, "lora": {"r": 32}})
    dpo_methods = adapters.for_objective("dpo")  # (the registered methods that train weights: lora, ia3, vera)
    with pytest.raises(LoraflowError, match=rf"lora: method 'prefix-tuning' is not one of {', '.join(m.name for m in dpo_methods)} \(prefix "
                                            rf"tuning and prompt tuning are SFT only, as they train virtual tokens: DPO trains "
                                            rf"{adapters.titles(dpo_methods)} adapters\)"):
        build_config({**base, "objective": "dpo", "lora": {"method": "prefix-tuning"}})
    # A setting at its default (a config dumped from LoRA, then switched: a sweep over lora.method) is dropped.
    lora_dump = build_config({**base, "objective": "dpo"}).model_dump(mode="json")["lora"]
    assert lora_dump["r"] == 16  # (the DPO recipe's)
    assert build_config({**base, "objective": "dpo", "lora": {**lora_dump, "method": "ia3"}}).lora.model_dump() == {
        "method": "ia3", "target": "all-linear", "feedforward": "auto"}
    # Each field is checked where it belongs: IA3's own target choices, its feed-forward modules among its targets.
    with pytest.raises(LoraflowError, match=r"lora.target: attention-qv is not a choice of IA3's target: use all-linear"):
        build_config({**base, "lora": {"method": "ia3", "target": "attention-qv"}})
    with pytest.raises(LoraflowError, match=r"lora.target: attention-qv is a choice of its own, not a module name"):
        build_config({**base, "lora": {"target": "attention-qv,o_proj"}})
    with pytest.raises(LoraflowError, match=r"lora: feedforward names fc2, which target does not"):
        build_config({**base, "lora": {"method": "ia3", "target": ["k_proj", "v_proj"], "feedforward": "fc2"}})
    with pytest.raises(LoraflowError, match=r"lora.nope: Extra inputs are not permitted"):
        build_config({**base, "lora": {"method": "ia3", "nope": 1}})


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_the_form_shows_each_method_in_its_own_tab(objective):
    """Prefect's forms show a lora value in the tab (anyOf option) with the most field names in common with it, the first
    on a tie: no method's fields may all be fields of a method before it. (In Chromium: tests/test_browser_ui.py.)"""
    schema = OBJECTIVES[objective].config.model_json_schema(ref_template="#/definitions/{model}")
    options = [schema["$defs"][option["$ref"].rsplit("/", 1)[-1]] for option in schema["properties"]["lora"]["anyOf"]]
    assert "oneOf" not in schema["properties"]["lora"]  # (a oneOf is a raw JSON box in the v1 form)
    assert [option["properties"]["method"]["const"] for option in options][:2] == ["lora", "ia3"]
    for index, option in enumerate(options):
        for earlier in options[:index]:
            assert not set(option["properties"]) <= set(earlier["properties"]), (option["title"], earlier["title"])


@pytest.mark.slow
@pytest.mark.parametrize("lora", [{"method": "ia3"}, {"method": "prompt-tuning", "num_virtual_tokens": 8},
                                  {"method": "prefix-tuning", "num_virtual_tokens": 8}], ids=lambda lora: lora["method"])
def test_the_sft_flow_trains_exports_and_merges_each_method(prefect_server, tiny_model, tmp_path, lora):
    """Through every stage on a plain base: the loss goes down, the exported adapter loads with PEFT onto the original
    base, the evaluation stage generates with it and without it, IA3 is merged (the merge stage checks its logits), prompt and prefix tuning are not (and train padded), and
    the summary names the method with its trainable parameters. (LoRA and its variants: tests/test_sft_pipeline.py
    and the in-process tests above.)"""
    import json
    from pathlib import Path

    from peft import PeftModel

    from loraflow.config_loader import build_config
    from test_sft_pipeline import run_sft, sft_config

    tree = sft_config(tiny_model, tmp_path / "store").model_dump(mode="json")
    tree["model"]["quantization"] = "none"
    tree["lora"] = lora
    tree["data"]["val_set_size"] = 8
    # The evaluation stage too: generation and the forgetting check with the adapter on and off.
    (tmp_path / "tasks.jsonl").write_text(json.dumps({"prompt": "What is 2 plus 2?", "answer": "4"}) + "\n")
    (tmp_path / "general.txt").write_text("The river runs to the sea.\n")
    tree["evaluation"] = {"tasks_path": str(tmp_path / "tasks.jsonl"), "general_text_path": str(tmp_path / "general.txt"),
                          "max_new_tokens": 4}
    tree["train"].update(batch_size=4, micro_batch_size=4, max_steps=4, eval_steps=4, save_steps=4, learning_rate=5e-2)
    records, states = run_sft(build_config(tree))
    train = records["train"].metrics
    assert train["final_loss"] < train["first_loss"] and train["eval_loss"] < train["eval_loss_before"], train
    method = lora["method"]
    evaluation = records["evaluation"].metrics
    assert evaluation["task_rows"] == 1 and evaluation["general_loss_after"] != evaluation["general_loss_before"]
    assert records["lora"].metrics["method"] == method
    adapter = json.loads(Path(records["adapter"].uri, "adapter_config.json").read_text())
    assert adapter["peft_type"] == {"ia3": "IA3", "prompt-tuning": "PROMPT_TUNING", "prefix-tuning": "PREFIX_TUNING"}[method]
    model = PeftModel.from_pretrained(native.load_causal_lm(tiny_model, "cpu", "fp32", None), records["adapter"].uri)
    assert model.peft_config["default"].peft_type.value == adapter["peft_type"]
    summary = Path(records["adapter"].uri).parent.joinpath("summary.md").read_text()
    trainable = f"{records['lora'].metrics['trainable_params']:,} trainable of"
    if method in ("prompt-tuning", "prefix-tuning"):
        assert "merged" not in records and states.get("merged") is None
        from loraflow.errors import LoraflowError
        from loraflow.generate import generate

        with pytest.raises(LoraflowError, match=f"has no merged model \\(its adapter is {method.replace('-', ' ')}, which cannot be merged\\)"):
            generate(tree["storage"], Path(records["adapter"].uri).parent.name, ["Hi"], max_new_tokens=2, merged=True)
        assert f"with 8 virtual tokens: {trainable}" in summary and "- not merged: " in summary
        assert f"padded micro batches ({method.replace('-', ' ')} puts its virtual tokens before every row)" in summary
    else:
        assert records["merged"].metrics["max_abs_logit_diff"] <= records["merged"].metrics["tolerance"]
        assert f"IA3 on down_proj, k_proj, v_proj: {trainable}" in summary


@pytest.mark.slow
def test_new_tokens_become_single_trained_tokens_of_the_adapter_and_the_merged_model(prefect_server, tiny_model, tmp_path):
    """chatml conversations on a base whose tokenizer lacks the chatml markers, as QLoRA (NF4 base): with data.new_tokens
    each marker is one token, the embeddings and output head grow and train with the adapter, and the merged model has
    them."""
    import json
    from pathlib import Path

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraflow.config_loader import build_config
    from conftest import SAMPLE
    from test_sft_pipeline import run_sft, sft_config

    conversations = tmp_path / "chats.json"
    conversations.write_text(json.dumps([{"messages": [{"role": "user", "content": row["instruction"]},
                                                       {"role": "assistant", "content": row["output"]}]}
                                         for row in json.loads(Path(SAMPLE).read_text())[:48]]))
    markers = ["<|im_start|>", "<|im_end|>"]
    tree = sft_config(tiny_model, tmp_path / "store", path=str(conversations), format="messages", template="chatml",
                      val_set_size=8).model_dump(mode="json")
    tree["data"]["new_tokens"] = markers
    tree["train"].update(batch_size=4, micro_batch_size=4, max_steps=4, eval_steps=4, save_steps=4, learning_rate=5e-2)
    records, _ = run_sft(build_config(tree))

    dataset = records["dataset"].metrics
    assert dataset["template_markers_split"] == [] and dataset["new_token_ids"] == {"<|im_start|>": 2048, "<|im_end|>": 2049}
    assert records["base"].metrics["quantization"] == "nf4"
    tokenizer = AutoTokenizer.from_pretrained(records["adapter"].uri)
    assert [tokenizer(marker, add_special_tokens=False)["input_ids"] for marker in markers] == [[2048], [2049]]

    def embedding_rows(folder):
        with safe_open(str(Path(folder, "adapter_model.safetensors")), "pt") as tensors:
            assert [key for key in tensors.keys() if "lora_" not in key] == [  # each trained once, nothing else
                "base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"]
            return tensors.get_tensor("base_model.model.model.embed_tokens.weight")

    [initial] = (tmp_path / "store" / "lora").glob("*/adapter")
    before, after = embedding_rows(initial), embedding_rows(records["adapter"].uri)
    assert before.shape == after.shape == (2050, 128)
    assert not torch.allclose(before[2048:], after[2048:])  # the new tokens' embeddings were trained
    merged = AutoModelForCausalLM.from_pretrained(records["merged"].uri)
    assert merged.get_input_embeddings().num_embeddings == 2050 and merged.get_output_embeddings().out_features == 2050
    assert torch.allclose(merged.get_input_embeddings().weight[2048:], after[2048:].float())


@pytest.mark.slow
def test_dpo_trains_an_ia3_adapter(tiny_model, tmp_path, cpu_bf16):
    """DPO with IA3: TRL's reference is the policy with the adapter off, so a fresh IA3 adapter (all ones) starts with
    rewards of exactly zero, and the rewards move apart as it trains (in fp32 and under bf16 autocast: precision auto
    decides as on either kind of CPU, the cpu_bf16 fixture)."""
    import json
    from pathlib import Path

    from conftest import REPO
    from loraflow import stages
    from loraflow.config_loader import build_config
    from loraflow.launch import Topology, build_command, run_streaming

    config = build_config({
        "name": "prefs", "objective": "dpo", "storage": str(tmp_path / "store"), "model": {"base": str(tiny_model)},
        "data": {"path": str(REPO / "loraflow/data/sample/orca_dpo_pairs_sample.jsonl"), "val_set_size": 0},
        "dpo": {"max_prompt_length": 64, "max_length": 128, "reference": "adapter-disabled"}, "lora": {"method": "ia3"},
        "train": {"learning_rate": 1e-2, "batch_size": 4, "micro_batch_size": 4, "max_steps": 4, "save_steps": 4,
                  "warmup": 0, "lr_scheduler": "constant", "gradient_checkpointing": "off"}})
    _, _, run, spec_uri = stages.prepare_training(config, log=lambda _: None)
    lines: list[str] = []
    assert run_streaming(build_command(Topology(), spec_uri), lines.append, timeout=300, forkable=True) == 0, "\n".join(lines[-30:])
    steps = [row for row in map(json.loads, Path(run, "metrics", "metrics.jsonl").read_text().splitlines()) if "rewards/margins" in row]
    assert steps[0]["rewards/margins"] == 0 and steps[-1]["rewards/margins"] > 0
    assert json.loads(Path(run, "checkpoints", "final", "adapter_config.json").read_text())["peft_type"] == "IA3"
    # Trained in fp32 on the NF4 base (TRL casts to bf16, where IA3's scales near 1 cannot take a small step).
    from safetensors.torch import load_file

    trained = load_file(str(Path(run, "checkpoints", "final", "adapter_model.safetensors")))
    assert trained and all(tensor.dtype == torch.float32 for tensor in trained.values()), {k: t.dtype for k, t in trained.items()}
