"""One builder per content key among processes sharing a store, and a killed builder never blocks the others."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from loraflow import stages
from loraflow.lease import StoreLease, build_once
from loraflow.storage import ArtifactStore

REPO = Path(__file__).resolve().parents[1]


def race(store: ArtifactStore, builders: int = 3) -> tuple[list[str], list]:
    """`builders` threads ask for the same content key at once; the one that builds waits until every other is
    waiting on it, so the test fails whenever a second builder gets in."""
    waiting = threading.Semaphore(0)
    built, records, errors = [], [], []
    uri = store.uri("base", "same-key")

    def build(out: Path) -> dict:
        built.append(threading.current_thread().name)
        for _ in range(builders - 1):
            assert waiting.acquire(timeout=30), "the other runs never waited for this build"
        (out / "model.safetensors").write_bytes(os.urandom(1 << 16))
        return {"built_by": threading.current_thread().name}

    def log(line: str) -> None:
        if "waiting to reuse it" in line:
            waiting.release()

    def one_run() -> None:
        try:
            records.append(stages.reuse_or_build(store, "base", "same-key" * 4, uri, build, log))
        except Exception as error:  # reported below: an assertion in a thread would be lost
            errors.append(error)

    threads = [threading.Thread(target=one_run, name=f"run-{n}") for n in range(builders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return built, records


def test_concurrent_runs_build_a_content_key_once_and_the_others_reuse_it(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    built, records = race(store)
    assert len(built) == 1
    assert sorted(r.reused for r in records) == [False, True, True]
    assert {r.metrics["built_by"] for r in records} == {built[0]}  # everyone got the one build's record
    store.verify(records[0].uri, hashes=True)
    assert not list((tmp_path / "store" / "leases").rglob("*.json"))  # released


HOLD_AND_DIE = """
import sys, time
from loraflow.lease import StoreLease
from loraflow.storage import ArtifactStore
lease = StoreLease(ArtifactStore(sys.argv[1]), "base-abc", ttl=float(sys.argv[2]))
assert lease.try_acquire() is None
print("held", flush=True)
time.sleep(600)
"""


def test_a_killed_builder_on_this_machine_is_replaced_at_once(tmp_path):
    """A rerun after kill -9 on the same machine sees the holder's process is gone: no wait for its lease to expire."""
    store = ArtifactStore(str(tmp_path / "store"))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_DIE, store.url, "60"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    waiter_lines = []
    started = time.monotonic()
    with build_once(store, "base-abc", lambda: False, waiter_lines.append, ttl=60, poll=0.1) as must_build:
        waited = time.monotonic() - started
    assert must_build and waited < 5 and not waiter_lines, (waited, waiter_lines)  # not the 60 s TTL


def test_a_builder_elsewhere_that_stops_renewing_is_replaced_after_its_ttl(tmp_path):
    """A holder on another machine (or in another container: another PID namespace) cannot be looked up: its lease
    expires after the TTL without renewal."""
    store = ArtifactStore(str(tmp_path / "store"))
    folder = tmp_path / "store" / "leases" / "base-abc"
    folder.mkdir(parents=True)
    (folder / "00000000.json").write_text(json.dumps({"id": "other", "host": "gpu-node-7", "pid": os.getpid() + 99999,
                                                      "processes": "gpu-node-7/another-boot/pid:[1]", "renewed": time.time(), "ttl": 2}))
    waiter_lines = []
    started = time.monotonic()
    with build_once(store, "base-abc", lambda: False, waiter_lines.append, ttl=2, poll=0.1) as must_build:
        waited = time.monotonic() - started
    assert must_build
    assert any("process" in line and "on gpu-node-7" in line and "waiting" in line for line in waiter_lines), waiter_lines
    assert 1.5 < waited < 10  # the lease's TTL, not at once and not forever (Prefect's own file lock never expires)


def test_a_live_holder_keeps_its_lease_by_renewing_it(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    holder = StoreLease(store, "train-abc", ttl=0.8)
    assert holder.try_acquire() is None
    time.sleep(2.0)  # 2.5 TTLs: without renewals it would have expired twice
    assert StoreLease(store, "train-abc", ttl=0.8).try_acquire()["id"] == holder.holder["id"]
    holder.release()
    assert not holder.lost
    newcomer = StoreLease(store, "train-abc", ttl=0.8)
    assert newcomer.try_acquire() is None
    newcomer.release()


def test_only_one_of_several_waiters_takes_over_a_dead_lease(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    folder = tmp_path / "store" / "leases" / "merged-abc"
    folder.mkdir(parents=True)
    (folder / "00000003.json").write_text(json.dumps({"id": "dead", "host": "gone", "pid": 1, "renewed": time.time() - 999, "ttl": 5}))
    leases = [StoreLease(store, "merged-abc", ttl=5) for _ in range(4)]
    barrier = threading.Barrier(len(leases))
    results = []

    def contend(lease):
        barrier.wait()
        results.append(lease.try_acquire())

    threads = [threading.Thread(target=contend, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(None) == 1
    assert [p.name for p in folder.glob("*.json")] == ["00000004.json"]  # the dead holder's file is gone
    for lease in leases:
        lease.release()
