"""The whole pipeline against a real S3-protocol server on loopback (moto's server mode)."""

import json
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from loraflow import stages
from loraflow.storage import MANIFEST, ArtifactStore
from test_sft_pipeline import sft_config

pytestmark = pytest.mark.slow
BUCKET = "loraflow-test"
SECRET = "s3cr3t-" + secrets.token_hex(12)
KEY_ID = "AKIA" + secrets.token_hex(8).upper()


@pytest.fixture(scope="module")
def s3():
    """moto on a free loopback port; credentials only in the environment, as a user would have them."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    settings = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield boto3.client("s3")
    server.stop()
    for name, value in saved.items():
        os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)


def all_objects(client) -> dict[str, bytes]:
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET) for o in page.get("Contents", [])]
    return {key: client.get_object(Bucket=BUCKET, Key=key)["Body"].read() for key in keys}


def test_the_sft_flow_runs_on_s3_and_leaks_no_credentials(s3, prefect_server, tiny_model):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    from tasks.runs import task_states
    from flows.sft import sft

    sample = Path(__file__).parents[1] / "loraflow/data/sample/alpaca_gpt4_sample.json"
    s3.put_object(Bucket=BUCKET, Key="incoming/alpaca.json", Body=sample.read_bytes())
    config = sft_config(tiny_model, Path("unused"))
    config = config.model_copy(update={"storage": f"s3://{BUCKET}/store",
                                       "data": config.data.model_copy(update={"path": f"s3://{BUCKET}/incoming/alpaca.json"})})
    state = sft(config, return_state=True)
    assert state.is_completed(), state.message
    records = state.result()
    store = ArtifactStore(config.storage)
    for name in ("dataset", "base", "lora", "train", "adapter", "merged"):
        assert records[name].uri.startswith(f"s3://{BUCKET}/store/"), name
        assert store.is_committed(records[name].uri), name
    assert records["train"].metrics["final_loss"] < records["train"].metrics["first_loss"]

    # The adapter comes back from S3 and loads on the original base.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = store.local_copy(records["adapter"].uri)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model)), str(adapter))

    # Prefect's persisted results live in the same store, so a second run is served from them.
    objects = all_objects(s3)
    assert any(key.startswith("store/prefect-results/dataset-") for key in objects)
    second = sft(config, return_state=True)
    states = task_states(second.state_details.flow_run_id)
    assert [states[t] for t in ("dataset", "base", "lora", "train")] == ["Cached"] * 4

    # Nothing the runs produced carries the credentials: store objects, parameters, logs, artifacts.
    produced = [blob for blob in all_objects(s3).values()]
    ids = [state.state_details.flow_run_id, second.state_details.flow_run_id]
    with get_client(sync_client=True) as client:
        children = [r.id for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id={"any_": ids}))]
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids + children)))
        produced += [json.dumps(r.parameters, default=str).encode() for r in runs]
        produced += [log.message.encode() for log in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids + children)))]
        produced += [json.dumps(a.data, default=str).encode() for a in client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))]
    assert len(produced) > 50
    for blob in produced:
        assert SECRET.encode() not in blob and KEY_ID.encode() not in blob


def test_a_writer_killed_between_files_leaves_an_untrusted_folder(s3, tmp_path):
    store_url = f"s3://{BUCKET}/crash"
    uri = f"{store_url}/dataset/feedface"
    source = tmp_path / "out"
    source.mkdir()
    for name in ("a.parquet", "b.parquet", "c.json"):
        (source / name).write_text(name * 100)
    writer = (
        "import os, sys\n"
        "from loraflow.storage import ArtifactStore\n"
        f"store = ArtifactStore({store_url!r})\n"
        "put = store.fs.put_file\n"
        "def put_then_die(local, remote, **kw):\n"
        "    put(local, remote, **kw)\n"
        "    os._exit(137)  # killed right after the first file landed\n"
        "store.fs.put_file = put_then_die\n"
        f"store.commit({str(source)!r}, {uri!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", writer], env=os.environ.copy(), capture_output=True, timeout=120)
    assert result.returncode == 137, result.stderr
    store = ArtifactStore(store_url)
    objects = [k for k in all_objects(s3) if k.startswith("crash/dataset/feedface/")]
    assert objects == ["crash/dataset/feedface/a.parquet"]  # half written…
    assert store.manifest(uri) is None and store.list_committed(f"{store_url}/dataset") == []  # …and not trusted

    built = []

    def build(out: Path) -> dict:
        built.append(True)
        (out / "train.parquet").write_text("fresh")
        return {"rows": 1}

    record = stages.reuse_or_build(store, "dataset", "feedface", uri, build, log=lambda _: None)
    assert built and not record.reused
    # The dead writer's file stays (clearing it could delete a live concurrent writer's upload), outside the
    # manifest: it is never read, and what is committed verifies.
    assert sorted(k for k in all_objects(s3) if k.startswith("crash/dataset/feedface/")) == [
        f"crash/dataset/feedface/{MANIFEST}", "crash/dataset/feedface/a.parquet", "crash/dataset/feedface/train.parquet"]
    assert [entry["path"] for entry in store.verify(uri, hashes=True)["files"]] == ["train.parquet"]
    assert sorted(p.name for p in store.local_copy(uri, tmp_path / "cache").iterdir()) == [MANIFEST, "train.parquet"]


def test_dataset_watcher_on_an_s3_prefix(s3, tmp_path):
    """New, unchanged, changed, duplicate and invalid uploads under s3://…/incoming, memory kept in an S3 store."""
    from loraflow.watch import INVALID, UPLOADED, DatasetWatcher

    rows = json.loads((Path(__file__).parents[1] / "loraflow/data/sample/alpaca_gpt4_sample.json").read_text())
    prefix, store = f"s3://{BUCKET}/watched/incoming", f"s3://{BUCKET}/watched/store"
    put = lambda key, body: s3.put_object(Bucket=BUCKET, Key=f"watched/incoming/{key}", Body=body)  # noqa: E731

    def scan():
        watcher = DatasetWatcher(prefix, store)  # a fresh watcher each time: memory lives in the store
        found = watcher.scan()
        watcher.remember(found)
        return {item.uri.rsplit("/", 1)[-1]: item for item in found}

    put("a.jsonl", "".join(json.dumps(row) + "\n" for row in rows[:10]))
    put("readme.md", "not a dataset")
    first = scan()
    assert list(first) == ["a.jsonl"] and first["a.jsonl"].event == UPLOADED and first["a.jsonl"].rows == 10
    assert first["a.jsonl"].uri == f"{prefix}/a.jsonl" and first["a.jsonl"].format == "alpaca"
    assert scan() == {}
    put("a.jsonl", "".join(json.dumps(row) + "\n" for row in rows[10:20]))
    assert scan()["a.jsonl"].change == "changed"
    put("b.jsonl", "".join(json.dumps(row) + "\n" for row in rows[10:20]))  # a's new bytes under another name
    assert scan()["b.jsonl"].change == "duplicate" and scan() == {}
    put("c.json", json.dumps([{"question": "no instruction field"}]))
    invalid = scan()["c.json"]
    assert invalid.event == INVALID and "row 0 has fields question, which is no data shape loraflow knows" in invalid.error
    assert scan() == {}  # reported once per content


def test_concurrent_builders_on_a_bucket_build_once_with_s3_conditional_writes(s3):
    from test_store_lease import race

    store = ArtifactStore(f"s3://{BUCKET}/lease-race")
    built, records = race(store)
    assert len(built) == 1 and sorted(r.reused for r in records) == [False, True, True]
    store.verify(records[0].uri, hashes=True)
    assert not [key for key in all_objects(s3) if key.startswith("lease-race/leases/")]  # released


@pytest.fixture
def fresh_s3_clients():
    """s3fs keeps one filesystem per set of options, with the endpoint and credentials it was made with."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def test_remote_store_failures_name_the_setting_and_tell_network_from_missing(s3, monkeypatch, fresh_s3_clients, silent_endpoint, capsys):
    import time

    import s3fs

    from loraflow.data.formats import read_rows
    from loraflow.errors import LoraflowError
    from loraflow.storage import S3_GIVES_UP_WITHIN_S

    # The endpoint answered: a missing object or bucket is not a network problem.
    with pytest.raises(LoraflowError, match=rf"^data\.path s3://{BUCKET}/incoming/nothing\.json: no such object or bucket "
                                            r"\(the endpoint answered: this is not a network problem\) \[AWS settings read: AWS_ENDPOINT_URL=http://127\.0\.0\.1:"):
        read_rows(f"s3://{BUCKET}/incoming/nothing.json")
    with pytest.raises(LoraflowError, match=r"^storage s3://no-such-bucket/store: no such object or bucket"):
        ArtifactStore("s3://no-such-bucket/store").probe()
    ArtifactStore(f"s3://{BUCKET}/probe-ok").probe()  # reachable and writable: no error, nothing left behind
    assert not [key for key in all_objects(s3) if key.startswith("probe-ok/")]

    # A closed port, then a socket that accepts and never answers: a network failure, within the stated time.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    s3fs.S3FileSystem.clear_instance_cache()  # (it keeps the endpoint it was made with)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    with pytest.raises(LoraflowError, match=rf"^storage s3://{BUCKET}/store: network: the S3 endpoint http://127\.0\.0\.1:{closed} could not be reached"):
        ArtifactStore(f"s3://{BUCKET}/store").probe()
    from loraflow.cli import main

    assert main(["du", "--storage", f"s3://{BUCKET}/store"]) == 1  # the commands that take --storage say the same, once
    error = capsys.readouterr().err
    assert error.strip().startswith(f"error: --storage s3://{BUCKET}/store: network: the S3 endpoint") and "Traceback" not in error
    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setenv("AWS_ENDPOINT_URL", silent_endpoint)
    started = time.monotonic()
    with pytest.raises(LoraflowError, match=rf"^data\.path s3://{BUCKET}/a\.json: network: the S3 endpoint {silent_endpoint} could not be reached "
                                            rf"or did not answer \(gave up within {S3_GIVES_UP_WITHIN_S} s"):
        read_rows(f"s3://{BUCKET}/a.json")
    assert time.monotonic() - started < S3_GIVES_UP_WITHIN_S  # the bound the message states, not botocore's minutes

    # No credentials anywhere: said so, naming what was read.
    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.meta.endpoint_url)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # botocore would otherwise ask the instance metadata address
    with pytest.raises(LoraflowError, match=rf"^storage s3://{BUCKET}/store: no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        ArtifactStore(f"s3://{BUCKET}/store").probe()
