"""Reading back what happened in a flow run (task states), for the CLI and the tests."""

from __future__ import annotations

from uuid import UUID

from loraflow.objectives import OBJECTIVES
from loraflow.registry import BY_NAME



def task_states(flow_run_id: UUID) -> dict[str, str]:
    """Final state name (Completed, Cached, Failed, …) of every task in the flow run and its subflows, by task name."""
    return {name: run["state"] for name, run in task_runs(flow_run_id).items()}


def task_runs(flow_run_id: UUID) -> dict[str, dict]:
    """{task name: {state, seconds}} for the flow run and its subflows (the last run of a retried task)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        )
        ids = [flow_run_id, *(run.id for run in children)]
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    # Task run names are "<task name>-<3 hex>"; a retried flow has several runs of a task: keep the last.
    return {
        run.name.rsplit("-", 1)[0]: {"state": run.state.name if run.state else "Pending", "seconds": run.total_run_time.total_seconds()}
        for run in sorted(runs, key=lambda r: r.expected_start_time)
    }


def stage_outcomes(records: dict, states: dict[str, str]) -> dict[str, str]:
    """Per stage that writes an output: 'cached' (Prefect cache), 'reused' (committed output found in the store) or
    'built'. A record's key in a flow's result is its stage's name, which is also its task's (loraflow.registry)."""
    outcomes = {}
    for stage, record in records.items():
        if stage not in BY_NAME or not BY_NAME[stage].folder:
            continue
        if states.get(BY_NAME[stage].task) == "Cached":
            outcomes[stage] = "cached"
        else:
            outcomes[stage] = "reused" if record.reused else "built"
    return outcomes


# The flows whose runs are fine-tunes, one per objective (each publishes a summary artifact); align's halves are these too.
FINETUNE_FLOWS = tuple(objective.flow for objective in OBJECTIVES.values())


def _reason(state) -> str:
    """The first line of a state's message (a run's failure reason), or '' while it has none."""
    if state is None or not state.is_final() or not state.message:
        return ""
    reason = state.message.strip().splitlines()[0]
    # Prefect's wording around the reason says nothing a user acts on; a LoraflowError is the user-facing message.
    return reason.removeprefix("Flow run encountered an exception: ").removeprefix("LoraflowError: ")


def recent_runs(limit: int = 20) -> list[dict]:
    """The newest fine-tune flow runs (SFT and DPO): name, state, start, and from their summary artifact the run and its losses."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType, FlowFilter, FlowFilterName,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        flow_runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=list(FINETUNE_FLOWS))),
                                          sort=FlowRunSort.START_TIME_DESC, limit=limit)
        summaries = {}
        if flow_runs:
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run.id for run in flow_runs]),
                type=ArtifactFilterType(any_=["markdown"])))
            summaries = {a.flow_run_id: a for a in sorted(artifacts, key=lambda a: a.created) if a.key and a.key.endswith("-summary")}
    rows = []
    for run in flow_runs:
        summary = summaries.get(run.id)
        rows.append({
            "flow_run": run.name, "flow_run_id": str(run.id), "state": run.state_name,
            "started": run.start_time.strftime("%Y-%m-%d %H:%M") if run.start_time else "",
            "run": summary.key.removesuffix("-summary") if summary else "",
            # A run that ended without a summary (Failed, Crashed, Cancelled) shows why: its final state's message.
            "result": summary.description if summary else _reason(run.state),
            "summary_markdown": summary.data if summary else None,
        })
    return rows
