"""Finding new dataset files under a storage prefix (local folder or any fsspec URL), by content.

A file is identified by the sha256 of its bytes; size + ETag/mtime only spare re-reading files that
have not been touched. What the watcher has seen lives in the artifact store
(`<store>/watch/<prefix hash>.json`), not in memory, so a restarted or rescheduled watcher (or one on
another host) picks up where the last one stopped. Each new file is validated before it is reported
as an upload: a half-written or malformed file is reported as invalid, once per content, and becomes
an upload when its finished bytes arrive.

Same bytes under a new name are not a new upload: the fine-tune they would start is the one that
already ran (every stage's key is content-derived), so the watcher reports them as a duplicate of the
first name and starts nothing.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from fsspec.implementations.local import LocalFileSystem

from loraflow.data.formats import SUFFIXES, read_rows
from loraflow.data.shapes import detect_shape, shape_named
from loraflow.errors import LoraflowError
from loraflow.storage import ArtifactStore, filesystem, hash_uri, sha256_hex

UPLOADED = "loraflow.dataset.uploaded"
INVALID = "loraflow.dataset.invalid"
RESOURCE_PREFIX = "loraflow.dataset."  # an event's resource id is this + the file's URI


@dataclass
class Found:
    uri: str
    sha256: str
    size: int
    fingerprint: str
    change: str  # new | changed | duplicate | invalid
    format: str | None = None
    rows: int | None = None
    error: str | None = None
    note: str | None = None  # how the rows were found, when not plain (a JSON object holding them under a key)
    duplicate_of: str | None = None

    @property
    def event(self) -> str | None:
        return {"new": UPLOADED, "changed": UPLOADED, "invalid": INVALID}.get(self.change)

    def payload(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and k != "fingerprint"}

    def resource(self) -> dict[str, str]:
        """The event's resource: its labels are what the Prefect UI shows in an event's Details (the payload only in Raw)."""
        labels = {
            "prefect.resource.id": RESOURCE_PREFIX + self.uri,
            "prefect.resource.name": self.uri.rsplit("/", 1)[-1],
            "loraflow.uri": self.uri,
            "loraflow.sha256": self.sha256,
            "loraflow.size": str(self.size),
        }
        if self.error:
            labels["loraflow.error"] = self.error.removeprefix(f"{self.uri}: ")
            if line := re.search(r"\b(?:line|row) (\d+)", self.error):
                labels["loraflow.line" if "line" in line.group(0) else "loraflow.row"] = line.group(1)
        else:
            # The objective lets each deployment's trigger take only its own files (SFT rows or preference pairs).
            labels.update({"loraflow.format": str(self.format), "loraflow.rows": str(self.rows),
                           "loraflow.objective": shape_named(self.format).objective})
        return labels

    def related(self) -> list[dict[str, str]]:
        """Related resources. The Prefect UI's event Details list only resource ids (labels and payload are in
        Raw), so an invalid file's reason is written into a related resource's id, whole."""
        if not self.error:
            return []
        reason = self.error.removeprefix(f"{self.uri}: ")
        return [{"prefect.resource.id": f"problem: {reason}", "prefect.resource.role": "problem", "prefect.resource.name": reason}]


def validate_dataset(uri: str) -> tuple[str, int, str | None]:
    """(shape, usable rows, a note on how the rows were found or None) of a dataset file, or a LoraflowError saying
    what is wrong and where."""
    rows = read_rows(uri)
    shape = detect_shape(uri, rows)
    return shape.name, shape.usable_rows(uri, rows), rows.note


class DatasetWatcher:
    def __init__(self, prefix: str, storage: str):
        self.prefix = prefix.rstrip("/")
        self.fs, self.root = filesystem(self.prefix)
        self.store = ArtifactStore(storage)
        self.memory_uri = self.store.uri("watch", f"{sha256_hex(self.prefix)[:16]}.json")
        # A local folder to watch is created (uploads then have a place to land); an object-store
        # prefix has no folders: until something is uploaded under it, it is simply empty.
        self.created = isinstance(self.fs, LocalFileSystem) and not self.fs.exists(self.root)
        if self.created:
            self.fs.makedirs(self.root, exist_ok=True)

    def _memory(self) -> dict:
        try:
            return self.store.read_json(self.memory_uri)
        except FileNotFoundError:
            return {"prefix": self.prefix, "files": {}}

    def _uri(self, path: str) -> str:
        # Report files the way the prefix was written: plain paths for a plain local prefix.
        return path if "://" not in self.prefix else self.fs.unstrip_protocol(path)

    def scan(self) -> list[Found]:
        """Dataset files that are new or changed since the last remember(), validated; nothing is written."""
        self.fs.invalidate_cache()
        memory = self._memory()["files"]
        known_content = {entry["sha256"]: uri for uri, entry in memory.items() if entry["change"] in ("new", "changed")}
        found = []
        try:
            listing = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            listing = {}
        for path, info in sorted(listing.items()):
            if info.get("type") == "directory" or not path.lower().endswith(SUFFIXES) or "/." in path:
                continue
            uri = self._uri(path)
            size = int(info.get("size") or 0)
            fingerprint = str(info.get("ETag") or info.get("etag") or f"{size}-{info.get('mtime') or info.get('LastModified')}")
            previous = memory.get(uri)
            if previous and previous["fingerprint"] == fingerprint:
                continue
            digest = hash_uri(uri)
            if previous and previous["sha256"] == digest:
                memory[uri] = {**previous, "fingerprint": fingerprint}  # touched, not changed
                continue
            item = Found(uri, digest, size, fingerprint, "changed" if previous and previous["change"] != "invalid" else "new")
            if digest in known_content and known_content[digest] != uri:
                item.change, item.duplicate_of = "duplicate", known_content[digest]
            else:
                try:
                    item.format, item.rows, item.note = validate_dataset(uri)
                    known_content[digest] = uri
                except LoraflowError as error:
                    item.change, item.error = "invalid", str(error)
            found.append(item)
        return found

    def remember(self, found: list[Found]) -> None:
        """Record a scan's files as seen (after their events went out: a crash in between re-reports them, never drops them)."""
        memory = self._memory()
        for item in found:
            memory["files"][item.uri] = {"sha256": item.sha256, "fingerprint": item.fingerprint, "change": item.change}
        self.store.write_json(self.memory_uri, memory)
