"""What every stage task shares: where Prefect persists results, and how cache keys are named."""

from __future__ import annotations

from pathlib import Path

from prefect.logging import get_run_logger

from loraflow.storage import ArtifactStore


def result_storage(storage: str):
    """Prefect's persisted results live in the artifact store, so a retry from anywhere that sees the store hits the cache.

    Prefect reads a bare string as a block slug, so a local store becomes a Path and a remote one an
    fsspec-backed RemoteFileSystem.
    """
    store = ArtifactStore(storage)
    if store.is_local:
        return Path(store.path(store.uri("prefect-results")))
    from prefect.filesystems import RemoteFileSystem

    return RemoteFileSystem(basepath=store.uri("prefect-results"))


def stage_options(storage: str) -> dict:
    return {"result_storage": result_storage(storage), "persist_result": True, "result_serializer": "json"}


def log_info(message: str) -> None:
    get_run_logger().info(message)
