"""The fsspec artifact store: content-addressed stage outputs, committed atomically with a manifest.

Layout (any fsspec URL: a local path, file://, s3://, memory://):

    <store>/dataset/<key>/       train + val parquet, stats.json, tokenizer/
    <store>/base/<key>/          pre-quantized base
    <store>/lora/<key>/          initial adapter + trainable-parameter report
    <store>/reference/<key>/     DPO: reference log-probs of every pair
    <store>/runs/<run>/          spec.json, checkpoints/, adapter/, merged/, metrics.jsonl
    <store>/prefect-results/     Prefect's persisted task results (JSON)

    <store>/leases/<name>/       who is building what right now (loraflow.lease)

A folder is only ever read when its `_manifest.json` exists. Files are written first and the manifest
last, so a crash mid-write leaves a folder without a manifest: never trusted, and removed by `loraflow gc`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, Field

from loraflow.errors import LoraflowError

MANIFEST = "_manifest.json"
LAST_USED = "_last_used"  # written on each reuse of a committed folder (loraflow gc reads its time)
_CHUNK = 4 * 1024 * 1024

# Bounded waits on S3: botocore's defaults (60 s to connect, 60 s per read, retried) under s3fs's own five
# retries kept a user with an unreachable endpoint waiting minutes, for an error that said "file not found".
S3_CONNECT_TIMEOUT_S = 5
S3_READ_TIMEOUT_S = 10  # waiting for an answer; S3 answers in milliseconds, a large PUT's answer comes after its body
S3_ATTEMPTS = 2  # botocore's, per request; s3fs's loops around it (5 each, nested for reads) are set to one pass
S3_GIVES_UP_WITHIN_S = 30  # what a user is told: one read's worst case above (2 × 10 s and backoff), with margin
AWS_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_DEFAULT_REGION")


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else ""


def filesystem(url: str):
    """(fsspec filesystem, path) for a URL, with bounded timeouts on object stores."""
    if _protocol(url) in ("s3", "s3a"):
        fs, path = fsspec.core.url_to_fs(url, config_kwargs={
            "connect_timeout": S3_CONNECT_TIMEOUT_S, "read_timeout": S3_READ_TIMEOUT_S,
            "retries": {"total_max_attempts": S3_ATTEMPTS, "mode": "standard"}})
        fs.retries = 1  # this instance is only ours (fsspec caches filesystems by their options)
        return fs, path
    return fsspec.core.url_to_fs(url)


def open_url(url: str, mode: str = "rb", **options):
    """fsspec.open with the same bounded timeouts as filesystem()."""
    fs, path = filesystem(url)
    return fsspec.core.OpenFile(fs, path, mode=mode, **options)


def remote_failure(error: BaseException, url: str, setting: str):
    """A LoraflowError that says what went wrong reading or writing `url` (named by config `setting`) and what to
    check, for the failures of a remote store; None for errors that are not about reaching it."""
    if _protocol(url) in ("", "file", "local"):
        return None
    name = type(error).__name__
    names = {klass.__name__ for klass in type(error).__mro__}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS's default endpoint"
    present = ", ".join(f"{var} is set" if var != "AWS_ENDPOINT_URL" else f"AWS_ENDPOINT_URL={os.environ[var]}"
                        for var in AWS_SETTINGS if os.environ.get(var)) or "none of AWS_ENDPOINT_URL, AWS_PROFILE, AWS_ACCESS_KEY_ID is set"
    if names & {"ConnectTimeoutError", "ReadTimeoutError", "EndpointConnectionError", "ConnectionClosedError",
                "ClientConnectorError", "ServerDisconnectedError", "TimeoutError", "ConnectionError"}:
        problem = (f"network: the S3 endpoint {endpoint} could not be reached or did not answer (gave up within {S3_GIVES_UP_WITHIN_S} s: "
                   f"{S3_ATTEMPTS} attempts, {S3_CONNECT_TIMEOUT_S} s to connect, {S3_READ_TIMEOUT_S} s to answer; {name}); "
                   f"check the endpoint and that this machine can reach it")
    elif names & {"NoCredentialsError", "PartialCredentialsError"}:
        problem = "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) where this runs"
    elif isinstance(error, PermissionError) or names & {"ClientError"} and "AccessDenied" in str(error):
        problem = f"access denied by {endpoint} ({str(error)[:160]}); check the credentials and the bucket's permissions"
    elif isinstance(error, FileNotFoundError):
        problem = "no such object or bucket (the endpoint answered: this is not a network problem)"
    else:
        return None
    return LoraflowError(f"{setting} {url}: {problem} [AWS settings read: {present}]")


class StageRecord(BaseModel):
    """What a stage returns: where its output lives and what it measured. Small, JSON, no objects."""

    stage: str
    key: str = Field(description="Content hash of everything the output depends on.")
    uri: str = Field("", description="The committed output folder (empty when the stage writes none).")
    metrics: dict[str, Any] = Field(default_factory=dict)
    reused: bool = Field(False, description="True when the output was found committed in the store.")


def sha256_hex(*parts: Any) -> str:
    """A stable hash of JSON-serialisable parts (dicts are hashed with sorted keys)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def hash_stream(stream, limit: int | None = None) -> str:
    digest = hashlib.sha256()
    remaining = limit
    while True:
        size = _CHUNK if remaining is None else min(_CHUNK, remaining)
        if size == 0:
            break
        chunk = stream.read(size)
        if not chunk:
            break
        digest.update(chunk)
        if remaining is not None:
            remaining -= len(chunk)
    return digest.hexdigest()


def hash_uri(uri: str) -> str:
    """sha256 of a file's bytes, local or remote."""
    with open_url(uri, "rb") as stream:
        return hash_stream(stream)


def fingerprint_file(path: Path, full_hash_limit: int = 256 * 1024 * 1024) -> dict[str, Any]:
    """Identity of one weight file without reading all of a 10 GB shard.

    Files up to 256 MiB are hashed whole. Larger ones by size plus the first and last 16 MiB:
    safetensors keeps its tensor index in the header, and any real re-save changes the head or
    the tail, so this is a content fingerprint, not a path or mtime.
    """
    size = path.stat().st_size
    with path.open("rb") as stream:
        if size <= full_hash_limit:
            return {"name": path.name, "size": size, "sha256": hash_stream(stream)}
        head = hash_stream(stream, 16 * 1024 * 1024)
        stream.seek(size - 16 * 1024 * 1024)
        tail = hash_stream(stream)
    return {"name": path.name, "size": size, "head_sha256": head, "tail_sha256": tail}


# Where `loraflow store serve` answers (http://127.0.0.1:4201): local store links then point at it.
STORE_URL_SETTING = "LORAFLOW_STORE_URL"
FILE_LINK_NOTE = ("Browsers do not open file:// links from a web page such as the Prefect UI: copy the path, or serve "
                  f"the store with `loraflow store serve` and set {STORE_URL_SETTING} (docs/store-and-security.md: Opening the store's files).")


def browser_url(uri: str) -> str | None:
    """A URL a browser opens for a store URI. A local path: on the store server when LORAFLOW_STORE_URL is set (its URL
    path is the file's absolute path: loraflow/store_server.py), else file:// (which a web page cannot open:
    FILE_LINK_NOTE); for S3 the AWS console's folder view, or the object URL of the folder's manifest on an
    S3-compatible endpoint (AWS_ENDPOINT_URL).

    No presigned URLs: they carry the access key id and expire, and artifacts live on.
    """
    protocol, _, rest = uri.partition("://") if "://" in uri else ("", "", uri)
    if protocol in ("", "file", "local"):
        path = rest if protocol else os.path.abspath(uri)
        if server := os.environ.get(STORE_URL_SETTING, "").strip().rstrip("/"):
            return server + urllib.parse.quote(path) + ("/" if os.path.isdir(path) and not path.endswith("/") else "")
        return Path(path).as_uri()
    if protocol in ("s3", "s3a"):
        bucket, _, key = rest.partition("/")
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            return f"{endpoint.rstrip('/')}/{bucket}/{key}/{MANIFEST}"
        return f"https://s3.console.aws.amazon.com/s3/buckets/{bucket}?prefix={urllib.parse.quote(key)}/"
    return None


def _is_local(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


class ArtifactStore:
    """One artifact store rooted at an fsspec URL."""

    def __init__(self, url: str):
        # A relative local store becomes absolute: every URI in a record or artifact must still lead
        # to its file when read from another working folder (a worker's, the UI user's).
        self.url = url.rstrip("/") if "://" in url else os.path.abspath(url)
        self.fs, self.root = filesystem(self.url)
        self.root = self.root.rstrip("/")
        self.is_local = _is_local(self.fs)

    def uri(self, *parts: str) -> str:
        """The URL of a path inside the store, in the same form the store was given."""
        return "/".join([self.url, *parts])

    def path(self, uri: str) -> str:
        """A store URL to the filesystem's own path."""
        return self.fs._strip_protocol(uri)

    # ---- reading ---------------------------------------------------------------------------
    def manifest(self, uri: str) -> dict | None:
        """The manifest of a committed folder, or None if the folder is absent or uncommitted."""
        path = f"{self.path(uri)}/{MANIFEST}"
        try:
            with self.fs.open(path, "rb") as stream:
                return json.load(stream)
        except FileNotFoundError:
            return None

    def probe(self) -> None:
        """Write, read back and remove a small file at the store's root: a store that cannot be reached or written
        is reported now, naming `storage`, not as a failure deep inside a stage."""
        if self.is_local and not os.path.exists(self.root):
            # A local store that does not exist yet is not created by a check: the run may still stop at a later one
            # (a model folder that is not there). Its nearest existing folder must let it be created.
            parent = self.root
            while not os.path.exists(parent):
                parent = os.path.dirname(parent)
            if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
                raise LoraflowError(f"storage {self.url}: cannot create it ({parent} is not a folder this user can write in)")
            return
        path = f"{self.root}/.loraflow-probe-{os.getpid()}-{time.time_ns()}"
        try:
            # A read first: its timeouts hold, where a PUT to an endpoint that accepts and never answers waits
            # unbounded inside aiohttp (measured), so an unreachable endpoint is found by the read.
            try:
                self.fs.cat_file(path)  # one request (exists() makes several)
            except FileNotFoundError:
                pass
            self._put_bytes(path, b"ok")
            if self.fs.cat_file(path) != b"ok":
                raise LoraflowError(f"storage {self.url}: a file written there read back different")
            self.fs.rm_file(path)
        except LoraflowError:
            raise
        except Exception as error:  # whatever the filesystem raises: translated below when it is about reaching the store
            failure = remote_failure(error, self.url, "storage")
            if failure is None and isinstance(error, OSError):
                failure = LoraflowError(f"storage {self.url}: cannot write there ({error.strerror or error})")
            if failure is None:
                raise
            raise failure from None

    def mark_used(self, uri: str) -> None:
        """Note that a committed folder was just reused (a file beside the manifest, never part of the content), so
        `loraflow gc --older-than` counts its age from its last use, not from when it was built. Best effort: a
        read-only store still trains."""
        try:
            self._put_bytes(f"{self.path(uri)}/{LAST_USED}", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()).encode())
        except OSError:
            pass

    def is_committed(self, uri: str) -> bool:
        return self.manifest(uri) is not None

    def read_json(self, uri: str) -> Any:
        with self.fs.open(self.path(uri), "rb") as stream:
            return json.load(stream)

    def write_json(self, uri: str, value: Any) -> None:
        self.write_bytes(uri, json.dumps(value, indent=2, sort_keys=True, default=str).encode())

    def write_bytes(self, uri: str, data: bytes) -> None:
        """One file, all or nothing."""
        self._put_bytes(self.path(uri), data)

    def read_text(self, uri: str) -> str:
        with self.fs.open(self.path(uri), "r") as stream:
            return stream.read()

    def _put_bytes(self, path: str, data: bytes) -> None:
        if self.is_local:
            # Write-then-rename so a reader never sees half a file.
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
            with os.fdopen(fd, "wb") as stream:
                stream.write(data)
            os.replace(tmp, path)
        else:
            # An object store PUT is all-or-nothing already.
            with self.fs.open(path, "wb") as stream:
                stream.write(data)

    def local_copy(self, uri: str, cache_dir: str | Path | None = None, verify: bool = False) -> Path:
        """A local folder with the committed contents of `uri` (the folder itself for a local store).

        A download is always checked against the manifest (sizes and sha256). verify=True checks a local
        store's folder the same way: for data about to be trained on or merged.
        """
        manifest = self.manifest(uri)
        if manifest is None:
            raise FileNotFoundError(f"{uri}: no committed output (missing {MANIFEST})")
        if self.is_local:
            if verify:
                self.verify(uri, hashes=True)
            return Path(self.path(uri))
        cache_root = Path(cache_dir or os.environ.get("LORAFLOW_CACHE", Path.home() / ".cache" / "loraflow"))
        target = cache_root / hashlib.sha256(uri.encode()).hexdigest()[:16] / manifest["sha256"][:16]
        if (target / MANIFEST).exists():
            return target
        cache_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_root))
        for entry in manifest["files"]:
            destination = tmp / entry["path"]
            destination.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get(f"{self.path(uri)}/{entry['path']}", str(destination))
            with destination.open("rb") as stream:  # what was downloaded is what was committed
                if destination.stat().st_size != entry["size"] or hash_stream(stream) != entry["sha256"]:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise LoraflowError(f"{uri}/{entry['path']}: its bytes differ from the manifest's (truncated or altered "
                                        f"after commit); delete {uri} to rebuild it")
        (tmp / MANIFEST).write_text(json.dumps(manifest))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        return target

    def verify(self, uri: str, hashes: bool = False) -> dict:
        """The manifest of a committed folder after checking its files against it: sizes always, sha256 with
        hashes=True (before data is trained on or merged). A missing, truncated or altered file is a
        LoraflowError naming it, never silently used."""
        manifest = self.manifest(uri)
        if manifest is None:
            raise LoraflowError(f"{uri}: no committed output there (no {MANIFEST})")
        for entry in manifest["files"]:
            path = f"{self.path(uri)}/{entry['path']}"
            try:
                size = self.fs.size(path)
            except FileNotFoundError:
                raise LoraflowError(f"{uri}/{entry['path']}: listed in the manifest but missing from the store; delete {uri} to rebuild it") from None
            if size != entry["size"]:
                raise LoraflowError(f"{uri}/{entry['path']}: {size} bytes, the manifest says {entry['size']} (truncated or rewritten); delete {uri} to rebuild it")
            if hashes:
                with self.fs.open(path, "rb") as stream:
                    if hash_stream(stream) != entry["sha256"]:
                        raise LoraflowError(f"{uri}/{entry['path']}: its sha256 differs from the manifest's (altered after commit); delete {uri} to rebuild it")
        return manifest

    def list_committed(self, uri: str) -> list[str]:
        """Committed sub-folders of `uri` (one level), sorted by name."""
        # Object-store filesystems cache listings, and other processes (the trainer) write here.
        self.fs.invalidate_cache(self.path(uri))
        try:
            entries = self.fs.ls(self.path(uri), detail=True)
        except FileNotFoundError:
            return []
        folders = sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")
        return [f"{uri}/{name}" for name in folders if self.is_committed(f"{uri}/{name}")]

    # ---- writing ---------------------------------------------------------------------------
    def commit(self, local_dir: str | Path, uri: str, extra: dict | None = None, replace: bool = False) -> dict:
        """Publish a local folder at `uri`: upload every file, then the manifest.

        A committed folder is immutable: committing where a manifest already is changes nothing and
        returns that manifest (another writer built the same content key first; a reader may be using
        it). Only a run's own folders (checkpoints, metrics) pass replace=True to rewrite theirs.
        Leftovers of an interrupted write are not removed (a concurrent writer may be uploading there):
        files outside the manifest are never read.
        """
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise FileNotFoundError(f"{local_dir}: nothing to commit to {uri} (not a folder)")
        destination = self.path(uri)
        if not replace and (existing := self.manifest(uri)) is not None:
            return existing
        if replace and self.fs.exists(destination):
            self.fs.rm(destination, recursive=True)
        files = []
        for file in sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name not in (MANIFEST, LAST_USED)):
            relative = file.relative_to(local_dir).as_posix()
            with file.open("rb") as stream:
                digest = hash_stream(stream)
            files.append({"path": relative, "size": file.stat().st_size, "sha256": digest})
            target = f"{destination}/{relative}"
            if self.is_local:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copyfile(file, target)
            else:
                self.fs.put_file(str(file), target)
        manifest = {
            "files": files,
            "sha256": sha256_hex(files),
            "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(extra or {}),
        }
        self._put_bytes(f"{destination}/{MANIFEST}", json.dumps(manifest, indent=2).encode())
        self.fs.invalidate_cache(destination)
        return manifest
