"""Deployments from deployments/prefect.yaml, the upload trigger, and `loraflow serve`, on a real Prefect server.

The watcher runs as `loraflow watch --once` (a real process emitting real events); the server's
trigger service turns each `loraflow.dataset.uploaded` into an SFT flow run. The runs stay scheduled
(no worker here): what is asserted is which runs the trigger created, with which parameters.
"""

import json
import re
import shutil
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from real_prefect import BIN, REPO, real_server

pytestmark = pytest.mark.slow

SAMPLE_ROWS = json.loads((REPO / "loraflow/data/sample/alpaca_gpt4_sample.json").read_text())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-server")
    with real_server(home) as running:
        running.create_pool_and_deploy()
        yield running


def _deployment(server, name: str):
    from prefect.client.orchestration import get_client

    with server.client_settings(), get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def _runs_of(server, deployment_name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deployment = _deployment(server, deployment_name)
    with server.client_settings(), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
    return sorted(runs, key=lambda run: run.created)


def _wait_for_runs(server, expected: int, settle: float = 4.0, timeout: float = 60.0, deployment: str = "loraflow-sft/sft-xpu") -> list:
    """The deployment's runs once `expected` exist and no more arrive within `settle` seconds."""
    deadline = time.time() + timeout
    while len(runs := _runs_of(server, deployment)) < expected and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(settle)
    runs = _runs_of(server, deployment)
    assert len(runs) == expected, [run.parameters.get("dataset") for run in runs]
    return runs


def test_deploy_all_registers_every_deployment_with_enforced_schemas(server):
    """The server fixture ran docs/ui-and-schedules.md's pool and deploy commands before any worker started (deploying needs the pool,
    which `infra/work-pools/create-pool` makes; `prefect deploy` refused a pool only a worker's start created)."""
    from prefect.client.orchestration import get_client

    with server.client_settings(), get_client(sync_client=True) as client:
        assert client.read_work_pool("xpu").type == "process" and not client.read_workers_for_work_pool("xpu")
    for name in ("loraflow-sft/sft-xpu", "loraflow-dpo/dpo-xpu", "loraflow-align/align-xpu", "loraflow-train/train-xpu", "loraflow-merge/merge-xpu", "loraflow-watch/watch-xpu", "loraflow-sweep/sweep-xpu"):
        deployment = _deployment(server, name)
        assert deployment.enforce_parameter_schema and deployment.work_pool_name == "xpu" and deployment.description
    sft = _deployment(server, "loraflow-sft/sft-xpu")
    assert [schedule.active for schedule in sft.schedules] == [False]  # the example schedule is off
    sections = sft.parameter_openapi_schema["definitions"]
    adapters = ("LoraAdapter", "Ia3Adapter", "VeraAdapter", "PrefixTuningAdapter", "PromptTuningAdapter")
    assert {"FinetuneConfig", "ModelSettings", "DataSettings", "TrainSettings", "MergeSettings", *adapters} <= set(sections)
    # The adapter: one form tab per method (an anyOf of their sections, which Prefect's forms render as tabs; a oneOf
    # would be a JSON box), each with only its own fields.
    assert sections["FinetuneConfig"]["properties"]["lora"]["anyOf"] == [{"$ref": f"#/definitions/{name}"} for name in adapters]
    assert [sections[name]["title"] for name in adapters] == ["LoRA", "IA3", "VeRA", "Prefix tuning", "Prompt tuning"]
    assert "r" in sections["LoraAdapter"]["properties"] and "r" not in sections["Ia3Adapter"]["properties"]
    for section in ("ModelSettings", "DataSettings", "TrainSettings", "MergeSettings", *adapters):
        for field, schema in sections[section]["properties"].items():
            assert schema.get("description"), f"{section}.{field} has no description for the UI form"
    assert sections["DataSettings"]["properties"]["template"]["enum"][:3] == ["auto", "alpaca", "alpaca_legacy"]
    from prefect.client.orchestration import get_client

    with server.client_settings(), get_client(sync_client=True) as client:
        automations = [automation.name for automation in client.read_automations()]
    # Named for what they do, not "xpu__automation_1".
    assert sorted(automations) == ["fine-tune each new dataset upload", "preference-tune each new preference upload"]
    dpo = _deployment(server, "loraflow-dpo/dpo-xpu")
    assert dpo.parameters["config"]["objective"] == "dpo"
    assert dpo.parameter_openapi_schema["definitions"]["DpoFinetuneConfig"]["properties"]["lora"]["anyOf"] == [
        {"$ref": "#/definitions/DpoLoraAdapter"}, {"$ref": "#/definitions/Ia3Adapter"},
        {"$ref": "#/definitions/VeraAdapter"}]  # (the methods that train weights: TRL's DPOTrainer trains these)
    for field, schema in dpo.parameter_openapi_schema["definitions"]["DpoSettings"]["properties"].items():
        assert schema.get("description") and schema.get("title"), f"dpo.{field} has no title or description for the UI form"
    assert set(sections["TrainSettings"]["properties"]["launcher"]["enum"]) == {"local", "torchrun", "deepspeed", "mpirun"}


def _events(server, name: str, expected: int = 1, timeout: float = 30) -> list[dict]:
    """The server's events of this name, once there are `expected` (the server stores events in batches)."""
    import httpx

    deadline = time.time() + timeout
    while True:
        reply = httpx.post(f"{server.api_url}/events/filter", json={"filter": {"event": {"name": [name]}}, "limit": 50})
        reply.raise_for_status()
        events = reply.json()["events"]
        if len(events) >= expected or time.time() > deadline:
            return events
        time.sleep(0.5)


def test_the_watcher_creates_a_missing_local_folder(server, tmp_path):
    incoming = tmp_path / "not-yet" / "incoming"
    output = _watch(server, incoming, tmp_path / "store")
    assert incoming.is_dir() and f"{incoming}: created the watched folder" in output and "no new or changed dataset files" in output
    assert "Still processing items" not in output


def _watch(server, incoming, store) -> str:
    result = server.run(str(BIN / "loraflow"), "watch", str(incoming), "--storage", str(store), "--once")
    return result.stdout + result.stderr


def test_each_new_or_changed_dataset_starts_exactly_one_fine_tune(server, tmp_path):
    incoming, store = tmp_path / "incoming", tmp_path / "store"
    incoming.mkdir()
    (incoming / "first.json").write_text(json.dumps(SAMPLE_ROWS[:20]))
    (incoming / "notes.txt").write_text("not a dataset")
    assert "new dataset" in _watch(server, incoming, store)
    runs = _wait_for_runs(server, 1)
    assert runs[0].parameters["dataset"] == str(incoming / "first.json")
    assert runs[0].parameters["config"]["name"] == "demo"  # the deployment's defaults, with the file as dataset
    [uploaded] = _events(server, "loraflow.dataset.uploaded")
    assert runs[0].parameters["upload_event"] == uploaded["id"]  # the run knows the event that started it
    assert uploaded["resource"]["loraflow.format"] == "alpaca" and uploaded["resource"]["loraflow.rows"] == "20"

    assert "no new or changed dataset files" in _watch(server, incoming, store)
    _wait_for_runs(server, 1)

    (incoming / "first.json").write_text(json.dumps(SAMPLE_ROWS[20:40]))  # changed content, same name
    assert "changed dataset" in _watch(server, incoming, store)
    assert [run.parameters["dataset"] for run in _wait_for_runs(server, 2)] == [str(incoming / "first.json")] * 2

    with (incoming / "second.jsonl").open("w") as stream:
        stream.writelines(json.dumps(row) + "\n" for row in SAMPLE_ROWS[40:60])
    pq.write_table(pa.Table.from_pylist(SAMPLE_ROWS[60:80]), incoming / "third.parquet")
    _watch(server, incoming, store)
    started = {run.parameters["dataset"] for run in _wait_for_runs(server, 4)[2:]}
    assert started == {str(incoming / "second.jsonl"), str(incoming / "third.parquet")}

    # Same bytes under a new name: the fine-tune it would start already ran; nothing starts.
    shutil.copyfile(incoming / "third.parquet", incoming / "third-copy.parquet")
    assert f"same bytes as {incoming / 'third.parquet'}" in _watch(server, incoming, store)
    _wait_for_runs(server, 4)

    # A half-written file is reported invalid (once), and starts its fine-tune when it is complete.
    complete = json.dumps(SAMPLE_ROWS[80:100])
    (incoming / "late.json").write_text(complete[: len(complete) // 2])
    output = _watch(server, incoming, store)
    assert f"invalid dataset {incoming / 'late.json'}" in output and "malformed JSON" in output
    # The reason is on the event's resource (the UI's Details tab), whole: file, line and what it means.
    [invalid] = _events(server, "loraflow.dataset.invalid")
    assert invalid["resource"]["loraflow.uri"] == str(incoming / "late.json") and invalid["resource"]["loraflow.line"] == "1"
    assert invalid["resource"]["loraflow.error"].startswith("malformed JSON: Unterminated string starting at line 1, column ")
    assert invalid["resource"]["loraflow.error"].endswith("the file ends in the middle of a value: it may still be uploading, or was cut short")
    _wait_for_runs(server, 4)
    assert "no new or changed" in _watch(server, incoming, store)
    (incoming / "late.json").write_text(complete)
    assert "new dataset" in _watch(server, incoming, store)
    assert _wait_for_runs(server, 5)[-1].parameters["dataset"] == str(incoming / "late.json")


def test_a_preference_file_starts_the_dpo_deployment_and_an_sft_file_the_sft_one_never_both(server, tmp_path):
    incoming, store = tmp_path / "incoming", tmp_path / "store"
    incoming.mkdir()
    sft_before = len(_runs_of(server, "loraflow-sft/sft-xpu"))
    (incoming / "instructions.json").write_text(json.dumps(SAMPLE_ROWS[100:120]))
    shutil.copyfile(REPO / "loraflow/data/sample/orca_dpo_pairs_sample.jsonl", incoming / "pairs.jsonl")
    output = _watch(server, incoming, store)
    assert output.count("new dataset") == 2, output
    [dpo_run] = _wait_for_runs(server, 1, deployment="loraflow-dpo/dpo-xpu")
    assert dpo_run.parameters["dataset"] == str(incoming / "pairs.jsonl")
    sft_runs = _wait_for_runs(server, sft_before + 1)
    assert sft_runs[-1].parameters["dataset"] == str(incoming / "instructions.json")
    labels = {event["resource"]["loraflow.uri"]: event["resource"] for event in _events(server, "loraflow.dataset.uploaded", expected=7)}
    assert labels[str(incoming / "pairs.jsonl")]["loraflow.objective"] == "dpo" and labels[str(incoming / "pairs.jsonl")]["loraflow.format"] == "orca"
    assert labels[str(incoming / "instructions.json")]["loraflow.objective"] == "sft"


def test_loraflow_serve_registers_and_runs_the_deployments(tmp_path):
    """`loraflow serve` (no worker, no pool): its deployments appear with the config as defaults and its process runs them.

    Its own server: the served SFT deployment has the upload trigger too, and must not see the other tests' events.
    """
    with real_server(tmp_path / "prefect") as server:
        _serve_and_run_the_watcher(server, tmp_path)


def _serve_and_run_the_watcher(server, tmp_path):

    config = tmp_path / "served.yaml"
    config.write_text(json.dumps({"name": "served", "storage": str(tmp_path / "store"),
                                  "model": {"base": "some/model"}, "data": {"path": str(tmp_path / "data.json")}}))
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "a.json").write_text(json.dumps(SAMPLE_ROWS[:10]))
    (tmp_path / "store").mkdir()
    log = server.start_background(str(BIN / "loraflow"), "serve", "--config", str(config), "--watch", str(incoming), "--interval", "3600",
                                  "--store-port", "0", log_name="serve.log")
    from prefect.exceptions import ObjectNotFound

    deadline = time.time() + 90
    while True:  # serve registers its deployments one after another: wait for every one
        try:
            watch = _deployment(server, "loraflow-watch/watch-local")
            sft = _deployment(server, "loraflow-sft/sft-local")
            for name in ("train", "merge", "align", "dpo", "sweep"):
                _deployment(server, f"loraflow-{name}/{name}-local")
            break
        except ObjectNotFound:
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(1)
    assert sft.parameters["config"]["name"] == "served" and sft.enforce_parameter_schema
    # It serves the config's store too (read-only, loopback), so the artifact links of its runs open in the UI.
    import httpx

    store_url = re.search(rf"serving the store {tmp_path / 'store'} read-only at (http://127\.0\.0\.1:\d+)/", log.read_text()).group(1)
    assert f"loraflow artifact store <code>{tmp_path / 'store'}</code>, read-only" in httpx.get(f"{store_url}/", follow_redirects=True).text
    assert watch.parameters["prefix"] == str(incoming)
    for name in ("loraflow-train/train-local", "loraflow-merge/merge-local"):
        _deployment(server, name)
    align = _deployment(server, "loraflow-align/align-local")
    assert align.parameters["config"]["name"] == "served" and align.parameters["preferences"]["objective"] == "dpo"
    dpo = _deployment(server, "loraflow-dpo/dpo-local")  # its own preference data, the served model and store
    assert dpo.parameters["config"]["objective"] == "dpo" and dpo.parameters["config"]["model"]["base"] == "some/model"
    assert dpo.parameters["config"]["data"]["path"] == str(REPO / "loraflow/data/sample/orca_dpo_pairs_sample.jsonl")

    # --watch gave the watcher an interval schedule (its runs come every --interval s); run it now as well.
    started = server.run(str(BIN / "prefect"), "deployment", "run", "loraflow-watch/watch-local").stdout
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", started).group(1)
    deadline = time.time() + 90
    while not (run := next(r for r in _runs_of(server, "loraflow-watch/watch-local") if str(r.id) == run_id)).state.is_final():
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(1)
    assert run.state.is_completed(), log.read_text()[-3000:]
    watch = _deployment(server, "loraflow-watch/watch-local")
    assert [(schedule.active, schedule.schedule.interval.total_seconds()) for schedule in watch.schedules] == [(True, 3600)]
    assert f"new dataset {incoming / 'a.json'}" in log.read_text()
