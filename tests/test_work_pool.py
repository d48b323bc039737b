"""End to end through a real Prefect server and a real process worker on the xpu pool.

The pool is created from infra/work-pools/xpu.json, the worker started by infra/worker/start-worker, the training
deployment from deployments/prefect.yaml by `prefect deploy`, and the SFT flow (run with
`loraflow run`, train.pool: xpu) hands training to that worker through run_deployment.
"""

import json
import sys
from pathlib import Path

import pytest
import yaml

from real_prefect import BIN, REPO, real_server

pytestmark = pytest.mark.slow

SAMPLE = REPO / "loraflow" / "data" / "sample" / "alpaca_gpt4_sample.json"


def _flow_runs(server, flow_name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with server.client_settings(), get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))


def test_sft_hands_training_to_a_worker_of_the_xpu_pool(tiny_model, tmp_path):
    config = tmp_path / "pool.yaml"
    config.write_text(yaml.safe_dump({
        "name": "pooled", "storage": str(tmp_path / "store"),
        "model": {"base": str(tiny_model)},
        "data": {"path": str(SAMPLE), "val_set_size": 8, "cutoff_len": 128},
        "train": {"learning_rate": 1e-2, "batch_size": 8, "micro_batch_size": 4, "max_steps": 2,
                  "save_steps": 2, "eval_steps": 2, "gradient_checkpointing": False, "pool": "xpu"},
        "merge": {"enabled": False},
    }))
    with real_server(tmp_path / "prefect") as server:
        prefect = str(BIN / "prefect")
        server.run(prefect, "work-pool", "create", "xpu", "--type", "process", "--base-job-template", "infra/work-pools/xpu.json")
        worker_log = server.start_worker(str(REPO / "infra/worker/start-worker"), "xpu",
                                         env={"LORAFLOW_VENV": str(BIN.parent), "LORAFLOW_WORKER_NAME": "e2e-worker"})
        server.run(prefect, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
        with server.client_settings():
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                pool = client.read_work_pool("xpu")
        assert pool.type == "process"
        template = json.loads((REPO / "infra/work-pools/xpu.json").read_text())
        assert pool.base_job_template["variables"]["properties"].keys() == template["variables"]["properties"].keys()

        first = server.run(str(BIN / "loraflow"), "run", str(config), timeout=600)
        trainings = _flow_runs(server, "loraflow-train")
        assert len(trainings) == 1, first.stdout[-3000:]
        training = trainings[0]
        assert training.state.is_completed() and training.work_pool_name == "xpu" and training.deployment_id is not None
        assert training.infrastructure_pid  # a worker started it as a process
        worker_output = worker_log.read_text()
        assert "e2e-worker" in worker_output and str(training.id) in worker_output
        assert "trained adapter committed" in worker_output  # the trainer's log went through the worker
        adapter = tmp_path / "store" / "runs"
        assert len(list(adapter.glob("pooled-*/adapter/adapter_model.safetensors"))) == 1

        # The same fine-tune again: its idempotency key finds the finished job; no second training run.
        again = server.run(str(BIN / "loraflow"), "run", str(config), timeout=600)
        assert len(_flow_runs(server, "loraflow-train")) == 1, again.stdout[-3000:]
        assert "train" in again.stdout
