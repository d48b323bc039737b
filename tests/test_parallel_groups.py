"""The suite's parallel run keeps a module's tests together: pyproject.toml's `--dist loadgroup` sends the tests of one
xdist_group (tests/conftest.py marks each module that shares a module-scoped fixture) to one worker, so that fixture (a
real server and its worker, a first pipeline run) is built once. pytest 9.2 changed node ids so that pytest-xdist 3.8's
loadgroup silently stopped grouping (pytest-dev/pytest-xdist#1386): every such fixture was built on both workers and
the suite took half as long again. This test fails if a dependency update breaks the grouping again."""

import subprocess
import sys

import pytest

GROUPED = '''
import os, pytest

pytestmark = pytest.mark.xdist_group("together")


@pytest.mark.parametrize("index", range(6))
def test_records_its_worker(index, tmp_path_factory):
    with open(os.environ["WORKERS_FILE"], "a") as out:
        out.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")
'''


def test_the_tests_of_one_group_run_on_one_worker(tmp_path):
    (tmp_path / "test_first.py").write_text(GROUPED)
    (tmp_path / "test_second.py").write_text(GROUPED)
    workers = tmp_path / "workers.txt"
    finished = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider",
                               "-o", "addopts=", "--rootdir", str(tmp_path), str(tmp_path)],
                              cwd=tmp_path, env={"WORKERS_FILE": str(workers), "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    ran_on = workers.read_text().split()
    assert len(ran_on) == 12 and len(set(ran_on)) == 1, f"one group ran on {sorted(set(ran_on))}: loadgroup no longer groups"


def test_a_worker_and_the_processes_it_starts_use_its_share_of_the_cores():
    """Under xdist each worker's torch, and every trainer or CLI it starts, keeps to cores // workers threads
    (tests/conftest.py): at torch's default each process takes every core and the suite ran about half as long again."""
    import os

    import torch

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("-n 0: one process, every core its own")
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    share = str(max(1, len(os.sched_getaffinity(0)) // workers))
    started = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                             capture_output=True, text=True, timeout=120)
    assert (str(torch.get_num_threads()), started.stdout.strip()) == (share, share)
