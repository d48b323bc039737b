"""DPO end to end on the built model and real hh-rlhf pairs, under a Prefect test server: the rewards move the right
way, the reference log-probs are a cached stage (no reference pass in training, a retry or a new beta), and a
precomputed reference equals the recipe's separate reference copy."""

import json
from pathlib import Path

import pytest
import torch

from loraflow import stages
from loraflow.config_loader import build_config
from loraflow.registry import LORA
from loraflow.storage import ArtifactStore
from tasks.runs import task_states

pytestmark = pytest.mark.slow


def dpo_config(model: Path, store: Path, data: Path, **dpo) -> dict:
    return {
        "name": "prefs", "objective": "dpo", "storage": str(store), "model": {"base": str(model)},
        "data": {"path": str(data)},
        "dpo": {"max_prompt_length": 64, "max_length": 128, **dpo},
        # Raised learning rate and few pairs: the policy must learn to prefer every chosen answer within a few steps.
        "train": {"learning_rate": 1e-2, "batch_size": 8, "micro_batch_size": 4, "max_steps": 8, "save_steps": 4,
                  "warmup": 0, "lr_scheduler": "constant", "gradient_checkpointing": "off"},
        "merge": {"check_rows": 2},
    }


def run_dpo(config: dict):
    from flows.dpo import dpo

    state = dpo(build_config(config), return_state=True)
    assert state.is_completed(), state.message
    return state.result(), task_states(state.state_details.flow_run_id)


@pytest.fixture(scope="module")
def hh_pairs(shared_data, tmp_path_factory) -> Path:
    lines = (shared_data / "hh_rlhf_harmless_base_test_1k.jsonl").read_text().splitlines()[:16]
    path = tmp_path_factory.mktemp("prefs") / "hh16.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def first_dpo(prefect_server, tiny_model, hh_pairs, tmp_path_factory):
    """The first attempt of training fails after checkpoint-4 (injected); the task's retry resumes from it."""
    store = tmp_path_factory.mktemp("dpo") / "store"
    config = dpo_config(tiny_model, store, hh_pairs)
    # The evaluation stage after a DPO run: task prompts (chat template) and the forgetting check.
    tasks = store.parent / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"Is it safe to {verb}?", "answer": "No."}) + "\n" for verb in ("swim", "cook", "fly")))
    (store.parent / "general.txt").write_text("The river runs to the sea.\nMarkets open at nine.\n")
    config["evaluation"] = {"tasks_path": str(tasks), "general_text_path": str(store.parent / "general.txt"), "max_new_tokens": 6}
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("LORAFLOW_TEST_FAIL_AT_STEP", "6")
    try:
        records, states = run_dpo(config)
    finally:
        monkeypatch.undo()
    return {"config": config, "records": records, "states": states, "store": ArtifactStore(str(store))}


def test_dpo_trains_the_policy_to_prefer_the_chosen_answers(first_dpo, tiny_model):
    records, store = first_dpo["records"], first_dpo["store"]
    assert {"dataset", "base", "lora", "reference", "train", "adapter", "merged"} <= set(records)
    stats = records["dataset"].metrics
    assert stats["format"] == "pairs" and stats["rows_kept"] == 16 and stats["template"] == "chatml"
    train = records["train"].metrics
    assert train["objective"] == "dpo" and train["resumed_from"].endswith("/checkpoints/checkpoint-4")
    assert train["reference_forwards"] == 0  # the reference log-probs came from the reference stage
    run = records["adapter"].uri.rsplit("/", 1)[0]
    steps = [row for row in map(json.loads, store.read_text(f"{run}/metrics/metrics.jsonl").splitlines()) if "rewards/margins" in row]
    assert [row["step"] for row in steps] == list(range(1, 9))
    assert abs(steps[0]["rewards/margins"]) < 0.1  # the fresh adapter is the reference: no preference yet
    last = steps[-3:]
    assert sum(row["rewards/margins"] for row in last) / 3 > 1.0
    assert sum(row["rewards/accuracies"] for row in last) / 3 >= 0.9

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model)), records["adapter"].uri)
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, tuned(ids).logits, atol=1e-3)  # it learned something
    assert records["merged"].metrics["max_abs_logit_diff"] <= records["merged"].metrics["tolerance"]
    evaluation = records["evaluation"].metrics
    assert evaluation["task_rows"] == 3 and evaluation["general_rows"] == 2
    assert evaluation["general_loss_after"] != evaluation["general_loss_before"]  # the adapter is on for "after"
    outputs = [json.loads(line) for line in Path(records["evaluation"].uri, "outputs.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in outputs] == ["Is it safe to swim?", "Is it safe to cook?", "Is it safe to fly?"]
    summary = store.read_text(f"{run}/summary.md")
    assert "DPO rewards: margin" in summary and "reference forward passes during training: 0" in summary
    assert "pairs truncated to max prompt 64 / max length 128 tokens" in summary


def test_a_new_beta_reuses_the_pairs_and_the_reference_log_probs(first_dpo):
    config = {**first_dpo["config"], "dpo": {**first_dpo["config"]["dpo"], "beta": 0.3}}
    records, states = run_dpo(config)
    assert {states[name] for name in ("dataset", "base", "lora", "reference")} == {"Cached"}
    assert states["train"] == "Completed"
    assert records["reference"].uri == first_dpo["records"]["reference"].uri
    assert records["train"].uri != first_dpo["records"]["train"].uri  # a new run: beta is part of its key
    assert records["train"].metrics["reference_forwards"] == 0

    from loraflow.compare import comparison_markdown, read_run

    store = first_dpo["store"]
    runs = [read_run(store, record.uri.rsplit("/", 2)[-2]) for record in (first_dpo["records"]["adapter"], records["adapter"])]
    table = {line.split(" | ")[0].strip("| *"): line.split(" | ")[1:] for line in comparison_markdown(runs).splitlines() if line.startswith("| ")}
    assert [cell.strip(" |") for cell in table["dpo.beta"]] == ["0.1", "0.3"]
    # (the evaluation stage's results too: both runs have one)
    evaluated = [first_dpo["records"]["evaluation"].metrics, records["evaluation"].metrics]
    assert [float(cell.strip(" |*")) for cell in table["general-text loss"]] == pytest.approx(
        [metrics["general_loss_after"] for metrics in evaluated], rel=1e-3)
    for label, key in (("reward margin (last step)", "final_reward_margins"), ("reward accuracy (last step)", "final_reward_accuracies")):
        assert [float(cell.strip(" |*")) for cell in table[label]] == pytest.approx([r.results[key] for r in runs], rel=1e-3), label


def test_precomputed_reference_equals_the_recipe_separate_reference_copy(first_dpo, tmp_path):
    """The reference stage computes the reference as the policy with its (fresh) adapter disabled; the recipe loads a
    second copy of the base. Both must give the same log-probs."""
    import pyarrow.parquet as pq

    from loraflow.train import compute_reference_logps

    records = first_dpo["records"]
    config = build_config(first_dpo["config"]).for_run()
    _, _, spec = stages.train_spec(config, {name: records[name] for name in ("env", "dataset", "base", "lora")})
    separate = spec.model_copy(update={"dpo": spec.dpo.model_copy(update={"reference": "separate"})})
    compute_reference_logps(separate, tmp_path / "separate")
    stage = first_dpo["store"].local_copy(records["reference"].uri)
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        precomputed = torch.tensor(pq.read_table(stage / "train.parquet").column(column).to_pylist())
        copy = torch.tensor(pq.read_table(tmp_path / "separate" / "train.parquet").column(column).to_pylist())
        assert precomputed.shape == (16,) and torch.allclose(precomputed, copy, atol=1e-3, rtol=1e-5), (precomputed - copy).abs().max()


def test_the_reference_stage_computes_only_the_pairs_training_reaches_and_says_how_far_it_is(first_dpo):
    """An upload of 300 pairs with the deployment's 10 steps × 8 spent 130 s of 244 on reference log-probs for all 300,
    80 of which training used, and its progress went to the worker's stdout."""
    records = first_dpo["records"]
    tree = first_dpo["config"]
    config = build_config({**tree, "train": {**tree["train"], "max_steps": 1, "save_steps": 1}}).for_run()
    said = []
    reference = stages.reference_logps(config, {name: records[name] for name in ("env", "dataset", "base", "lora")}, said.append)
    assert reference.uri != records["reference"].uri  # another key: other pairs
    assert "reference log-probs for the 8 of 16 training pairs that 1 steps × batch 8 reach" in said
    assert "reference log-probs: 8 of 8 train pairs" in " ".join(said)  # progress, in the stage's log
    import pyarrow.parquet as pq

    assert pq.ParquetFile(first_dpo["store"].local_copy(reference.uri) / "train.parquet").metadata.num_rows == 8
    lines = []
    trained = stages.train(config, {**{name: records[name] for name in ("env", "dataset", "base", "lora")}, "reference": reference},
                           log=lines.append, on_line=lines.append)
    assert trained.metrics["reference_forwards"] == 0 and trained.metrics["global_step"] == 1, "\n".join(lines)[-3000:]


def test_align_runs_sft_then_dpo_from_the_sft_adapter_sharing_the_quantized_base(prefect_server, tiny_model, hh_pairs, tmp_path):
    from flows.align import align
    from test_sft_pipeline import sft_config

    store = tmp_path / "store"
    supervised = sft_config(tiny_model, store)
    supervised = supervised.model_copy(update={"merge": supervised.merge.model_copy(update={"enabled": False}),
                                               "train": supervised.train.model_copy(update={"max_steps": 4, "eval_steps": 4, "save_steps": 4})})
    preferences = dpo_config(tiny_model, store, hh_pairs)
    preferences["merge"] = {"enabled": False}
    state = align(supervised, build_config(preferences), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    sft_adapter, dpo = result["sft"]["adapter"], result["dpo"]
    assert dpo["base"].uri == result["sft"]["base"].uri  # one quantized base for both halves
    manifest = ArtifactStore(str(store)).manifest(sft_adapter.uri)
    assert dpo["lora"].uri == sft_adapter.uri and dpo["lora"].key == LORA.key("start-from", manifest["sha256"])
    run = dpo["adapter"].uri.rsplit("/", 1)[0]
    steps = [row for row in map(json.loads, Path(run, "metrics", "metrics.jsonl").read_text().splitlines()) if "rewards/margins" in row]
    # The reference is base + the SFT adapter, which is also where the policy starts: no preference at step 1.
    assert abs(steps[0]["rewards/margins"]) < 0.1 and abs(steps[0]["rewards/chosen"]) < 0.1
    assert json.loads(Path(run, "spec.json").read_text())["dpo"]["start_from"] == sft_adapter.uri
    summary = Path(run, "summary.md").read_text()  # the adapter it started from, as saved (not the DPO config's lora section)
    assert f"started from the adapter `{sft_adapter.uri}`" in summary and ": LoRA r8/alpha16 on down_proj, gate_proj," in summary


def test_dpo_from_a_prompt_tuning_adapter_is_refused_before_any_stage(prefect_server, tiny_model, hh_pairs, tmp_path):
    """TRL's DPOTrainer trains LoRA or IA3 adapters: a dpo.start_from adapter of another method, or an align whose SFT
    half trains one, is refused at once (it used to fail in the reference stage, with PEFT's traceback)."""
    from peft import PromptTuningConfig

    from flows.align import align
    from flows.dpo import dpo
    from loraflow import adapters
    from loraflow.errors import LoraflowError
    from test_sft_pipeline import sft_config

    store = tmp_path / "store"
    saved = tmp_path / "prompt-adapter"
    saved.mkdir()
    PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM", base_model_name_or_path=str(tiny_model)).save_pretrained(str(saved))
    ArtifactStore(str(store)).commit(saved, ArtifactStore(str(store)).uri("runs", "pt-1", "adapter"))
    state = dpo(build_config(dpo_config(tiny_model, store, hh_pairs, start_from="pt-1")), return_state=True)
    dpo_methods = adapters.titles(adapters.for_objective("dpo"))  # (LoRA, IA3 or VeRA: the registered methods DPO trains)
    assert state.is_failed() and "dpo.start_from 'pt-1': that adapter is prompt-tuning (virtual tokens), and TRL's DPOTrainer " \
        f"trains {dpo_methods} adapters" in state.message, state.message
    assert not (store / "dataset").exists()  # refused before the data stage
    # The run's folder as the summary links it (file://) names its adapter too: refused for what it is, not its name.
    state = dpo(build_config(dpo_config(tiny_model, store, hh_pairs, start_from=f"file://{store}/runs/pt-1")), return_state=True)
    assert "that adapter is prompt-tuning (virtual tokens)" in state.message, state.message
    supervised = sft_config(tiny_model, store).model_copy(update={"lora": build_config(
        {"model": {"base": "m"}, "data": {"path": "p"}, "lora": {"method": "prompt-tuning"}}).lora})
    with pytest.raises(LoraflowError, match="align's DPO half continues the SFT half's adapter, and TRL's DPOTrainer trains "
                                            f"{dpo_methods} adapters, not prompt-tuning"):
        align(supervised, build_config(dpo_config(tiny_model, store, hh_pairs)))
