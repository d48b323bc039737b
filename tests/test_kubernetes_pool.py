"""The Kubernetes work pool for Intel GPU nodes (infra/work-pools/xpu-kubernetes.json), without a cluster: the template
is valid as the Prefect server checks a pool's template when the pool is created, and prefect-kubernetes renders the
Job manifest a worker would submit for a flow run from it."""

import asyncio
import json
import subprocess
import sys
import uuid

import pytest

from conftest import REPO

pytest.importorskip("prefect_kubernetes", reason="prefect-kubernetes is not installed (pip install 'loraflow[kubernetes]')")

TEMPLATE = REPO / "infra" / "work-pools" / "xpu-kubernetes.json"


def test_the_template_is_generated_from_prefect_kubernetes_and_the_process_pool():
    """One source for the oneAPI/oneCCL variables: the committed file is what the generator writes from xpu.json."""
    check = subprocess.run([sys.executable, str(REPO / "infra/work-pools/make-kubernetes-template"), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    variables = json.loads(TEMPLATE.read_text())["variables"]["properties"]
    process_pool = json.loads((REPO / "infra/work-pools/xpu.json").read_text())["variables"]["properties"]
    for name in ("ze_affinity_mask", "ccl_atl_transport", "ccl_ze_ipc_exchange", "fi_provider", "omp_num_threads"):
        assert variables[name] == process_pool[name]


def test_the_server_accepts_it_as_a_kubernetes_pool_and_the_worker_renders_an_intel_gpu_job(prefect_server):
    from prefect.client.schemas.objects import FlowRun
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads(TEMPLATE.read_text())
    WorkPoolCreate(name="xpu-k8s", type="kubernetes", base_job_template=template)  # the server's check at creation
    # (rendering resolves any block or variable references in the template through the server: the test's own)

    values = {"image": "registry.example/loraflow:xpu", "namespace": "training", "gpu_resources": {"gpu.intel.com/xe": 2},
              "ze_affinity_mask": "0,1", "omp_num_threads": "16", "env": {"HF_HUB_OFFLINE": "1"},
              "node_selector": {"intel.feature.node.kubernetes.io/gpu": "true"}}
    configuration = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, values))
    flow_run = FlowRun(id=uuid.uuid4(), name="brave-otter", flow_id=uuid.uuid4())
    configuration.prepare_for_flow_run(flow_run)
    manifest = configuration.job_manifest
    pod = manifest["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert manifest["metadata"]["namespace"] == "training" and container["image"] == "registry.example/loraflow:xpu"
    assert container["resources"]["limits"] == {"gpu.intel.com/xe": 2}
    assert container["envFrom"] == [{"secretRef": {"name": "loraflow-store", "optional": False}}]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["ZE_AFFINITY_MASK"] == "0,1" and env["OMP_NUM_THREADS"] == "16" and env["HF_HUB_OFFLINE"] == "1"
    assert env["CCL_ATL_TRANSPORT"] == "ofi" and env["FI_PROVIDER"] == "tcp" and env["LORAFLOW_SCRATCH"] == "/scratch"
    assert env["PREFECT__FLOW_RUN_ID"] == str(flow_run.id)
    assert "ONEAPI_DEVICE_SELECTOR" not in env  # unset variables are not exported
    assert {volume["name"]: volume["emptyDir"] for volume in pod["volumes"]} == {
        "dshm": {"medium": "Memory", "sizeLimit": "8Gi"}, "scratch": {}}
    assert pod["nodeSelector"] == {"intel.feature.node.kubernetes.io/gpu": "true"}


def test_the_default_asks_for_one_i915_gpu(prefect_server):
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    configuration = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
        json.loads(TEMPLATE.read_text()), {"image": "loraflow:xpu"}))
    [container] = configuration.job_manifest["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"] == {"gpu.intel.com/i915": 1}
