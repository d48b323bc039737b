"""Bad input fails early with a message that names the problem, and commits nothing."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from loraflow import stages
from loraflow.config_loader import build_config, load_config
from loraflow.errors import LoraflowError
from loraflow.storage import ArtifactStore


def config_tree(model, data, store, **data_fields):
    return {"storage": str(store), "model": {"base": str(model)}, "data": {"path": str(data), "val_set_size": 0, **data_fields}}


def test_defaults_follow_the_seed_recipes(tmp_path):
    config = build_config({"model": {"base": "m"}, "data": {"path": "d.json"}})
    assert (config.train.learning_rate, config.train.max_grad_norm, config.train.batch_size) == (3e-5, 0.3, 128)
    # Chosen by measurement (bench/train.py), not the recipe's: the micro batch and checkpointing fit the device.
    assert (config.train.micro_batch_size, config.train.gradient_checkpointing, config.train.packing) == (0, "auto", True)
    assert (config.train.lr_scheduler, config.train.optim, config.data.cutoff_len) == ("cosine", "adamw_torch", 256)
    assert (config.lora.r, config.lora.alpha) == (8, 16)
    assert config.lora.dropout == 0.0  # not the recipe's 0.05: a quarter of a CPU step, measured (bench/train.py)
    assert config.model.quantization == "nf4" and config.model.double_quant


def test_unknown_template_lists_the_choices():
    with pytest.raises(LoraflowError) as error:
        build_config({"model": {"base": "m"}, "data": {"path": "d.json", "template": "alpacca"}})
    assert "data.template" in str(error.value) and "alpaca_short" in str(error.value) and "alpacca" in str(error.value)


def test_zero3_with_a_4bit_base_is_rejected_and_allowed_for_plain_lora():
    tree = {"model": {"base": "m"}, "data": {"path": "d.json"}, "train": {"launcher": "deepspeed", "deepspeed_zero": 3}}
    with pytest.raises(LoraflowError, match="ZeRO-3 cannot shard a 4-bit"):
        build_config(tree)
    assert build_config({**tree, "model": {"base": "m", "quantization": "none"}}).train.deepspeed_zero == 3


def test_template_must_fit_the_format():
    with pytest.raises(LoraflowError, match="formats alpaca rows, but format is 'sharegpt'"):
        build_config({"model": {"base": "m"}, "data": {"path": "d.json", "format": "sharegpt", "template": "alpaca"}})
    # template auto (the default) is the shape's own: decided once the file is read
    assert build_config({"model": {"base": "m"}, "data": {"path": "d.json", "format": "sharegpt"}}).data.template == "auto"


def test_overrides_and_relative_paths(tmp_path):
    (tmp_path / "data.json").write_text("[]")
    (tmp_path / "c.yaml").write_text("model: {base: org/model}\ndata: {path: data.json}\n")
    config = load_config(tmp_path / "c.yaml", ["train.learning_rate=1e-4", "lora.target=[q_proj, v_proj]", "train.max_steps=5"])
    assert config.train.learning_rate == 1e-4 and config.lora.target == ["q_proj", "v_proj"] and config.train.max_steps == 5
    assert config.data.path == str(tmp_path / "data.json") and config.model.base == "org/model"
    with pytest.raises(LoraflowError, match="train: batch_size 7 is not a multiple of micro_batch_size 2"):
        load_config(tmp_path / "c.yaml", ["train.batch_size=7", "train.micro_batch_size=2"])
    assert load_config(tmp_path / "c.yaml", ["train.gradient_checkpointing=true"]).train.gradient_checkpointing == "on"  # YAML booleans


def _expect_error(tiny_model, tmp_path, data_file, match, **data_fields):
    store = tmp_path / "store"
    config = build_config(config_tree(tiny_model, data_file, store, **data_fields))
    with pytest.raises(LoraflowError, match=match) as error:
        stages.prepare_data(config, stages.inspect_sources(config), log=lambda _: None)
    assert ArtifactStore(str(store)).list_committed(ArtifactStore(str(store)).uri("dataset")) == []
    return str(error.value)


def test_missing_file(tiny_model, tmp_path):
    config = build_config(config_tree(tiny_model, tmp_path / "absent.jsonl", tmp_path / "store"))
    with pytest.raises(LoraflowError, match="absent.jsonl: dataset file not found"):
        stages.inspect_sources(config)


def test_malformed_jsonl_names_the_line(tiny_model, tmp_path):
    lines = [json.dumps({"instruction": "a", "input": "", "output": "b"})] * 3
    lines.insert(2, '{"instruction": "broken", "output": ')
    (tmp_path / "bad.jsonl").write_text("\n".join(lines))
    message = _expect_error(tiny_model, tmp_path, tmp_path / "bad.jsonl", "line 3")
    assert "bad.jsonl" in message


def test_missing_field_names_the_row_and_field(tiny_model, tmp_path):
    rows = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "answer": "d"}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    message = _expect_error(tiny_model, tmp_path, tmp_path / "rows.json", "row 1 has no 'output' field")
    assert "answer" in message  # lists what the row does have


def test_empty_after_filtering(tiny_model, tmp_path):
    (tmp_path / "empty.json").write_text(json.dumps([{"instruction": "a", "input": "", "output": "  "}] * 3))
    _expect_error(tiny_model, tmp_path, tmp_path / "empty.json", r"no usable rows after filtering \(3 read; dropped: 3 empty output\)")


@pytest.mark.parametrize("rows, asked, held_out, note", [
    (28, 20, 5, "validation split of 5 rows, not data.val_set_size 20: at most 20% of the 28 usable rows are held out"),
    (3, 10, 0, "no validation split: data.val_set_size 10, but 3 usable rows are too few to hold any out"),
    (200, 20, 20, None),  # the demo's split, unchanged
])
def test_the_validation_split_scales_with_the_data(rows, asked, held_out, note, tiny_model, tmp_path):
    """A 28-row upload with the deployment's val_set_size 20 kept 20 rows for validation and trained on 8."""
    (tmp_path / "few.json").write_text(json.dumps([{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(rows)]))
    config = build_config(config_tree(tiny_model, tmp_path / "few.json", tmp_path / "store", val_set_size=asked))
    said = []
    record = stages.prepare_data(config, stages.inspect_sources(config), log=said.append)
    assert (record.metrics["val_rows"], record.metrics["train_rows"]) == (held_out, rows - held_out)
    if note is None:
        assert "val_note" not in record.metrics
    else:
        assert note in record.metrics["val_note"] and record.metrics["val_note"] in said


def test_cli_prints_the_problem_without_a_traceback(tiny_model, tmp_path, shared_data, server_env):
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "input": "", "output": "b"}\nnot json\n')
    (tmp_path / "c.yaml").write_text(f"model: {{base: {tiny_model}}}\ndata: {{path: bad.jsonl, val_set_size: 0}}\nstorage: store\n")
    result = subprocess.run([sys.executable, "-m", "loraflow.cli", "run", str(tmp_path / "c.yaml")],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path, env=server_env)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "bad.jsonl: malformed JSON on line 2" in result.stderr.strip().splitlines()[-2] + result.stderr
    assert output.count("malformed JSON on line 2") == 1, output  # once, not once per Prefect state change
    assert "Traceback" not in output
    assert not list((tmp_path / "store").glob("dataset/*/_manifest.json"))


# The contract for user-facing messages: each bad input, where it is given, and a fragment its one-line
# error must contain. Every case ends with exit code 1, no traceback, the message printed once.
# (case, config sections, --set overrides, environment, the fragment the one error message contains)
BAD_INPUTS = [
    ("a data path that is a folder", {"data": {"path": "."}}, [], {}, "this is a folder; data.path names one dataset file"),
    ("a malformed --set value", {}, ["lora.target=[q_proj"], {}, "--set 'lora.target=[q_proj': the value is not valid YAML"),
    ("a truncated JSON file", {"data": {"path": "half.json"}}, [], {}, "half.json: malformed JSON: Unterminated string starting at line 1, column"),
    ("a LoRA target the model lacks", {"lora": {"target": ["q_proj", "qq_proj"]}}, [], {},
     "lora.target names qq_proj, which this model does not have; its linear layers are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
    ("an S3 store whose endpoint never answers", {"storage": "s3://bucket/store"}, [],
     {"AWS_ENDPOINT_URL": "{silent_endpoint}", "AWS_ACCESS_KEY_ID": "AKIATEST", "AWS_SECRET_ACCESS_KEY": "test"},
     "storage s3://bucket/store: network: the S3 endpoint {silent_endpoint} could not be reached or did not answer (gave up within 30 s"),
]


@pytest.mark.parametrize("case, config, overrides, env, fragment", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_reported_once_without_a_traceback(case, config, overrides, env, fragment, tiny_model, tmp_path, silent_endpoint,
                                                        server_env):
    (tmp_path / "half.json").write_text('[{"instruction": "a", "output": "b')
    tree = {"model": {"base": str(tiny_model)}, "data": {"path": "half.json", "val_set_size": 0}, "storage": "store"}
    for section, values in config.items():
        tree[section] = {**tree.get(section, {}), **values} if isinstance(values, dict) else values
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree))
    argv = [sys.executable, "-m", "loraflow.cli", "run", str(tmp_path / "c.yaml"), *(a for o in overrides for a in ("--set", o))]
    env = {name: value.format(silent_endpoint=silent_endpoint) for name, value in env.items()}
    fragment = fragment.format(silent_endpoint=silent_endpoint)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**server_env, **env})
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output[-3000:]
    assert output.count(fragment) == 1, output[-3000:]
    assert not (tmp_path / "store" / "base").exists()  # every check that needs no weights comes before quantizing


def test_cli_reports_invalid_config_before_starting_anything(tmp_path):
    (tmp_path / "c.yaml").write_text("model: {base: m}\ndata: {path: d.json, template: nope}\n")
    result = subprocess.run([sys.executable, "-m", "loraflow.cli", "run", str(tmp_path / "c.yaml")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "data.template" in result.stderr and "Traceback" not in result.stderr
    assert "Starting temporary server" not in result.stdout + result.stderr


def test_env_check_names_a_missing_launcher(tmp_path, monkeypatch):
    from loraflow.envcheck import check_environment

    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    config = build_config({"model": {"base": "m"}, "data": {"path": "d.json"}, "train": {"launcher": "mpirun", "nproc_per_node": 2}})
    with pytest.raises(LoraflowError, match="train.launcher is mpirun, but mpirun is not on PATH"):
        check_environment(config)


def test_env_check_rejects_a_device_the_machine_lacks(monkeypatch):
    import torch

    from loraflow.envcheck import check_environment

    monkeypatch.delenv("LORAFLOW_CPU_BF16", raising=False)  # (this test is about the detection: tests/test_plan.py the setting)

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(LoraflowError, match="train.device is cuda, but torch.cuda finds no GPU"):
        check_environment(build_config({"model": {"base": "m"}, "data": {"path": "d.json"}, "train": {"device": "cuda"}}))
    report = check_environment(build_config({"model": {"base": "m"}, "data": {"path": "d.json"}}))
    assert report["device"] == "cpu" and report["distributed_backend"] == "gloo"
    # auto precision on a CPU: bf16 only where it has the instructions that make bf16 fast, and the report says so.
    from loraflow.plan import cpu_has_fast_bf16

    fast = cpu_has_fast_bf16()
    assert report["precision"] == ("bf16" if fast else "fp32")
    assert report["precision_reason"] == ("this CPU has AVX512-BF16/AMX instructions" if fast else
                                          "this CPU has no AVX512-BF16/AMX instructions (bf16 would be emulated, slower than fp32)")
    assert report["versions"]["bitsandbytes"] and report["versions"]["transformers"].startswith("5.")


def test_a_config_written_out_and_read_back_keeps_its_cache_keys(tmp_path):
    from loraflow.storage import StageRecord

    config = build_config({"model": {"base": "/m"}, "data": {"path": "/d.json"}, "train": {"learning_rate": 1e-2}})
    (tmp_path / "c.yaml").write_text(config.model_dump_json())
    again = load_config(tmp_path / "c.yaml")
    env = StageRecord(stage="env", key="e", metrics={"device": "cpu", "precision": "fp32"})
    data = StageRecord(stage="dataset", key="d")
    lora = StageRecord(stage="lora", key="l")
    records = {"env": env, "dataset": data, "lora": lora}
    assert stages.train_key(again, records) == stages.train_key(config, records)
    tracked = build_config({**config.model_dump(), "train": {"learning_rate": 1e-2, "report_to": "tensorboard"}})
    assert stages.train_key(tracked, records) == stages.train_key(config, records)  # where it reports: not what it computes
    sources = StageRecord(stage="sources", key="s", metrics={"dataset_sha256": "x", "tokenizer_key": "t", "model_key": "m"})
    assert stages.dataset_key(again, sources) == stages.dataset_key(config, sources)
    assert stages.lora_key(again, data) == stages.lora_key(config, data)


def test_a_run_without_an_eval_says_why_instead_of_nan(tiny_model, tmp_path):
    from loraflow.launch import Topology, build_command, run_streaming
    from loraflow.report import eval_text, loss_text
    from test_sft_pipeline import sft_config

    config = sft_config(tiny_model, tmp_path / "store", val_set_size=0).for_run()
    config = config.model_copy(update={"train": config.train.model_copy(update={"max_steps": 2, "save_steps": 2, "logging_steps": 5})})
    store, key, run, spec_uri = stages.prepare_training(config, log=lambda _: None)
    lines = []
    assert run_streaming(build_command(Topology(), spec_uri), lines.append, timeout=300, forkable=True) == 0, "\n".join(lines)[-3000:]
    summary = stages.trained_record(store, key, run, reused=False).metrics
    assert summary["eval_loss"] is None
    assert eval_text(summary, str) == "eval loss: no validation split (data.val_set_size is 0, or too few rows to hold any out)"
    # the last step is logged; two steps cannot change the model, and the trained run says so
    assert loss_text(summary, "{:.2f}".format) == (f"train loss {summary['first_loss']:.2f} → {summary['final_loss']:.2f} — "
                                                   "only 2 optimizer steps (train.batch_size 16, num_epochs 3, max_steps 2): too "
                                                   "few to change the model much; add rows, lower train.batch_size, or raise "
                                                   "train.num_epochs or train.max_steps (at least 10 steps)")
    assert "nan" not in json.dumps(summary).lower()


def test_a_path_typed_on_the_command_line_is_relative_to_where_the_command_runs(tmp_path, monkeypatch):
    """The issue's command: `loraflow run examples/x.yaml --set model.base=./demo/models/m --set storage=./demo/store`
    from the repository's root. The YAML's own relative paths stay relative to the YAML's folder."""
    here, examples = tmp_path / "here", tmp_path / "here" / "examples"
    examples.mkdir(parents=True)
    (examples / "pairs.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    (examples / "x.yaml").write_text("objective: dpo\nmodel: {base: ./model-beside-the-yaml}\ndata: {path: ./pairs.jsonl}\n")
    (here / "demo" / "models" / "m").mkdir(parents=True)
    monkeypatch.chdir(here)
    config = load_config("examples/x.yaml", ["model.base=./demo/models/m", "storage=./demo/store"])
    assert config.model.base == str(here / "demo" / "models" / "m")
    assert config.storage == str(here / "demo" / "store")
    assert config.data.path == str(examples / "pairs.jsonl")  # from the YAML: beside it
    # The YAML's base (beside the YAML) when nothing overrides it; a --set data path relative to here
    (here / "mine.jsonl").write_text("{}\n")
    config = load_config("examples/x.yaml", ["data.path=mine.jsonl"])
    assert config.model.base == str(examples / "model-beside-the-yaml") and config.data.path == str(here / "mine.jsonl")
    assert config.storage == str(examples / "loraflow-store")  # the default store: beside the YAML, as before


def test_a_missing_model_folder_is_said_before_anything_is_created(tmp_path):
    examples = tmp_path / "examples"
    examples.mkdir()
    (examples / "pairs.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    (examples / "x.yaml").write_text("objective: dpo\nmodel: {base: ./nowhere}\ndata: {path: pairs.jsonl}\n")
    result = subprocess.run([sys.executable, "-m", "loraflow.cli", "run", "examples/x.yaml", "--set", "model.base=./demo/models/m",
                             "--set", "storage=./demo/store"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output[-3000:]
    assert f"model.base {tmp_path}/demo/models/m: model folder not found" in result.stderr, output[-3000:]
    assert "Starting temporary server" not in output
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["examples", "pairs.jsonl", "x.yaml"]  # no store, no demo folder


def test_a_run_too_short_to_change_the_model_says_so(tiny_model, tmp_path):
    """23 training rows at the deployment's batch 16 for one epoch: 2 steps, the first at learning rate 0 (warmup),
    and `loraflow runs` showed `train loss 8.3096 → 8.3096` without a word."""
    from loraflow.plan import planned_steps, short_run_note
    from loraflow.report import loss_text

    train = build_config(config_tree(tiny_model, tmp_path / "d.json", tmp_path / "store")
                         | {"train": {"batch_size": 16, "num_epochs": 1}}).train
    note = short_run_note(planned_steps(23, train), 23, train)
    assert note.startswith("only 2 optimizer steps (23 training rows, train.batch_size 16, num_epochs 1): too few to change")
    assert short_run_note(planned_steps(2000, train), 2000, train) is None
    assert loss_text({"first_loss": 8.3096, "final_loss": 8.3096, "short_run_note": note}, "{:.4f}".format) == (
        f"train loss 8.3096 → 8.3096 — {note}")


def test_a_model_that_is_neither_here_nor_on_the_hub_creates_no_store(tmp_path, server_env):
    """A trial: `--set model.base=models/tiny` (shaped like a hub id, so it is not refused as a missing folder before
    the flow) created the store folder in the env check, then failed in the sources stage."""
    (tmp_path / "d.json").write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}] * 4))
    (tmp_path / "c.yaml").write_text("model: {base: nope/missing-model}\ndata: {path: d.json}\nstorage: new-store\n")
    env = {**server_env, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "loraflow.cli", "run", "c.yaml"], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output and "nope/missing-model: not a local folder" in output, output[-3000:]
    assert not (tmp_path / "new-store").exists()
