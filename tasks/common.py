"""What every stage task shares: where Prefect persists results, and how cache keys are named."""

from __future__ import annotations

import logging
from prefect.logging import get_run_logger

from loraflow.errors import LoraflowError
from loraflow.storage import ArtifactStore, sha256_hex


def result_storage(storage: str):
    """Prefect's persisted results live in the artifact store, so a retry from anywhere that sees the store hits the cache.

    A saved JsonOnly*Results block (Prefect resolves a persisted state's result through the
    block's id, so it must be saved) named from the store's URL, carrying no settings: credentials
    stay in the environment, never in Prefect's database. It reads back only plain JSON results.
    """
    from tasks.results import JsonOnlyLocalResults, JsonOnlyRemoteResults

    store = ArtifactStore(storage)
    block = (JsonOnlyLocalResults if store.is_local else JsonOnlyRemoteResults)(basepath=store.uri("prefect-results"))
    block.save(f"loraflow-results-{sha256_hex(store.url)[:16]}", overwrite=True)
    return block


def stage_options(storage: str) -> dict:
    return {"result_storage": result_storage(storage), "persist_result": True, "result_serializer": "json"}


def retry_unless_user_error(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: a LoraflowError (bad input, an impossible configuration) fails the same
    way every time, so only other failures (a crash, a killed process, a lost node) are retried."""
    return not isinstance(state.data, LoraflowError)


def event_url(event_id: str, occurred) -> str | None:
    """The Prefect UI's page of an event (None when no UI URL is configured)."""
    from prefect.settings import PREFECT_UI_URL

    ui = PREFECT_UI_URL.value()
    return f"{ui}/events/event/{occurred:%Y-%m-%d}/{event_id}" if ui else None


def log_info(message: str) -> None:
    get_run_logger().info(message)


class _UserErrorWithoutTraceback(logging.Filter):
    """A LoraflowError already says what is wrong and what to do; its traceback only buries that."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], LoraflowError):
            record.exc_info = None
            record.exc_text = None
        return True


def hide_user_error_tracebacks() -> None:
    """Install the filter on Prefect's console and API handlers (idempotent)."""
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _UserErrorWithoutTraceback) for f in handler.filters):
                handler.addFilter(_UserErrorWithoutTraceback())
