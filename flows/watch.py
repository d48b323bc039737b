"""The dataset watcher: scan a storage prefix and emit one event per new or changed dataset file.

`loraflow.dataset.uploaded` (payload: uri, sha256, size, format, rows) starts the SFT deployment
through its trigger; `loraflow.dataset.invalid` (payload: uri, sha256, error) starts nothing and says
what is wrong with the file. Deploy it on an interval schedule, or run `loraflow watch` in a terminal.
"""

from __future__ import annotations

from collections.abc import Callable

import asyncio

from prefect import flow, get_run_logger
from prefect.events import Event

from loraflow.watch import DatasetWatcher, Found


async def _send(events: list) -> None:
    from prefect.events.clients import get_events_client

    async with get_events_client() as client:
        for event in events:
            await client.emit(event)


def emit_upload_events(prefix: str, storage: str, log: Callable[[str], None]) -> list[Found]:
    watcher = DatasetWatcher(prefix, storage)
    if watcher.created:
        log(f"{prefix}: created the watched folder (it did not exist); put dataset files there")
    found = watcher.scan()
    events = []
    for item in found:
        if item.event:
            events.append(Event(event=item.event, resource=item.resource(), related=item.related(), payload=item.payload()))
        if item.change == "invalid":
            log(f"invalid dataset {item.uri} (sha256 {item.sha256[:12]}): {item.error}")
        elif item.change == "duplicate":
            log(f"{item.uri}: same bytes as {item.duplicate_of}, already fine-tuned on; nothing started")
        else:
            log(f"{item.change} dataset {item.uri}: {item.rows} {item.format} rows, sha256 {item.sha256[:12]} → {item.event}"
                + (f" ({item.note})" if item.note else ""))
    # Sent straight to the server (not through Prefect's background queue), so the scan's events have
    # reached it before its files are remembered: a crash in between re-reports them, never drops them.
    if events:
        asyncio.run(_send(events))
    watcher.remember(found)
    if not found:
        log(f"{prefix}: no new or changed dataset files")
    return found


@flow(name="loraflow-watch", description="Scan a folder or bucket prefix for new dataset files and emit loraflow.dataset.uploaded events.")
def watch_datasets(prefix: str, storage: str = "./loraflow-store") -> list[dict]:
    """One scan.

    Args:
        prefix: The watched location: a local folder or an fsspec URL (s3://bucket/incoming).
        storage: The artifact store where the watcher remembers what it has seen.
    """
    found = emit_upload_events(prefix, storage, get_run_logger().info)
    return [item.payload() for item in found]
