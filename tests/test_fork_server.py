"""The trainer fork server (loraflow.fork_server): a trainer it forks is the process the launcher would have started
(command line, process group, working folder, standard streams, exit code, its end with its requester or a kill of its
group), and a requester it cannot serve gets a trainer process as before. The suite's flows train with the session's
fork server (tests/conftest.py), so their checks of what training produced hold for forked trainers."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from loraflow import launch
from loraflow.launch import FORK_SERVER_SETTING, ForkedTrainer, fork_trainer


@pytest.fixture
def fork_server(trainer_fork_server: Path) -> Path:
    """The session's fork server, once it listens (it imports for a few seconds after the session starts)."""
    deadline = time.time() + 120
    while "ready" not in (trainer_fork_server.parent / "fork-server.log").read_text():
        assert time.time() < deadline, (trainer_fork_server.parent / "fork-server.log").read_text()
        time.sleep(0.2)
    return trainer_fork_server


def _warm_argv(store: Path) -> list[str]:
    return [sys.executable, "-m", "loraflow.train", "-", "--store", str(store)]


def test_a_forked_trainer_is_the_process_the_launcher_would_start(fork_server, tmp_path):
    trainer = launch.start_warm_trainer(str(tmp_path))
    assert isinstance(trainer, ForkedTrainer)
    process = psutil.Process(trainer.pid)
    assert process.cmdline() == _warm_argv(tmp_path) or " ".join(process.cmdline()) == " ".join(_warm_argv(tmp_path))
    assert os.getpgid(trainer.pid) == trainer.pid  # its own process group: kill_group takes it and what it starts
    assert Path(process.cwd()) == Path.cwd()
    missing = tmp_path / "no-spec.json"
    lines = []
    code = launch.run_streaming(launch.build_command(launch.Topology(), str(missing)), lines.append, spec_uri=str(missing))
    assert code == 1 and trainer.returncode == 1  # (the trainer's own exit for an unreadable spec, its traceback relayed)
    assert lines[0].startswith("warm start: the trainer's imports took 0.0 s"), lines
    assert any(str(missing) in line for line in lines), lines


def test_a_forked_trainer_ends_with_its_requester_and_with_a_kill_of_its_group(fork_server, tmp_path):
    # The requester hands the trainer's stdin to a `sleep` that outlives it: the trainer sees no end of its input, so
    # only the server's SIGTERM (the requester's connection closed) ends it, as it ends a trainer that is training.
    requester = subprocess.Popen(
        [sys.executable, "-c", "import os, subprocess, time; from loraflow.launch import start_warm_trainer\n"
                               f"trainer = start_warm_trainer({str(tmp_path)!r})\n"
                               "os.set_inheritable(trainer.stdin.fileno(), True)\n"
                               "holder = subprocess.Popen(['sleep', '600'], close_fds=False)\n"
                               "print(trainer.pid, holder.pid, flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    pid, holder = map(int, requester.stdout.readline().split())
    try:
        trainer = psutil.Process(pid)
        assert trainer.is_running() and "loraflow.train" in " ".join(trainer.cmdline())
        requester.kill()
        requester.wait()
        trainer.wait(timeout=30)
    finally:
        os.kill(holder, signal.SIGKILL)

    killed = launch.start_warm_trainer(str(tmp_path))
    assert killed.poll() is None
    launch.kill_group(killed.pid)
    assert killed.wait(timeout=30) == -signal.SIGKILL


def test_a_requester_with_other_import_time_settings_gets_a_trainer_process(fork_server, tmp_path, monkeypatch):
    """The server's imports read the environment it started with: a trainer that would see another value of such a
    setting is not forked (the launcher starts it), and the server's log says which setting differed."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert fork_trainer(_warm_argv(tmp_path), dict(os.environ)) is None
    trainer = launch.start_warm_trainer(str(tmp_path))
    try:
        assert isinstance(trainer, subprocess.Popen)
    finally:
        launch.stop_warm_trainer(trainer)
    assert "refused: different import-time settings: HF_HUB_OFFLINE" in (fork_server.parent / "fork-server.log").read_text()
    monkeypatch.setenv(FORK_SERVER_SETTING, str(tmp_path / "no-server"))  # (none listening there: a process too)
    assert fork_trainer(_warm_argv(tmp_path), dict(os.environ)) is None
