"""What the fine-tune flows share beyond their stages: how a run is named, and how it tells the
upload that started it."""

from __future__ import annotations

import re
import secrets
from pathlib import PurePosixPath

from loraflow.config import FinetuneConfig
from loraflow.watch import RESOURCE_PREFIX
from tasks.common import event_url

FINETUNE_STARTED = "loraflow.finetune.started"


def _field(value, name: str):
    return value.get(name) if isinstance(value, dict) else getattr(value, name, None)


def finetune_run_name() -> str:
    """`<config name>-<dataset file stem>-<4 hex>`: a run started by an upload is named after its file."""
    from prefect.runtime import flow_run

    parameters = flow_run.parameters
    config = parameters.get("config")
    dataset = parameters.get("dataset") or _field(_field(config, "data"), "path") or "data"
    stem = PurePosixPath(str(dataset).rstrip("/")).name.split(".")[0]
    slug = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")[:40] or "data"
    return f"{_field(config, 'name') or 'loraflow'}-{slug}-{secrets.token_hex(2)}"


def announce_upload(config: FinetuneConfig, upload_event: str) -> None:
    """Point the run and the upload at each other: the run's log names the event, and an event on the
    dataset's resource names this run (so the dataset's event feed leads to the fine-tune it started)."""
    from datetime import datetime, timezone

    from prefect import get_run_logger
    from prefect.events import emit_event
    from prefect.runtime import flow_run

    resource = RESOURCE_PREFIX + config.data.path
    url = event_url(upload_event, datetime.now(timezone.utc))
    get_run_logger().info(f"started by upload event {upload_event} for {config.data.path}" + (f" ({url})" if url else ""))
    emit_event(
        event=FINETUNE_STARTED,
        resource={"prefect.resource.id": resource, "prefect.resource.name": config.data.path.rsplit("/", 1)[-1]},
        related=[
            {"prefect.resource.id": f"prefect.flow-run.{flow_run.id}", "prefect.resource.role": "flow-run",
             "prefect.resource.name": flow_run.name},
            {"prefect.resource.id": f"prefect.event.{upload_event}", "prefect.resource.role": "triggering-event"},
        ],
        payload={"flow_run_id": str(flow_run.id), "flow_run_name": flow_run.name, "upload_event": upload_event},
    )
