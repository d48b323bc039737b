"""End to end through a real Prefect server and a real process worker on the xpu pool.

The pool is created from infra/work-pools/xpu.json, the worker started by infra/worker/start-worker, the training
deployment from deployments/prefect.yaml by `prefect deploy`, and the SFT flow (run with
`loraflow run`, train.pool: xpu) hands training to that worker through run_deployment. A failed
deployment run retried with `prefect flow-run retry` (the UI's Retry) reuses every finished stage.
"""

import json
import re
import subprocess
import time

import pytest
import yaml

from real_prefect import BIN, REPO, flow_run_logs, server_with_pool_worker, sigint_as_in_a_terminal

pytestmark = pytest.mark.slow

SAMPLE = REPO / "loraflow" / "data" / "sample" / "alpaca_gpt4_sample.json"


def _flow_runs(server, flow_name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with server.client_settings(), get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))


def _artifacts(server, flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with server.client_settings(), get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def _config(tiny_model, tmp_path, **train) -> dict:
    return {
        "name": "pooled", "storage": str(tmp_path / "store"),
        "model": {"base": str(tiny_model)},
        "data": {"path": str(SAMPLE), "val_set_size": 8, "cutoff_len": 128},
        "train": {"learning_rate": 1e-2, "batch_size": 8, "micro_batch_size": 4, "max_steps": 2,
                  "save_steps": 2, "eval_steps": 2, "gradient_checkpointing": "off", **train},
        "merge": {"enabled": False},
    }


def _dpo_config(tiny_model, tmp_path, **train) -> dict:
    return {"name": "pooled-dpo", "objective": "dpo", "storage": str(tmp_path / "store"), "model": {"base": str(tiny_model)},
            "data": {"path": str(REPO / "loraflow/data/sample/orca_dpo_pairs_sample.jsonl"), "val_set_size": 0},
            "dpo": {"max_prompt_length": 96, "max_length": 160},
            "train": {"learning_rate": 1e-3, "batch_size": 8, "micro_batch_size": 4, "max_steps": 2, "save_steps": 2,
                      "gradient_checkpointing": "off", **train},
            "merge": {"enabled": False}}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A server, the xpu pool from its JSON, a worker started by infra/worker/start-worker, and the deployments."""
    home = tmp_path_factory.mktemp("prefect-pool")
    with server_with_pool_worker(home, "e2e-worker") as server:
        yield server


def test_sft_hands_training_to_a_worker_of_the_xpu_pool(pool, tiny_model, tmp_path):
    server = pool
    config = tmp_path / "pool.yaml"
    config.write_text(yaml.safe_dump(_config(tiny_model, tmp_path, pool="xpu")))
    with server.client_settings():
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            work_pool = client.read_work_pool("xpu")
    assert work_pool.type == "process"
    template = json.loads((REPO / "infra/work-pools/xpu.json").read_text())
    assert work_pool.base_job_template["variables"]["properties"].keys() == template["variables"]["properties"].keys()

    first = server.run(str(BIN / "loraflow"), "run", str(config), timeout=600)
    # What was kept, dropped and truncated is in the terminal summary, not only in stats.json.
    assert re.search(r"data: 200 rows read, 200 kept \(192 train / 8 validation\); dropped: none; \d+ truncated at cutoff 128", first.stdout)
    trainings = _flow_runs(server, "loraflow-train")
    assert len(trainings) == 1, first.stdout[-3000:]
    training = trainings[0]
    assert training.state.is_completed() and training.work_pool_name == "xpu" and training.deployment_id is not None
    assert training.infrastructure_pid  # a worker started it as a process
    worker_output = server.worker_log.read_text()
    assert "e2e-worker" in worker_output and str(training.id) in worker_output
    assert "trained adapter committed" in worker_output  # the trainer's log went through the worker
    assert len(list((tmp_path / "store" / "runs").glob("pooled-*/adapter/adapter_model.safetensors"))) == 1
    # The fine-tune's own run shows its training: the job's log lines relayed, and the progress bar.
    [fine_tune] = _flow_runs(server, "loraflow-sft")
    messages = [log.message for log in flow_run_logs(server, fine_tune.id)]
    assert any(m.startswith("[pool job] trained adapter committed") for m in messages), messages[-20:]
    progress = [a for a in _artifacts(server, fine_tune.id) if a.type == "progress"]
    assert len(progress) == 1 and progress[0].key.startswith("pooled-") and progress[0].data == 100.0

    # The same fine-tune again: its idempotency key finds the finished job; no second training run.
    again = server.run(str(BIN / "loraflow"), "run", str(config), timeout=600)
    assert len(_flow_runs(server, "loraflow-train")) == 1, again.stdout[-3000:]


def _wait_final(server, flow_run_id, timeout: float = 300):
    from prefect.client.orchestration import get_client

    deadline = time.time() + timeout
    with server.client_settings(), get_client(sync_client=True) as client:
        while not (run := client.read_flow_run(flow_run_id)).state.is_final():
            assert time.time() < deadline, server.worker_log.read_text()[-3000:]
            time.sleep(1)
    return run


def _fail_then_retry_in_the_ui(server, deployment_name: str, parameters: dict) -> dict[str, str]:
    """A run of the deployment whose training fails after checkpoint-2 (first attempt only), then the UI's Retry
    (`prefect flow-run retry`): the task states of the retried run, which must complete."""
    from prefect.client.orchestration import get_client

    from tasks.runs import task_states

    with server.client_settings(), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(deployment_name)
        run = client.create_flow_run_from_deployment(deployment.id, parameters=parameters,
                                                     job_variables={"env": {"LORAFLOW_TEST_FAIL_AT_STEP": "3"}})
    failed = _wait_final(server, run.id)
    assert failed.state.is_failed(), failed.state
    server.run(str(BIN / "prefect"), "flow-run", "retry", str(run.id))
    retried = _wait_final(server, run.id)
    assert retried.state.is_completed(), server.worker_log.read_text()[-3000:]
    assert retried.name == failed.name  # the name `loraflow runs` showed stays the run's (Prefect names it again on Retry)
    # One progress card for the fine-tune, at its end: the retry moved the first attempt's card on (not a card per attempt).
    progress = [a for a in _artifacts(server, run.id) if a.type == "progress"]
    assert [(a.data, a.description.rsplit(": ", 1)[-1]) for a in progress] == [(100.0, "step 4 of 4 (100%)")], progress
    with server.client_settings():
        return task_states(run.id) | {"flow run name": retried.name}


def test_prefect_flow_run_retry_of_a_failed_deployment_run_reuses_every_finished_stage(pool, tiny_model, tmp_path):
    """What the UI's Retry button does: the same flow run, rescheduled, picked up by the worker again."""
    server = pool
    config = _config(tiny_model, tmp_path, max_steps=4, retries=0)
    subset = tmp_path / "uploaded.json"  # given as `dataset`, as the upload trigger does: it replaces data.path
    subset.write_text(json.dumps(json.loads(SAMPLE.read_text())[:60]))
    states = _fail_then_retry_in_the_ui(server, "loraflow-sft/sft-xpu", {"config": config, "dataset": str(subset)})
    summary = server.run(str(BIN / "loraflow"), "artifacts", states["flow run name"]).stdout  # the name before Retry
    assert summary.startswith("# Fine-tune `pooled-"), summary[:500]
    assert {states[name] for name in ("dataset", "base", "lora")} == {"Cached"}
    assert states["train"] == "Completed"
    assert "resuming from" in server.worker_log.read_text() and "checkpoint-2" in server.worker_log.read_text()
    [stats] = (tmp_path / "store" / "dataset").glob("*/stats.json")
    assert json.loads(stats.read_text())["source"] == str(subset) and json.loads(stats.read_text())["rows_read"] == 60


def test_ui_retry_of_a_failed_dpo_run_reuses_pairs_base_lora_and_reference_and_resumes(pool, tiny_model, tmp_path):
    """The UI's Retry on a dpo-xpu run whose training failed after its first checkpoint: the pairs, the base, the
    LoRA init and the reference log-probs come back Cached, no reference forward pass runs, training resumes."""
    server = pool
    config = _dpo_config(tiny_model, tmp_path, max_steps=4, retries=0)
    states = _fail_then_retry_in_the_ui(server, "loraflow-dpo/dpo-xpu", {"config": config})
    assert {states[name] for name in ("dataset", "base", "lora", "reference")} == {"Cached"}, states
    assert states["train"] == "Completed"
    [summary] = (tmp_path / "store" / "runs").glob("pooled-dpo-*/checkpoints/final/train_summary.json")
    summary = json.loads(summary.read_text())
    assert summary["reference_forwards"] == 0 and summary["resumed_from"].endswith("checkpoint-2"), summary
    assert len(list((tmp_path / "store" / "reference").glob("*/_manifest.json"))) == 1


def test_stopping_the_fine_tune_cancels_its_training_job_and_leaves_no_trainer(pool, tiny_model, tmp_path):
    """Ctrl-C on `loraflow run` while its training runs on the pool: the training flow run is cancelled,
    the worker stops it, and no `loraflow.train` process survives."""
    import os
    import signal
    import subprocess

    import psutil

    server = pool
    config = tmp_path / "long.yaml"
    config.write_text(yaml.safe_dump(_config(tiny_model, tmp_path, pool="xpu", max_steps=100000, save_steps=1000, eval_steps=1000)))
    runs_before = {run.id for run in _flow_runs(server, "loraflow-train")}
    output = tmp_path / "run.log"  # (a file, not a pipe nobody reads while it waits: a full pipe would block the command)
    with output.open("w") as sink:
        fine_tune = subprocess.Popen([str(BIN / "loraflow"), "run", str(config)], env=server.env, cwd=REPO,
                                     stdout=sink, stderr=subprocess.STDOUT, text=True, preexec_fn=sigint_as_in_a_terminal)

    def this_tests_trainers() -> list:
        return [p for p in psutil.process_iter(["cmdline"]) if "loraflow.train" in " ".join(p.info["cmdline"] or [])
                and str(tmp_path) in " ".join(p.info["cmdline"] or [])]

    try:
        deadline = time.time() + 240
        while not (trainers := this_tests_trainers()):
            assert time.time() < deadline and fine_tune.poll() is None, output.read_text()[-3000:] if fine_tune.poll() is not None else "no trainer started"
            time.sleep(1)
        training = next(run for run in _flow_runs(server, "loraflow-train") if run.id not in runs_before)

        os.kill(fine_tune.pid, signal.SIGINT)
        try:
            fine_tune.wait(timeout=60)
        except subprocess.TimeoutExpired:  # (the block's end stops it)
            pytest.fail(f"loraflow run went on 60 s after Ctrl-C; its output:\n{output.read_text()[-4000:]}")
        assert _wait_final(server, training.id, timeout=120).state.name == "Cancelled"
        gone, alive = psutil.wait_procs(trainers, timeout=60)
        assert not alive, [p.pid for p in alive]
    finally:
        # A failure anywhere here must not leave the 100000-step job holding the pool's one training slot for the
        # module's later tests: the fine-tune, its job and its trainer are stopped whatever happened.
        if fine_tune.poll() is None:
            fine_tune.kill()
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelling

        with server.client_settings(), get_client(sync_client=True) as client:
            for run in _flow_runs(server, "loraflow-train"):
                if run.id not in runs_before and not run.state.is_final():
                    client.set_flow_run_state(run.id, Cancelling(message="test cleanup"), force=True)
        for trainer in this_tests_trainers():
            try:
                trainer.kill()
            except psutil.NoSuchProcess:
                pass


def test_a_schedule_added_to_the_sft_and_dpo_deployments_starts_fine_tunes_that_complete_on_the_worker(pool, tiny_model, tmp_path):
    """What the UI's Schedules panel does: the server's scheduler creates the runs, a worker of the pool runs them.

    Fails where the scheduler cannot create runs (Prefect 3.8 with SQLAlchemy 2.1: "Can't evaluate bulk DML statement").
    """
    from datetime import datetime, timedelta, timezone

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.schedules import IntervalSchedule

    server = pool
    configs = {"loraflow-sft/sft-xpu": {**_config(tiny_model, tmp_path), "name": "scheduled"},
               "loraflow-dpo/dpo-xpu": {**_dpo_config(tiny_model, tmp_path), "name": "scheduled-dpo"}}
    # Hourly from 20 s from now: the first runs are due soon, the next not within the test. The scheduler (every
    # 5 s here) must see a schedule before its anchor, or the first run is an hour later: 20 s leaves room for a
    # loaded machine.
    first = datetime.now(timezone.utc) + timedelta(seconds=20)
    due = {}
    with server.client_settings(), get_client(sync_client=True) as client:
        schedules = {}
        for name, config in configs.items():
            deployment = client.read_deployment_by_name(name)
            [schedules[deployment.id]] = client.create_deployment_schedules(deployment.id, [DeploymentScheduleCreate(
                schedule=IntervalSchedule(interval=timedelta(hours=1), anchor_date=first), active=True,
                parameters={"config": config})])
        try:
            deadline = time.time() + 120
            for (deployment_id, schedule), config in zip(schedules.items(), configs.values()):
                while not (runs := [run for run in client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
                                    if run.auto_scheduled and run.parameters["config"]["name"] == config["name"]]):
                    assert time.time() < deadline, f"the scheduler created no run in 120 s:\n{server.log.read_text()[-3000:]}"
                    time.sleep(1)
                due[config["name"]] = min(runs, key=lambda run: run.expected_start_time)
                assert due[config["name"]].expected_start_time <= first + timedelta(seconds=1), \
                    f"the first run is due at {due[config['name']].expected_start_time}, not {first}"
            finished = {name: _wait_final(server, run.id, timeout=400) for name, run in due.items()}
        finally:  # (deleting a schedule deletes its runs that have not started)
            for deployment_id, schedule in schedules.items():
                client.delete_deployment_schedule(deployment_id, schedule.id)
    assert all(run.state.is_completed() for run in finished.values()), server.worker_log.read_text()[-3000:]
    assert finished["scheduled"].name.startswith("scheduled-alpaca-gpt4-sample-")  # named after its config and dataset
    assert finished["scheduled-dpo"].name.startswith("scheduled-dpo-orca-dpo-pairs-sample-")
    for run in ("scheduled-????????????", "scheduled-dpo-*"):
        assert list((tmp_path / "store" / "runs").glob(f"{run}/adapter/adapter_model.safetensors")), run


def test_three_fine_tunes_of_one_base_started_at_once_build_it_once_and_all_complete(pool, tiny_model, tmp_path):
    """Three uploads landing together: three runs of the SFT deployment with different data start at the same
    moment on the worker, against one store. The base is quantized by one of them (the others wait for it and
    reuse it), all three complete, and every committed folder in the store verifies against its manifest."""
    from prefect.client.orchestration import get_client

    from loraflow.storage import MANIFEST, ArtifactStore

    server = pool
    config = _config(tiny_model, tmp_path, eval_steps=1000)
    config["name"] = "together"
    rows = json.loads(SAMPLE.read_text())
    uploads = []
    for n in range(3):
        uploads.append(tmp_path / f"upload-{n}.json")
        uploads[-1].write_text(json.dumps(rows[n * 50:(n + 1) * 50]))
    with server.client_settings(), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("loraflow-sft/sft-xpu")
        # Quantizing the tiny base takes a fraction of a second; a real base takes minutes, so the runs overlap: the
        # one that builds it holds the build until the other two are waiting for it (however loaded the host is).
        release = tmp_path / "release-the-base"
        slow = {"env": {"LORAFLOW_TEST_SLOW_STAGE": "base", "LORAFLOW_TEST_HOLD_UNTIL": str(release)}}
        runs = [client.create_flow_run_from_deployment(deployment.id, parameters={"config": config, "dataset": str(upload)},
                                                       job_variables=slow) for upload in uploads]
    deadline = time.time() + 300
    while sum(any("waiting to reuse it" in log.message for log in flow_run_logs(server, run.id)) for run in runs) < 2:
        assert time.time() < deadline, server.worker_log.read_text()[-3000:]
        time.sleep(1)
    release.touch()
    finished = [_wait_final(server, run.id, timeout=600) for run in runs]
    assert all(run.state.is_completed() for run in finished), [run.state for run in finished]
    logs = [[log.message for log in flow_run_logs(server, run.id)] for run in runs]
    built = [n for n, messages in enumerate(logs) if any(m.startswith("base: committed") for m in messages)]
    assert len(built) == 1, [[m for m in messages if m.startswith("base")] for messages in logs]
    assert all(any(m.startswith("base-") and "waiting to reuse it" in m for m in messages)
               for n, messages in enumerate(logs) if n not in built), "the three never overlapped: the test proved nothing"
    store = ArtifactStore(str(tmp_path / "store"))
    committed = [folder.parent for folder in (tmp_path / "store").rglob(MANIFEST)]
    assert len(list((tmp_path / "store" / "runs").glob("together-*/adapter"))) == 3
    for folder in committed:
        store.verify(str(folder), hashes=True)
    assert not list((tmp_path / "store" / "leases").rglob("*.json"))


def test_a_parallel_sweep_runs_its_variants_at_once_and_the_pools_limit_trains_one_at_a_time(pool, tiny_model, tmp_path):
    """`loraflow sweep --parallel 2` with train.pool: both variants' fine-tunes run at once, and the pool's concurrency
    limit (1 here: one device) keeps their training jobs one after the other."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolUpdate

    server = pool
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({**_config(tiny_model, tmp_path, pool="xpu", eval_steps=1000), "name": "swept"}))
    with server.client_settings(), get_client(sync_client=True) as client:
        client.update_work_pool("xpu", WorkPoolUpdate(concurrency_limit=1))
    try:
        result = server.run(str(BIN / "loraflow"), "sweep", str(config), "--grid", "train.learning_rate=[1e-2,2e-2]",
                            "--parallel", "2", "--metric", "train_loss", timeout=600)
    finally:
        with server.client_settings(), get_client(sync_client=True) as client:
            client.update_work_pool("xpu", WorkPoolUpdate(concurrency_limit=None))
    assert "variants ranked by train_loss" in result.stdout, result.stdout[-3000:]
    assert "train.learning_rate=0.01" in result.stdout and "train.learning_rate=0.02" in result.stdout  # what each variant changed

    def intervals(flow_name):
        runs = [run for run in _flow_runs(server, flow_name) if run.parameters["config"]["name"] in ("swept-v1", "swept-v2")]
        assert len(runs) == 2 and all(run.state.is_completed() for run in runs), [run.state for run in runs]
        return sorted((run.start_time, run.end_time) for run in runs)

    (first_start, first_end), (second_start, second_end) = intervals("loraflow-sft")
    assert second_start < first_end, "the variants' fine-tunes ran one after the other"
    (first_start, first_end), (second_start, second_end) = intervals("loraflow-train")
    assert first_end <= second_start, "two training jobs ran at once on a pool limited to one"


def test_dpo_hands_training_to_the_pool_with_its_precomputed_reference(pool, tiny_model, tmp_path):
    """The DPO deployment on the worker, its training a job of the xpu pool (train-xpu), which computes the
    reference log-probs on its own host before training and trains without a reference pass."""
    from prefect.client.orchestration import get_client

    server = pool
    config = _dpo_config(tiny_model, tmp_path, pool="xpu")
    before = {run.id for run in _flow_runs(server, "loraflow-train")}
    with server.client_settings(), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("loraflow-dpo/dpo-xpu")
        run = client.create_flow_run_from_deployment(deployment.id, parameters={"config": config})
    finished = _wait_final(server, run.id, timeout=400)
    assert finished.state.is_completed(), server.worker_log.read_text()[-3000:]
    [job] = [r for r in _flow_runs(server, "loraflow-train") if r.id not in before]
    assert job.state.is_completed() and "reference" not in job.parameters["records"]  # the job computed it, on the pool's host
    assert len(list((tmp_path / "store" / "reference").glob("*/_manifest.json"))) == 1
    from tasks.runs import task_states

    with server.client_settings():
        assert task_states(job.id)["reference"] == "Completed"  # a task of the pool job, not of the fine-tune
    # The run's state is final before its process has sent its last batches of log lines: they are read until there.
    deadline = time.time() + 60
    while True:
        messages = [log.message for log in flow_run_logs(server, run.id)]
        if any(m.startswith("[pool job] trained adapter committed") for m in messages):
            break
        assert time.time() < deadline, (len(messages), messages[-20:])
        time.sleep(1)
    [summary] = (tmp_path / "store" / "runs").glob("pooled-dpo-*/checkpoints/final/train_summary.json")
    assert json.loads(summary.read_text())["reference_forwards"] == 0


def test_a_training_job_that_fails_on_the_worker_is_one_error_with_its_reason(pool, tiny_model, tmp_path):
    """The worker checks what only the training host can (here: MLflow without MLFLOW_TRACKING_URI in its environment);
    the fine-tune then ends with that reason as one error line, not a traceback."""
    server = pool
    config = tmp_path / "pool.yaml"
    config.write_text(yaml.safe_dump(_config(tiny_model, tmp_path, pool="xpu", report_to=["mlflow"])))
    result = subprocess.run([str(BIN / "loraflow"), "run", str(config)], env={**server.env, "MLFLOW_TRACKING_URI": ""},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout[-3000:]
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert re.match(r"error: the training job \S+ on pool 'xpu' ended Failed: environment check failed:", error), result.stderr[-3000:]
    assert "train.report_to mlflow needs MLFLOW_TRACKING_URI in the training process's environment" in result.stderr
    assert "Traceback" not in result.stderr and "RuntimeError" not in result.stdout + result.stderr
    # `loraflow runs` shows why it failed.
    listed = server.run(str(BIN / "loraflow"), "runs").stdout
    [row] = [line for line in listed.splitlines() if " Failed " in line and "pool 'xpu' ended Failed" in line]
    assert "environment check failed" in row, listed


# Every data shape uploaded (one run each, completed): tests/test_combinations.py, beside the other entry points.


def test_stopping_the_worker_ends_its_running_fine_tune_as_crashed_within_seconds(pool, tiny_model, tmp_path):
    """SIGTERM to infra/worker/start-worker (systemd's stop, kill) while it runs a fine-tune: the worker
    exits within 30 s, the run ends Crashed (so a Retry resumes it) instead of staying Running, and no
    trainer survives. Last in this module: it stops the module's worker."""
    import os
    import signal

    import psutil
    from prefect.client.orchestration import get_client

    server = pool
    config = _config(tiny_model, tmp_path, max_steps=100000, save_steps=1000, eval_steps=1000)
    with server.client_settings(), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("loraflow-sft/sft-xpu")
        run = client.create_flow_run_from_deployment(deployment.id, parameters={"config": config})
    deadline = time.time() + 240
    while not (trainers := [p for p in psutil.process_iter(["cmdline"]) if "loraflow.train" in " ".join(p.info["cmdline"] or [])
                            and str(tmp_path) in " ".join(p.info["cmdline"] or [])]):
        assert time.time() < deadline, server.worker_log.read_text()[-3000:]
        time.sleep(1)
    worker = next(process for process in server.processes if "start-worker" in " ".join(process.args))
    started = time.time()
    os.kill(worker.pid, signal.SIGTERM)
    worker.wait(timeout=30)
    # Exit 0 within seconds: not start-worker's kill after LORAFLOW_WORKER_STOP_SECONDS (exit 1), which is what a
    # worker started with SIGINT ignored needed before start-worker reset it (Prefect stops its worker with SIGINT).
    assert time.time() - started < 15 and worker.returncode == 0, server.worker_log.read_text()[-3000:]
    final = _wait_final(server, run.id, timeout=30).state
    assert final.name == "Crashed", (final.message, [log.message for log in flow_run_logs(server, run.id)][-15:], server.worker_log.read_text()[-3000:])
    gone, alive = psutil.wait_procs(trainers, timeout=30)
    assert not alive, [p.pid for p in alive]


LOST_STOP_SIGNAL = r'''
import os, signal, sys, time, weakref
from prefect.exceptions import TerminationSignal
from prefect.utilities.engine import _prefect_sigterm_handler
if sys.argv[1] == "prepared":
    from tasks.common import prepare_flow_process
    prepare_flow_process()
signal.signal(signal.SIGTERM, _prefect_sigterm_handler)  # as a flow run's engine installs it (SIGINT: Python's own)
stop = getattr(signal, sys.argv[2])
class Imported: pass
module = Imported()
# The handler runs inside this callback (as inside an import's module-lock cleanup, or a finaliser the garbage
# collector runs), where CPython only prints its error.
cleanup = weakref.ref(module, lambda _: os.kill(os.getpid(), stop))
try:
    del module
    time.sleep(3)  # (a signal's handler runs as soon as it arrives: the sleep ends early)
except (TerminationSignal, KeyboardInterrupt):
    print("the run ends")
else:
    print("the run goes on")
'''


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_swallowed_where_python_only_prints_errors_is_sent_again(stop):
    """A worker's SIGTERM once reached a flow run during an import: the TerminationSignal raised in importlib's cleanup
    callback was only printed and the run trained on. Ctrl-C's KeyboardInterrupt is lost the same way (a fine-tune
    waiting for its pool job would go on waiting, the job training on). A flow process re-sends either, so the run ends."""
    import subprocess
    import sys

    def run(mode: str) -> str:
        return subprocess.run([sys.executable, "-c", LOST_STOP_SIGNAL, mode, stop], cwd=REPO, capture_output=True,
                              text=True, timeout=120, preexec_fn=sigint_as_in_a_terminal).stdout.strip()

    assert run("plain") == "the run goes on"  # the loss this guards against, as plain CPython and Prefect have it
    assert run("prepared") == "the run ends"
