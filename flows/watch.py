"""The dataset watcher: scan a storage prefix and emit one event per new or changed dataset file.

`loraflow.dataset.uploaded` (payload: uri, sha256, size, format, rows) starts the SFT deployment
through its trigger; `loraflow.dataset.invalid` (payload: uri, sha256, error) starts nothing and says
what is wrong with the file. Deploy it on an interval schedule, or run `loraflow watch` in a terminal.
"""

from __future__ import annotations

from collections.abc import Callable

from prefect import flow, get_run_logger
from prefect.events import emit_event
from prefect.events.worker import EventsWorker

from loraflow.watch import RESOURCE_PREFIX, DatasetWatcher, Found


def emit_upload_events(prefix: str, storage: str, log: Callable[[str], None]) -> list[Found]:
    watcher = DatasetWatcher(prefix, storage)
    found = watcher.scan()
    for item in found:
        if item.event:
            emit_event(
                event=item.event,
                resource={
                    "prefect.resource.id": RESOURCE_PREFIX + item.uri,
                    "prefect.resource.name": item.uri.rsplit("/", 1)[-1],
                    "loraflow.uri": item.uri,
                    "loraflow.sha256": item.sha256,
                },
                payload=item.payload(),
            )
        if item.change == "invalid":
            log(f"invalid dataset {item.uri} (sha256 {item.sha256[:12]}): {item.error}")
        elif item.change == "duplicate":
            log(f"{item.uri}: same bytes as {item.duplicate_of}, already fine-tuned on; nothing started")
        else:
            log(f"{item.change} dataset {item.uri}: {item.rows} {item.format} rows, sha256 {item.sha256[:12]} → {item.event}")
    # Events leave through a background queue: only files whose events reached the server are
    # remembered, so a crash here re-reports them on the next scan instead of dropping them.
    EventsWorker.drain_all(at_exit=False)
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
