"""Reading back what happened in a flow run (task states), for the CLI and the tests."""

from __future__ import annotations

from uuid import UUID

# The stage records a flow returns, and the task that produced each.
STAGE_TASKS = {
    "dataset": "prepare-dataset",
    "quantized": "quantize-base",
    "lora": "inject-lora",
    "train": "train",
    "adapter": "export-adapter",
    "merged": "merge-adapter",
}


def task_states(flow_run_id: UUID) -> dict[str, str]:
    """Final state name (Completed, Cached, Failed, …) of every task in the flow run and its subflows, by task name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        )
        ids = [flow_run_id, *(run.id for run in children)]
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    # Task run names are "<task name>-<3 hex>"; a retried flow has several runs of a task: keep the last.
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in sorted(runs, key=lambda r: r.expected_start_time)}


def stage_outcomes(records: dict, states: dict[str, str]) -> dict[str, str]:
    """Per stage: 'cached' (Prefect cache), 'reused' (committed output found in the store) or 'built'."""
    outcomes = {}
    for stage, record in records.items():
        if states.get(STAGE_TASKS.get(stage, "")) == "Cached":
            outcomes[stage] = "cached"
        else:
            outcomes[stage] = "reused" if record.reused else "built"
    return outcomes
