"""What every stage task shares: where Prefect persists results, and how cache keys are named."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from prefect.logging import get_run_logger

from loraflow.errors import LoraflowError
from loraflow.storage import ArtifactStore, sha256_hex
from tasks.results import JsonOnlyLocalResults, JsonOnlyRemoteResults


def result_storage(storage: str):
    """Prefect's persisted results live in the artifact store, so a retry from anywhere that sees the store hits the cache.

    A saved JsonOnly*Results block (Prefect resolves a persisted state's result through the
    block's id, so it must be saved) named from the store's URL, carrying no settings: credentials
    stay in the environment, never in Prefect's database. It reads back only plain JSON results.
    """
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


# Set by the CLI, which prints a run's user error itself, once, at the end.
CALLER_PRINTS_USER_ERRORS = False


class _UserErrorOnceOnConsole(logging.Filter):
    """Prefect logs a failing stage's error four times (the task failed, finished Failed, the flow caught it,
    finished Failed). On the console a user error is shown once: the first time (a worker's log), or never
    when the CLI prints it at the end. The run's log in the UI keeps every record."""

    def __init__(self):
        super().__init__()
        self.shown: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LoraflowError" not in message and not (record.exc_info and isinstance(record.exc_info[1], LoraflowError)):
            return True
        if CALLER_PRINTS_USER_ERRORS:
            return False
        error = message.split("LoraflowError", 1)[-1]
        if any(error.startswith(seen) or seen.startswith(error) or seen in error for seen in self.shown):
            return False
        self.shown.add(error.strip(" :('\")"))
        return True


def hide_user_error_tracebacks() -> None:
    """Install the filters on Prefect's console and API handlers (idempotent)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):  # Prefect's console handler is the root logger's
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _UserErrorWithoutTraceback) for f in handler.filters):
                handler.addFilter(_UserErrorWithoutTraceback())
            if isinstance(handler, PrefectConsoleHandler) and not any(isinstance(f, _UserErrorOnceOnConsole) for f in handler.filters):
                handler.addFilter(_UserErrorOnceOnConsole())


class _ResendLostTerminationSignal:
    """sys.unraisablehook: a stop signal (SIGTERM, or Ctrl-C's SIGINT) whose exception was swallowed is sent again.

    Prefect turns SIGTERM into an exception (TerminationSignal), and Python SIGINT into KeyboardInterrupt, raised
    wherever the main thread is when the handler runs. Where that is a weakref callback or a __del__ (an import's
    module-lock cleanup, a finaliser the garbage collector runs), CPython only prints the exception ("Exception ignored
    in …") and the run goes on: a worker that stops would wait for a flow run that never ends, its trainer still
    training; a fine-tune stopped with Ctrl-C while it waits for its pool job would keep waiting, its job training on.
    Sending the signal again lets the handler run at the next ordinary line, where the exception ends the run (only a
    swallowed one: a second signal while the engine reports the crash would interrupt that report). Anything else goes
    to the hook this one replaced.
    """

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable) -> None:
        from prefect.exceptions import TerminationSignal

        if isinstance(unraisable.exc_value, TerminationSignal):
            lost = unraisable.exc_value.signal
        elif isinstance(unraisable.exc_value, KeyboardInterrupt):
            lost = signal.SIGINT
        else:
            self.previous(unraisable)
            return
        # From another thread, a moment later: sent from here, the handler would run inside this hook, where its
        # exception is swallowed as well.
        resend = threading.Timer(0.05, os.kill, (os.getpid(), lost))
        resend.daemon = True
        resend.start()


def prepare_flow_process() -> None:
    """What a process that runs loraflow's flows needs (idempotent): user errors shown without tracebacks, and a stop
    signal that is never lost."""
    hide_user_error_tracebacks()
    if not isinstance(sys.unraisablehook, _ResendLostTerminationSignal):
        sys.unraisablehook = _ResendLostTerminationSignal(sys.unraisablehook)
