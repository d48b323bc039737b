"""One builder per content key across processes and machines that share a store: a lease in the store.

Why not Prefect's own transactional isolation: its lock managers are per machine (memory, a local
folder) or need Redis, and the task engine takes the lock with no hold timeout, so a killed holder's
lock never expires and every later run of that key would wait forever. The store is the one thing
every machine of a fine-tune already shares, so the lease lives there, and needs only an atomic
create-if-absent: a hard link on a local or mounted store, an S3 conditional PUT (`If-None-Match: *`,
which AWS S3, MinIO and moto honour) on a bucket.

A lease is `<store>/leases/<name>/<generation>.json`. Its holder rewrites it every `ttl/4` seconds;
one not renewed for `ttl` seconds belongs to a dead holder (a killed process, a lost node), as does one whose
process no longer exists where the waiter can see it (the same machine and PID namespace), and a
waiter takes over by creating the next generation: exactly one waiter can create it, so a takeover
never lets two builders in. Holders on different machines compare renewal times across clocks, so
the TTL also bounds the clock skew tolerated.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from loraflow.storage import ArtifactStore

LEASE_SECONDS = float(os.environ.get("LORAFLOW_LEASE_SECONDS", 120))


def _process_space() -> str | None:
    """Which process IDs this process sees: the kernel's boot and this PID namespace (so two containers on one machine,
    or one hostname on two machines, never take each other's PIDs for their own). None where Linux does not say."""
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
        return f"{socket.gethostname()}/{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


PROCESS_SPACE = _process_space()
POLL_SECONDS = 1.0


class StoreLease:
    def __init__(self, store: ArtifactStore, name: str, ttl: float = LEASE_SECONDS):
        self.store, self.name, self.ttl = store, name, ttl
        self.folder = store.path(store.uri("leases", name))
        self.holder = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "processes": PROCESS_SPACE}
        self.path: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.lost = False

    # ---- the store's atomic operations --------------------------------------------------------
    def _body(self) -> bytes:
        return json.dumps({**self.holder, "renewed": time.time(), "ttl": self.ttl}).encode()

    def _create(self, path: str) -> bool:
        """Create `path` with this holder's body unless it exists; True if this call created it."""
        if self.store.is_local:
            while True:  # a releasing holder may remove the empty folder between these two calls
                os.makedirs(self.folder, exist_ok=True)
                try:
                    fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-")
                    break
                except FileNotFoundError:
                    continue
            with os.fdopen(fd, "wb") as stream:
                stream.write(self._body())
            try:
                os.link(tmp, path)  # atomic, and the file is whole from its first moment
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        try:
            self.store.fs.pipe_file(path, self._body(), mode="create")
            return True
        except FileExistsError:
            return False
        except OSError as error:  # s3fs reports a failed precondition as a plain OSError on some versions
            if "PreconditionFailed" in str(error) or "412" in str(error):
                return False
            raise

    def _generations(self) -> list[tuple[int, dict | None]]:
        fs = self.store.fs
        fs.invalidate_cache(self.folder)
        try:
            names = [entry.rsplit("/", 1)[-1] for entry in fs.ls(self.folder, detail=False)]
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            stem = name.removesuffix(".json")
            if not name.endswith(".json") or not stem.isdigit():
                continue
            try:
                body = json.loads(fs.cat_file(f"{self.folder}/{name}"))
            except (FileNotFoundError, ValueError):
                body = None  # removed meanwhile (released), or not JSON: counts as expired
            found.append((int(stem), body))
        return sorted(found, key=lambda item: item[0])

    @staticmethod
    def _alive(body: dict | None) -> bool:
        if not body or time.time() >= float(body.get("renewed", 0)) + float(body.get("ttl", 0)):
            return False
        if PROCESS_SPACE and body.get("processes") == PROCESS_SPACE:  # a holder whose process this one can see: alive
            try:                                                        # only while its process exists (no TTL wait
                os.kill(int(body["pid"]), 0)                           # after a kill -9 on this machine)
            except ProcessLookupError:
                return False
            except (PermissionError, KeyError, ValueError):
                pass
        return True

    # ---- acquire / renew / release --------------------------------------------------------
    def try_acquire(self) -> dict | None:
        """Take the lease if it is free or its holder is dead. Returns None when taken, else the live holder."""
        generations = self._generations()
        if generations and self._alive(generations[-1][1]):
            return generations[-1][1]
        number = generations[-1][0] + 1 if generations else 0
        path = f"{self.folder}/{number:08d}.json"
        if not self._create(path):
            latest = self._generations()
            return (latest[-1][1] if latest else None) or {}  # {}: another waiter won the race
        self.path = path
        for older, _ in generations:  # a dead holder's files: nobody will renew them again
            self.store.fs.rm_file(f"{self.folder}/{older:08d}.json")
        self._renewer = threading.Thread(target=self._renew, name=f"lease-{self.name}", daemon=True)
        self._renewer.start()
        return None

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                current = json.loads(self.store.fs.cat_file(self.path))
            except (FileNotFoundError, ValueError):
                current = None
            if not current or current.get("id") != self.holder["id"]:
                self.lost = True  # taken over after this process stalled longer than the TTL
                return
            self.store._put_bytes(self.path, self._body())

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.path is not None and not self.lost:
            try:
                self.store.fs.rm_file(self.path)
            except FileNotFoundError:
                pass
            if self.store.is_local:  # an object store has no folders to leave behind
                try:
                    os.rmdir(self.folder)
                except OSError:
                    pass  # another waiter's generation is there, or it was never created
        self.path = None


def describe(holder: dict) -> str:
    if not holder:
        return "another process"
    since = time.strftime("%H:%M:%S", time.localtime(float(holder.get("renewed", 0))))
    return f"process {holder.get('pid')} on {holder.get('host')} (alive at {since})"


@contextmanager
def build_once(store: ArtifactStore, name: str, done: Callable[[], bool], log: Callable[[str], None],
               ttl: float = LEASE_SECONDS, poll: float = POLL_SECONDS) -> Iterator[bool]:
    """Yield True when this process must build `name` (it holds the lease), False when `done()` became true
    while waiting (another process built it). Waits as long as the builder is alive; a dead builder's lease
    is taken over after `ttl` seconds without renewal."""
    lease = StoreLease(store, name, ttl)
    waiting_since = None
    next_note = 0.0
    while True:
        if done():
            if waiting_since is not None:
                log(f"{name}: built by the other run after {time.monotonic() - waiting_since:.0f} s of waiting; reusing it")
            yield False
            return
        holder = lease.try_acquire()
        if holder is None:
            break
        now = time.monotonic()
        if waiting_since is None:
            waiting_since = now
        if now >= next_note:
            log(f"{name}: {describe(holder)} is building it; waiting to reuse it (a holder that stops renewing its "
                f"lease is replaced after {ttl:.0f} s)")
            next_note = now + 60
        time.sleep(poll)
    try:
        # Built while this process was acquiring: the lease came free because the builder finished.
        yield not done()
    finally:
        lease.release()
