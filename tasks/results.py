"""Prefect's persisted results in the shared store, read back only as plain JSON StageRecords.

Prefect decodes a result file with whatever serializer the file itself names: a file naming `pickle`
is unpickled, and even its JSON serializer imports the modules a file names (`jsonlib`,
`object_decoder`, `__class__`). Anyone who can write to the store could run code on every machine
that runs a fine-tune against it. So the result storage block checks a file before Prefect sees it:
exactly Prefect's standard JSON serializer, and no class but StageRecord inside. Anything else is
refused with a warning; Prefect's cache lookup then treats it as a miss, the stage is recomputed,
and its fresh result replaces the file. No library offers this check (Prefect trusts its storage).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from prefect.filesystems import LocalFileSystem, RemoteFileSystem

from loraflow.gc import cached_output
from loraflow.storage import ArtifactStore

SAFE_SERIALIZER = {
    "type": "json", "jsonlib": "json", "dumps_kwargs": {}, "loads_kwargs": {},
    "object_encoder": "prefect.serializers.prefect_json_object_encoder",
    "object_decoder": "prefect.serializers.prefect_json_object_decoder",
}
ALLOWED_CLASSES = {"loraflow.storage.StageRecord"}

logger = logging.getLogger("loraflow.results")


class RefusedResult(ValueError):
    """A result file in the store that is not a plain JSON StageRecord: never decoded, recomputed instead."""


def _classes(value: Any) -> set[str]:
    """Every type name the JSON decoder would import (`__class__`, `__exc_type__`) anywhere in value."""
    found: set[str] = set()
    if isinstance(value, dict):
        found |= {str(value[k]) for k in ("__class__", "__exc_type__") if k in value}
        for item in value.values():
            found |= _classes(item)
    elif isinstance(value, list):
        for item in value:
            found |= _classes(item)
    return found


def check_result_file(path: str, content: bytes, store_url: str | None = None) -> bytes:
    """content, if it is a result record Prefect may decode safely and that points into store_url (the store these
    results belong to); else RefusedResult (and a warning)."""
    try:
        record = json.loads(content)
        serializer = record["metadata"]["serializer"]
        if serializer != SAFE_SERIALIZER:
            shown = serializer.get("type") if isinstance(serializer, dict) else serializer
            problem = f"names serializer {shown!r} with settings other than Prefect's plain JSON"
        elif classes := _classes(json.loads(record["result"])) - ALLOWED_CLASSES:
            problem = f"names types other than StageRecord ({', '.join(sorted(classes))})"
        elif (output := cached_output(content)) and store_url and not output.startswith(store_url.rstrip("/") + "/"):
            # A store copied or moved elsewhere keeps records naming the old location: using one would send this run's
            # stages (and their outputs) to another store. So is a record planted by a writer of this store.
            problem = f"points to {output}, outside this store ({store_url}; a copied or moved store?)"
        elif output and not (store := ArtifactStore(output)).is_committed(output):
            # Removed by `loraflow gc` or by hand (as a "delete it to rebuild it" message says): a miss, not a record
            # that would send the next stage to a folder that is gone.
            logger.warning(f"cached result {path} points to {output}, which is no longer committed; rebuilding it")
            raise RefusedResult(f"{output} is gone")
        else:
            if output:
                store.mark_used(output)  # a cache hit uses the output: `loraflow gc --older-than` sees it as recent
            return content
    except (ValueError, KeyError, TypeError) as error:
        problem = f"is not a JSON result record ({type(error).__name__})"
    message = f"refused Prefect result {path}: it {problem}; a result is only read as plain JSON, so this stage is recomputed"
    logger.warning(message)
    raise RefusedResult(message)


class _JsonOnlyReads:
    # Prefect's file-system blocks show a logo from raw.githubusercontent.com: the UI's Blocks pages would fetch it from
    # outside the machine (a broken image offline). No logo: the UI draws its own placeholder.
    _logo_url = None

    @property
    def _store_url(self) -> str:
        return str(self.basepath).rstrip("/").removesuffix("/prefect-results")

    async def aread_path(self, path: str) -> bytes:
        return check_result_file(path, await super().aread_path(path), self._store_url)

    # Prefect calls read_path(path, _sync=True) from sync code and aread_path from async code.
    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        return check_result_file(path, super().read_path(path, _sync=True), self._store_url)


class JsonOnlyLocalResults(_JsonOnlyReads, LocalFileSystem):
    """Result storage in a local store that reads back only plain JSON StageRecords (see the module docstring)."""

    _block_type_name = "loraflow JSON-only local results"
    _block_type_slug = "loraflow-json-only-local-results"


class JsonOnlyRemoteResults(_JsonOnlyReads, RemoteFileSystem):
    """Result storage in a remote (fsspec) store that reads back only plain JSON StageRecords (see the module docstring)."""

    _block_type_name = "loraflow JSON-only remote results"
    _block_type_slug = "loraflow-json-only-remote-results"
