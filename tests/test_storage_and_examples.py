"""The store trusts only committed folders; the shipped example configs validate."""

from pathlib import Path

import pytest

from loraflow.config_loader import load_config
from loraflow.data.shapes import resolve_data
from loraflow.errors import LoraflowError
from loraflow.storage import MANIFEST, ArtifactStore

REPO = Path(__file__).resolve().parents[1]


def test_a_folder_without_manifest_is_never_read_and_is_replaced_on_commit(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    uri = store.uri("dataset", "abc")
    partial = Path(store.path(uri))
    partial.mkdir(parents=True)
    (partial / "train.parquet").write_bytes(b"half a file")  # a writer died here
    assert store.manifest(uri) is None and store.list_committed(store.uri("dataset")) == []
    with pytest.raises(FileNotFoundError, match="no committed output"):
        store.local_copy(uri)

    source = tmp_path / "out"
    (source / "tokenizer").mkdir(parents=True)
    (source / "train.parquet").write_bytes(b"complete")
    (source / "tokenizer" / "tokenizer.json").write_text("{}")
    manifest = store.commit(source, uri, {"metrics": {"rows": 1}})
    assert [f["path"] for f in manifest["files"]] == ["tokenizer/tokenizer.json", "train.parquet"]
    assert (partial / "train.parquet").read_bytes() == b"complete"
    assert store.manifest(uri)["metrics"] == {"rows": 1}
    assert store.list_committed(store.uri("dataset")) == [uri]
    with pytest.raises(FileNotFoundError, match="nothing to commit"):
        store.commit(tmp_path / "missing", store.uri("dataset", "other"))


def test_memory_store_round_trip(tmp_path):
    store = ArtifactStore("memory://loraflow-test-store")
    source = tmp_path / "out"
    source.mkdir()
    (source / "a.txt").write_text("hello")
    store.commit(source, store.uri("runs", "r1", "adapter"))
    copy = store.local_copy(store.uri("runs", "r1", "adapter"), tmp_path / "cache")
    assert (copy / "a.txt").read_text() == "hello" and (copy / MANIFEST).exists()


@pytest.mark.parametrize("name", ["alpaca-qlora.yaml", "sharegpt-lora.yaml"])
def test_example_configs_validate(name):
    config = load_config(REPO / "examples" / name)
    assert config.model.base == "meta-llama/Llama-2-7b-hf"  # hub ids are not rewritten as paths
    if name == "sharegpt-lora.yaml":
        assert (config.lora.target, config.train.learning_rate, config.train.warmup) == ("attention-qv", 2e-5, 0.03)
        conversation = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]
        assert resolve_data(config.data, "sft", conversation).effective_train_on_inputs is False


def test_the_dpo_example_and_the_dpo_recipe_defaults(tmp_path):
    config = load_config(REPO / "examples" / "orca-dpo.yaml")
    assert (config.objective, config.data.format, config.dpo.beta, config.dpo.max_length) == ("dpo", "auto", 0.1, 1536)
    # A DPO config that says only what it must gets the recipe's data, LoRA and train defaults; SFT keeps its own.
    (tmp_path / "dpo.yaml").write_text("objective: dpo\nmodel: {base: m}\ndata: {path: pairs.jsonl}\ntrain: {max_steps: 50}\n")
    minimal = load_config(tmp_path / "dpo.yaml")
    assert (minimal.data.format, minimal.data.template, minimal.data.val_set_size) == ("auto", "chatml", 0)
    assert (minimal.lora.r, minimal.lora.alpha) == (16, 16)
    assert (minimal.train.learning_rate, minimal.train.micro_batch_size, minimal.train.batch_size, minimal.train.max_steps) == (5e-5, 4, 16, 50)
    # The DPO deployment's form shows the DPO recipe's values, not SFT's (its schema carries them); the SFT form has
    # no DPO section, and an SFT config with one is told to set the objective.
    from loraflow.config import FinetuneConfig
    from loraflow.objectives import DpoFinetuneConfig

    assert "dpo" not in FinetuneConfig.model_json_schema()["properties"]
    # Each form's data-format choices are its objective's.
    sft_formats = FinetuneConfig.model_json_schema()["$defs"]["DataSettings"]["properties"]["format"]["enum"]
    dpo_formats = DpoFinetuneConfig.model_json_schema()["$defs"]["DpoDataSettings"]["properties"]["format"]["enum"]
    assert sft_formats[0] == dpo_formats[0] == "auto"  # (the default first)
    assert set(sft_formats) == {"auto", "alpaca", "sharegpt", "messages"}
    assert set(dpo_formats) == {"auto", "orca", "pairs", "trl", "openai", "sharegpt-preference", "hh-rlhf"}
    (tmp_path / "sft.yaml").write_text("model: {base: m}\ndata: {path: rows.json}\ndpo: {beta: 0.2}\n")
    with pytest.raises(LoraflowError, match="the dpo section is for preference tuning: set objective: dpo"):
        load_config(tmp_path / "sft.yaml")
    schema = DpoFinetuneConfig.model_json_schema()
    assert all(field.get("title") for field in schema["$defs"]["DpoSettings"]["properties"].values())  # the DPO section reads naturally too
    assert schema["properties"]["train"]["default"]["learning_rate"] == 5e-5 and schema["properties"]["lora"]["default"]["r"] == 16
    assert schema["$defs"]["DpoDataSettings"]["properties"]["format"]["default"] == "auto"
    (tmp_path / "both.yaml").write_text("objective: dpo\nmodel: {base: m}\ndata: {path: p.jsonl}\ndpo: {start_from: sft-1, reference: separate}\n")

    with pytest.raises(LoraflowError, match="dpo.reference separate loads the base alone"):
        load_config(tmp_path / "both.yaml")
    (tmp_path / "mixed.yaml").write_text("model: {base: m}\ndata: {path: pairs.jsonl, format: orca, template: chatml}\n")
    with pytest.raises(LoraflowError, match=r"data.format: 'orca' is for preference pairs \(objective dpo\); set objective: dpo"):
        load_config(tmp_path / "mixed.yaml")
    (tmp_path / "mixed2.yaml").write_text("objective: dpo\nmodel: {base: m}\ndata: {path: d.json, format: alpaca, template: alpaca}\n")
    with pytest.raises(LoraflowError, match="objective dpo trains on preference pairs, but data.format is 'alpaca'"):
        load_config(tmp_path / "mixed2.yaml")


def test_metrics_table_has_one_rounded_row_per_step():
    from loraflow.report import metrics_table

    rows = [
        {"step": 1, "epoch": 0.0833333, "loss": 8.123456789, "learning_rate": 0.00999999, "grad_norm": 1.23456, "tokens_per_s": 1234.567},
        {"step": 2, "epoch": 0.1666666, "loss": 7.65432109, "learning_rate": 0.0095, "grad_norm": 0.987654, "tokens_per_s": 1300.2},
        {"step": 2, "epoch": 0.1666666, "eval_loss": 7.5555555},
    ]
    assert metrics_table(rows) == [
        {"step": 1, "epoch": 0.0833, "loss": 8.123, "eval_loss": None, "learning_rate": 0.01, "grad_norm": 1.23, "tokens_per_s": 1235},
        {"step": 2, "epoch": 0.167, "loss": 7.654, "eval_loss": 7.556, "learning_rate": 0.0095, "grad_norm": 0.988, "tokens_per_s": 1300},
    ]


def test_browser_urls_of_store_uris(monkeypatch):
    from loraflow.storage import ArtifactStore, browser_url

    monkeypatch.chdir("/tmp")
    assert ArtifactStore("store").uri("runs", "a") == "/tmp/store/runs/a"  # a relative store becomes absolute
    assert browser_url("/tmp/store/runs/a b") == "file:///tmp/store/runs/a%20b"
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert browser_url("s3://bucket/lf/runs/a/adapter") == "https://s3.console.aws.amazon.com/s3/buckets/bucket?prefix=lf/runs/a/adapter/"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert browser_url("s3://bucket/lf/runs/a/adapter") == "http://127.0.0.1:9000/bucket/lf/runs/a/adapter/_manifest.json"
    assert browser_url("memory://x/y") is None
