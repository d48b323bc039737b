"""The whole SFT flow on the built model under a Prefect test server, then again from cache."""

import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from loraflow.config_loader import build_config
from tasks.runs import task_states
from loraflow.storage import ArtifactStore

pytestmark = pytest.mark.slow

# The module, not the function of the same name that loraflow.data re-exports.
tokenize_module = importlib.import_module("loraflow.data.tokenize")

STAGE_TASKS = ("dataset", "base", "lora", "train")


def sft_config(model: Path, store: Path, **data):
    return build_config({
        "name": "test",
        "storage": str(store),
        "model": {"base": str(model)},
        "data": {"path": str(Path(__file__).parents[1] / "loraflow/data/sample/alpaca_gpt4_sample.json"),
                 "val_set_size": 16, "cutoff_len": 128, **data},
        "train": {"learning_rate": 1e-2, "batch_size": 16, "micro_batch_size": 4, "max_steps": 12,
                  "eval_steps": 6, "save_steps": 6, "gradient_checkpointing": "off"},
        "merge": {"check_rows": 3},
    })


def run_sft(config, with_id: bool = False, **parameters):
    from flows.sft import sft

    state = sft(config, return_state=True, **parameters)
    assert state.is_completed(), state.message
    flow_run_id = state.state_details.flow_run_id
    return (state.result(), task_states(flow_run_id)) + ((flow_run_id,) if with_id else ())


@pytest.fixture(scope="module")
def first_run(prefect_server, tiny_model, tmp_path_factory):
    """The store is given relative to the working folder, as `storage: ./store` in a deployment's defaults is."""
    workdir = tmp_path_factory.mktemp("workdir")
    previous = os.getcwd()
    os.chdir(workdir)
    try:
        # Task prompts with reference answers and a general-text file: the evaluation stage runs after export.
        Path("tasks.jsonl").write_text("".join(json.dumps({"prompt": f"What is {a} plus {b}?", "answer": f"The answer is {a + b}."}) + "\n"
                                               for a, b in ((1, 2), (3, 4), (10, 5), (7, 7))))
        Path("general.txt").write_text("The river runs to the sea.\nA recipe needs flour, water and salt.\n\nMarkets open at nine.\n")
        config = sft_config(tiny_model, Path("store"))
        config = config.model_copy(update={"evaluation": config.evaluation.model_copy(update={
            "tasks_path": "tasks.jsonl", "general_text_path": "general.txt", "max_new_tokens": 8, "answer_pattern": r"(\d+)"})})
        calls = tokenize_module.TOKENIZE_CALLS
        records, states, flow_run_id = run_sft(config, with_id=True)
    finally:
        os.chdir(previous)
    config = config.model_copy(update={"storage": str(workdir / "store"), "evaluation": config.evaluation.model_copy(update={
        "tasks_path": str(workdir / "tasks.jsonl"), "general_text_path": str(workdir / "general.txt")})})
    return {"config": config, "records": records, "states": states, "flow_run_id": flow_run_id,
            "tokenize_calls": tokenize_module.TOKENIZE_CALLS - calls}


def test_every_stage_output_is_committed_with_a_manifest(first_run):
    store = ArtifactStore(first_run["config"].storage)
    records = first_run["records"]
    for name in ("dataset", "base", "lora", "train", "adapter", "merged"):
        manifest = store.manifest(records[name].uri)
        assert manifest is not None, name
        for entry in manifest["files"]:
            assert Path(records[name].uri, entry["path"]).stat().st_size == entry["size"]
    assert records["dataset"].uri.startswith(store.uri("dataset"))
    assert records["base"].uri.startswith(store.uri("base"))
    assert records["lora"].uri.startswith(store.uri("lora"))
    run = records["adapter"].uri.rsplit("/", 1)[0]
    assert run.startswith(store.uri("runs", "test-"))
    assert json.loads(Path(run, "spec.json").read_text())["quantized"] is True
    assert (Path(run) / "metrics" / "metrics.jsonl").exists()
    assert first_run["states"]["dataset"] == "Completed"


def test_each_stage_has_one_name_for_its_record_task_and_store_folder(first_run):
    """loraflow.registry: the flow's record keys, its task names and the store's folders are the stages' names."""
    from loraflow.registry import BY_NAME, RUNS_FOLDER, SHARED_FOLDERS

    records, states = first_run["records"], first_run["states"]
    assert set(records) <= set(BY_NAME) and set(states) <= set(BY_NAME), (set(records), set(states))
    assert set(records) - {"report"} <= set(states)  # every record came from the task of its name
    store = Path(first_run["config"].storage)
    for name in ("dataset", "base", "lora"):
        assert Path(records[name].uri).parent == store / BY_NAME[name].folder
    assert Path(records["adapter"].uri).name == BY_NAME["adapter"].folder
    assert Path(records["train"].uri).relative_to(Path(records["adapter"].uri).parent).as_posix() == BY_NAME["train"].folder
    folders = {path.name for path in store.iterdir() if path.is_dir()}
    assert folders - {RUNS_FOLDER, "prefect-results", "leases"} == set(SHARED_FOLDERS) - {"reference"}, folders


def test_the_base_was_quantized_to_nf4_with_a_full_precision_head(first_run):
    from transformers import AutoModelForCausalLM
    import bitsandbytes as bnb

    model = AutoModelForCausalLM.from_pretrained(first_run["records"]["base"].uri, device_map={"": "cpu"})
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert model.model.layers[0].self_attn.q_proj.weight.quant_state.quant_type == "nf4"
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    assert first_run["records"]["lora"].metrics["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_training_loss_decreases(first_run):
    metrics = first_run["records"]["train"].metrics
    assert metrics["global_step"] == 12
    assert metrics["final_loss"] < metrics["first_loss"] - 0.5
    lines = [json.loads(l) for l in Path(first_run["records"]["adapter"].uri).parent.joinpath("metrics", "metrics.jsonl").read_text().splitlines()]
    evals = [l for l in lines if "eval_loss" in l]
    # The starting model first (the baseline), then every eval_steps; the last step once.
    assert [l["step"] for l in evals] == [0, 6, 12] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert metrics["eval_loss"] == evals[-1]["eval_loss"] and metrics["eval_loss_before"] == evals[0]["eval_loss"]
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert metrics["perplexity_before"] == pytest.approx(math.exp(metrics["eval_loss_before"]))
    assert metrics["perplexity_before"] > metrics["perplexity"]
    assert 0 < metrics["eval_runtime_s"] < metrics["train_runtime_s"]  # tokens/s counts training time only
    assert all(l["tokens_per_s"] > 0 for l in lines if "tokens_per_s" in l)
    assert {"loss", "grad_norm", "learning_rate", "peak_rss_mb"} <= set(lines[1])


def test_checkpoints_and_metrics_were_synced_at_every_save(first_run):
    store = ArtifactStore(first_run["config"].storage)
    run = first_run["records"]["adapter"].uri.rsplit("/", 1)[0]
    checkpoints = store.list_committed(f"{run}/checkpoints")
    assert [uri.rsplit("/", 1)[-1] for uri in checkpoints] == ["checkpoint-12", "checkpoint-6", "final"]
    assert store.manifest(f"{run}/checkpoints/checkpoint-6")["step"] == 6
    at_save = [json.loads(l) for l in Path(run, "checkpoints", "checkpoint-6", "metrics.jsonl").read_text().splitlines()]
    assert max(l["step"] for l in at_save) == 6 and any(l["step"] == 6 and "loss" in l for l in at_save)
    assert [f["path"] for f in store.manifest(f"{run}/metrics")["files"]] == ["metrics.jsonl"]


def test_exported_adapter_loads_on_the_original_base_and_matches_the_merged_model(first_run, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = first_run["records"]["adapter"].uri
    assert json.loads(Path(adapter_dir, "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    ids = tokenizer(["### Instruction:\nName three colours.\n\n### Response:\n"], return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned = PeftModel.from_pretrained(base, adapter_dir).eval()
        tuned_logits = tuned(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(first_run["records"]["merged"].uri, dtype=torch.float32)(ids).logits
    assert (tuned_logits - base_logits).abs().max() > 1e-2  # the adapter learned something
    assert torch.allclose(merged_logits, tuned_logits, atol=1e-4)
    assert first_run["records"]["merged"].metrics["max_abs_logit_diff"] <= first_run["records"]["merged"].metrics["tolerance"]


def _trainer_processes() -> list:
    import psutil

    return [child for child in psutil.Process().children(recursive=True) if "loraflow.train" in " ".join(child.cmdline())]


def test_second_run_reuses_data_quantize_lora_and_training(first_run):
    calls = tokenize_module.TOKENIZE_CALLS
    records, states = run_sft(first_run["config"])
    assert tokenize_module.TOKENIZE_CALLS == calls
    for task in STAGE_TASKS:
        assert states[task] == "Cached", (task, states)
    assert records["adapter"].uri == first_run["records"]["adapter"].uri
    assert _trainer_processes() == []  # the trainer warm-started for this run was ended with it, unused


def test_the_evaluation_stage_scores_the_base_and_the_adapter(first_run):
    evaluation = first_run["records"]["evaluation"]
    metrics = evaluation.metrics
    assert metrics["task_rows"] == 4 and metrics["general_rows"] == 3
    for name in ("exact_match", "rouge_l"):
        assert 0 <= metrics[f"{name}_before"] <= 1 and 0 <= metrics[f"{name}_after"] <= 1
    assert metrics["general_loss_before"] > 0 and metrics["general_perplexity_after"] == pytest.approx(math.exp(metrics["general_loss_after"]))
    rows = [json.loads(line) for line in Path(evaluation.uri, "outputs.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in rows] == [f"What is {a} plus {b}?" for a, b in ((1, 2), (3, 4), (10, 5), (7, 7))]
    assert all(isinstance(row["before"], str) and isinstance(row["after"], str) for row in rows)
    assert metrics["examples"] == [{key: row[key][:300] for key in ("prompt", "reference", "before", "after")} for row in rows]
    assert evaluation.uri.startswith(first_run["records"]["adapter"].uri.rsplit("/", 1)[0] + "/evaluation/")


def test_a_new_evaluation_setting_re_evaluates_without_retraining(first_run):
    config = first_run["config"]
    records, states = run_sft(config.model_copy(update={"evaluation": config.evaluation.model_copy(update={"answer_pattern": r"is (\d+)"})}))
    assert states["train"] == "Cached" and states["evaluation"] == "Completed"
    assert records["evaluation"].uri != first_run["records"]["evaluation"].uri
    assert records["evaluation"].metrics["rouge_l_after"] == first_run["records"]["evaluation"].metrics["rouge_l_after"]  # same answers


def test_changed_template_reruns_data_but_not_quantization(first_run, tiny_model):
    calls = tokenize_module.TOKENIZE_CALLS
    changed = sft_config(tiny_model, Path(first_run["config"].storage), template="alpaca_short")
    records, states = run_sft(changed)
    assert tokenize_module.TOKENIZE_CALLS == calls + 1
    assert states["dataset"] == "Completed" and states["train"] == "Completed"
    assert states["base"] == "Cached" and states["lora"] == "Cached"
    assert records["dataset"].uri != first_run["records"]["dataset"].uri
    assert records["base"].uri == first_run["records"]["base"].uri


def test_committed_outputs_are_reused_without_prefect(first_run):
    """The store is the second line of caching: with no Prefect cache at all, stages return committed outputs."""
    from loraflow import stages

    config = first_run["config"]
    calls = tokenize_module.TOKENIZE_CALLS
    sources = stages.inspect_sources(config)
    dataset = stages.prepare_data(config, sources, log=lambda _: None)
    assert dataset.reused and dataset.uri == first_run["records"]["dataset"].uri
    assert tokenize_module.TOKENIZE_CALLS == calls
    assert dataset.metrics == first_run["records"]["dataset"].metrics


def test_plain_lora_uses_the_original_base_without_quantizing(tiny_model, tmp_path):
    from loraflow import stages

    config = build_config({"storage": str(tmp_path), "model": {"base": str(tiny_model), "quantization": "none"},
                           "data": {"path": "unused.json"}, "train": {"gradient_checkpointing": "off"}})
    env = stages.env_check(config)
    sources_metrics = {"model_path": str(tiny_model), "model_key": "k"}
    from loraflow.storage import StageRecord

    base = stages.quantize_base(config, env, StageRecord(stage="sources", key="s", metrics=sources_metrics), log=lambda _: None)
    assert base.uri == str(tiny_model) and base.metrics == {"quantization": "none", "in_store": False}
    assert not (tmp_path / "base").exists()
    lora = stages.inject_adapter(config, env, StageRecord(stage="sources", key="s", metrics=sources_metrics), base, log=lambda _: None)
    assert ArtifactStore(str(tmp_path)).is_committed(lora.uri)
    assert lora.metrics["trainable_params"] == 32768


def test_the_flow_parameter_schema_is_the_config_form():
    from prefect.utilities.callables import parameter_schema

    from flows.sft import sft

    from loraflow.adapters import Ia3Adapter, LoraAdapter, PrefixTuningAdapter, PromptTuningAdapter
    from loraflow.config import FinetuneConfig

    schema = parameter_schema(sft).model_dump()
    definitions = schema["definitions"]
    assert set(definitions["FinetuneConfig"]["properties"]) == {"name", "objective", "storage", "model", "data", "lora", "train", "merge", "evaluation"}  # no DPO section
    template = definitions["DataSettings"]["properties"]["template"]
    assert template["enum"] == ["auto", "alpaca", "alpaca_legacy", "alpaca_short", "vigogne", "vicuna_v1.1", "chatml"]
    assert all("description" in field for field in definitions["TrainSettings"]["properties"].values())
    # The form reads naturally: every field has a title written for people (not one generated from its
    # name, like "Lr Scheduler" or "R"), and no field is nullable (the UI shows a type switcher for those).
    sections = [FinetuneConfig, *(FinetuneConfig.model_fields[name].annotation for name in ("model", "data", "train", "merge", "evaluation")),
                LoraAdapter, Ia3Adapter, PrefixTuningAdapter, PromptTuningAdapter]  # (the lora section: one per method)
    for section in sections:
        for name, field in section.model_fields.items():
            assert field.title, f"{section.__name__}.{name} has no title"
        for name, property_schema in definitions[section.__name__]["properties"].items():
            assert {"type": "null"} not in property_schema.get("anyOf", []), f"{section.__name__}.{name} is nullable"
    assert definitions["TrainSettings"]["properties"]["lr_scheduler"]["title"] == "Learning-rate schedule"
    assert definitions["TrainSettings"]["properties"]["deepspeed_zero"] == {
        "default": 0, "description": "DeepSpeed ZeRO stage: 2 or 3 (0: DeepSpeed not used).", "maximum": 3, "minimum": 0,
        "title": "DeepSpeed ZeRO stage", "type": "integer"}


def test_the_run_publishes_its_artifacts(first_run, capsys):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from loraflow.cli import main

    run_uri = first_run["records"]["adapter"].uri.rsplit("/", 1)[0]
    run = run_uri.rsplit("/", 1)[-1]
    keys = {f"{run}-{what}" for what in ("summary", "metrics", "loss-curve", "adapter", "merged", "progress")}
    with get_client(sync_client=True) as client:
        versions = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=sorted(keys))))
    artifacts = {a.key: a for a in sorted(versions, key=lambda a: a.created)}  # the latest version of each key
    assert set(artifacts) == keys
    summary = artifacts[f"{run}-summary"].data
    # Keyed artifacts are versioned: the newest summary is from this run's first or second (cached) flow run.
    assert re.search(r"\| dataset \| (built|cached) \|", summary) and re.search(r"\| train \| (built|cached) \|", summary)
    train = first_run["records"]["train"].metrics
    before_after = f"eval loss {train['eval_loss_before']:.4g} → {train['eval_loss']:.4g} (perplexity "
    assert before_after in summary, summary
    for expected in ("## Evaluation", "task metrics on 4 prompts: exact match ", "forgetting check on 3 general-text rows: loss ",
                     "| What is 1 plus 2? | The answer is 3. |", "rows truncated at cutoff 128", "token length p50",
                     "trainable of", "train loss ", "eval loss ", "tokens/s", "peak RSS", first_run["records"]["merged"].uri, '"learning_rate": 0.01',
                     # what ran, the settings given and what auto decided (loraflow.plan)
                     "packed micro batches", "memory plan: micro batch 4 x accumulation 4 (set), gradient checkpointing off (set)"):
        assert expected in summary, expected
    assert float(artifacts[f"{run}-progress"].data) == 100.0
    table = artifacts[f"{run}-metrics"].data
    assert "eval_loss" in table and "tokens_per_s" in table
    assert artifacts[f"{run}-adapter"].data.startswith("[adapter") and first_run["records"]["adapter"].uri in artifacts[f"{run}-adapter"].data
    assert "data:image/png;base64," in artifacts[f"{run}-loss-curve"].data
    assert Path(run_uri, "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(run_uri, "loss.png").stat().st_size > 10_000
    assert Path(run_uri, "summary.md").read_text() == summary

    assert main(["artifacts", run]) == 0
    assert capsys.readouterr().out.strip() == summary.strip()
    assert main(["artifacts", run, "--storage", first_run["config"].storage]) == 0
    assert capsys.readouterr().out.strip() == summary.strip()
    assert main(["runs"]) == 0
    listing = capsys.readouterr().out
    assert run in listing and "Completed" in listing and f"→ {first_run['records']['train'].metrics['final_loss']:.4f}, eval loss " in listing


def test_summary_redacts_secrets():
    from loraflow.report import redact

    shown = redact({"storage": "s3://AKIAEXAMPLE:hunter2@bucket/prefix", "model": {"hub_token": "hf_abc", "base": "org/m"}})
    assert shown == {"storage": "s3://***@bucket/prefix", "model": {"hub_token": "***", "base": "org/m"}}


def test_every_record_and_artifact_carries_absolute_uris(first_run):
    """The store was given as a relative path: records, summary and links still lead to the files from anywhere."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from loraflow.storage import FILE_LINK_NOTE

    store = first_run["config"].storage
    for name, record in first_run["records"].items():
        if record.uri:
            assert record.uri.startswith(store + "/") or Path(record.uri).is_absolute(), (name, record.uri)
            assert Path(record.uri).exists(), (name, record.uri)
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[first_run["flow_run_id"]])))
    links = {a.key.rsplit("-", 1)[-1]: a for a in artifacts if a.key.endswith(("-adapter", "-merged"))}  # (link artifacts are markdown)
    assert set(links) == {"adapter", "merged"}
    for name, artifact in links.items():
        uri = first_run["records"][name].uri
        assert artifact.data == f"[{'adapter (PEFT, safetensors)' if name == 'adapter' else 'merged model'}]({Path(uri).as_uri()})"
        assert f"`{uri}`" in artifact.description and FILE_LINK_NOTE in artifact.description  # why the link cannot be clicked
    [summary] = [a.data for a in artifacts if a.key.endswith("-summary")]
    assert "./" not in summary.split("## Config")[0] and f"`{first_run['records']['dataset'].uri}` ([open](file://" in summary
    assert FILE_LINK_NOTE in summary
    assert f"--storage {store} " in summary and f'"storage": "{store}"' in summary


def test_the_summary_snippet_loads_the_adapter_and_the_merged_model(first_run):
    """The Python the summary shows, run as a user would paste it."""
    run_uri = first_run["records"]["adapter"].uri.rsplit("/", 1)[0]
    summary = Path(run_uri, "summary.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", summary, re.S).group(1)
    assert max(map(len, snippet.splitlines())) <= 79  # folded: Prefect's UI cuts a code line wider than its box
    literals = re.sub(r"'\n *'", "", snippet)  # long paths are adjacent literals, one per line
    assert first_run["records"]["adapter"].uri in literals and first_run["records"]["merged"].uri in literals
    check = "\nprint('LOADED', type(model).__name__, type(merged).__name__)\n"
    result = subprocess.run([sys.executable, "-c", snippet + check], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED PeftModelForCausalLM LlamaForCausalLM" in result.stdout
    assert f"loraflow generate {run_uri.rsplit('/', 1)[-1]} \\\n  --storage {first_run['config'].storage} \\\n" in summary


def test_loraflow_generate_streams_the_runs_answer(first_run, capsys):
    from loraflow.cli import main
    from loraflow.generate import generate

    run = first_run["records"]["adapter"].uri.rsplit("/", 1)[-2].rsplit("/", 1)[-1]
    store = first_run["config"].storage
    assert main(["generate", run, "--storage", store, "--prompt", "Name three colours.", "--max-new-tokens", "6"]) == 0
    streamed = capsys.readouterr().out
    [expected] = generate(store, run, ["Name three colours."], max_new_tokens=6)
    assert ">>> Name three colours." in streamed and expected.strip() in streamed
    assert generate(store, run, ["Name three colours."], max_new_tokens=6, merged=True) == [expected]  # merged = base + adapter
    # The evaluation stage's answers with the adapter are what `generate` gives for the same prompts (one function).
    evaluated = [json.loads(line) for line in Path(first_run["records"]["evaluation"].uri, "outputs.jsonl").read_text().splitlines()]
    assert generate(store, run, [row["prompt"] for row in evaluated], max_new_tokens=8) == [row["after"] for row in evaluated]
    assert main(["generate", "no-such-run", "--storage", store, "--prompt", "x"]) == 1
    failure = capsys.readouterr()
    assert f"no-such-run: no exported adapter there; runs with one in {store}: " in failure.err and run in failure.err and not failure.out


def test_the_fine_tunes_own_run_shows_its_training_and_its_task_list(first_run):
    """Training runs as a task of the fine-tune: its log lines and progress bar are on the fine-tune's run,
    and no task takes a subflow's result (an input the classic UI cannot show: "Invalid TaskInputResponse")."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    flow_run_id = first_run["flow_run_id"]
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert any(log.message.startswith("trained adapter committed") for log in logs)
    # The trainer was started with the flow and given its spec by the train task (loraflow.launch: warm start).
    assert any(log.message.startswith("warm start: the trainer's imports took") for log in logs)
    assert {run.name.rsplit("-", 1)[0] for run in task_runs} >= {"dataset", "train", "adapter", "report"}
    input_types = {i.input_type for run in task_runs for inputs in run.task_inputs.values() for i in inputs}
    assert input_types <= {"task_run", "parameter", "constant"}, input_types


def test_an_upload_started_run_is_named_after_its_file_and_points_to_the_event(first_run):
    """What the upload trigger passes (`dataset`, `upload_event`): the run is named after the file, its
    summary links the event, and an event on the dataset's resource names the run."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    event_id = str(uuid.uuid4())
    dataset = first_run["config"].data.path
    records, _, flow_run_id = run_sft(first_run["config"], with_id=True, dataset=dataset, upload_event=event_id)
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
    assert re.fullmatch(r"test-alpaca-gpt4-sample-[0-9a-f]{4}", flow_run.name)
    summary = Path(records["adapter"].uri.rsplit("/", 1)[0], "summary.md").read_text()
    assert f"Started by the upload of `{dataset}` (event" in summary and event_id in summary
    deadline = time.time() + 30
    while True:
        reply = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json={"filter": {"event": {"name": ["loraflow.finetune.started"]}}})
        events = [e for e in reply.json()["events"] if e["payload"].get("upload_event") == event_id]
        if events or time.time() > deadline:
            break
        time.sleep(0.5)
    [event] = events
    assert event["resource"]["prefect.resource.id"] == f"loraflow.dataset.{dataset}"
    related = {r["prefect.resource.role"]: r["prefect.resource.id"] for r in event["related"]}
    assert related["flow-run"] == f"prefect.flow-run.{flow_run_id}" and related["triggering-event"] == f"prefect.event.{event_id}"


def test_a_failed_merge_still_reports_the_trained_adapter_then_fails_the_run(first_run, monkeypatch):
    from flows.sft import sft
    from loraflow import merge as merge_stage
    from loraflow.errors import LoraflowError

    def failing(*args, **kwargs):
        raise LoraflowError("merged model disagrees with base+adapter (injected)")

    monkeypatch.setattr(merge_stage, "merge_adapter", failing)
    run = Path(first_run["records"]["adapter"].uri).parent
    merged = run / "merged"
    kept = merged.rename(run.parent / "merged-kept")  # so the merge runs again (and fails); put back below
    (run / "summary.md").unlink()
    try:
        state = sft(first_run["config"], return_state=True)
    finally:
        shutil.rmtree(merged, ignore_errors=True)
        kept.rename(merged)
    summary = run / "summary.md"
    assert state.is_failed() and "merged model disagrees with base+adapter (injected)" in state.message
    written = summary.read_text()  # the report ran before the failure was raised
    assert "## Outputs" in written and "- adapter: " in written and "- merged model:" not in written
