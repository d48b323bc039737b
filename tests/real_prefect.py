"""A real `prefect server start` and `prefect worker start` in subprocesses, for end-to-end tests.

Each gets its own PREFECT_HOME (so its SQLite database and settings are private), listens on a free
loopback port, runs in its own process group, and is killed with that group when the test ends. Its database starts
as a copy of one migrated once per test run (migrated_database), not as a new one that runs every migration.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from loraflow.launch import free_port

REPO = Path(__file__).resolve().parents[1]
UI_GUIDE = REPO / "docs" / "ui-and-schedules.md"
BIN = Path(sys.executable).parent


def prefect_env(home: Path, api_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # pick up a scheduled run within a second, not ten
        "PREFECT_WORKER_PREFETCH_SECONDS": "1",
        # The scheduler's full pass runs every 60 s by default; a schedule added to an existing
        # deployment (as in the UI) waits for it. 5 s keeps the schedule test short.
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    return env


# The run's shared temporary folder (tests/conftest.py sets it; under pytest-xdist every worker's is the same), where
# migrated_database keeps its database. None outside pytest: servers then start from a new database.
RUN_FOLDER: Path | None = None
DATABASE = "prefect.db"  # (the file a PREFECT_HOME's default database URL names)


def migrated_database() -> Path | None:
    """A Prefect database with every migration applied, made once per test run (the first caller builds it under a file
    lock; the other workers wait for it and reuse it) for each server to start from a copy of. A new database runs
    Prefect's migrations (over a hundred) before the server answers: 10-20 s of every start on 2 cores."""
    if RUN_FOLDER is None:
        return None
    from filelock import FileLock  # (installed with torch; a lock that works across the xdist worker processes)

    template = RUN_FOLDER / "prefect-template" / DATABASE
    with FileLock(str(RUN_FOLDER / "prefect-template.lock")):
        if not template.exists():
            building = RUN_FOLDER / "prefect-template.partial"  # (renamed when complete: a killed build leaves no template)
            shutil.rmtree(building, ignore_errors=True)
            building.mkdir(parents=True)
            env = {k: v for k, v in prefect_env(building, "").items() if k != "PREFECT_API_URL"}
            result = subprocess.run([str(BIN / "prefect"), "server", "database", "upgrade", "-y"], env=env, cwd=building,
                                    capture_output=True, text=True, timeout=600)
            assert result.returncode == 0 and (building / DATABASE).exists(), result.stdout[-3000:] + result.stderr[-3000:]
            building.rename(template.parent)
    return template


def seed_database(folder: Path, name: str = DATABASE) -> None:
    """Put a copy of the migrated database in folder (a new PREFECT_HOME) unless it has one."""
    template = migrated_database()
    if template is not None and not (folder / name).exists():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, folder / name)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def sigint_as_in_a_terminal() -> None:
    """preexec_fn of a command a test stops with Ctrl-C's SIGINT: as started from a terminal, where SIGINT reaches it. The
    suite itself may run with SIGINT ignored (started as a background job or under nohup, as a CI script may start it):
    its commands would inherit that, and Python keeps an inherited ignore, so SIGINT would never reach them."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(argv: list[str], env: dict, log: Path, cwd: Path = REPO, sigint_ignored: bool = False) -> subprocess.Popen:
    stream = log.open("w")
    return subprocess.Popen(argv, env=env, cwd=cwd, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_ignore_sigint if sigint_ignored else None)


def _stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class Server:
    def __init__(self, home: Path):
        self.home = home
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.env = prefect_env(home, self.api_url)
        self.log = home / "server.log"
        self.processes: list[subprocess.Popen] = []

    def run(self, *argv: str, timeout: float = 300, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(list(argv), env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        return result

    def start_background(self, *argv: str, log_name: str, env: dict | None = None, sigint_ignored: bool = False) -> Path:
        """A long-running process (a worker, `loraflow serve`) against this server, stopped with it; returns its log.

        sigint_ignored: start it as a shell script's background job (`cmd &`, nohup) is started, SIGINT ignored.
        """
        log = self.home / log_name
        self.processes.append(_start(list(argv), {**self.env, **(env or {})}, log, sigint_ignored=sigint_ignored))
        return log

    def create_pool_and_deploy(self) -> None:
        """docs/ui-and-schedules.md's "With a worker" commands that make the pool and the deployments, as a script, before any worker
        has started: every line but the server's start, its `export`, `loraflow demo` and the worker's start."""
        block = UI_GUIDE.read_text().split("**With a worker**", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
        commands = [line for line in block.replace("\\\n", " ").splitlines()
                    if not re.search(r"prefect server start|^export |loraflow demo|start-worker", line)]
        assert any("prefect deploy --all" in line for line in commands), block
        script = "set -e\n" + "\n".join(line.replace(".venv/bin/", f"{BIN}/") for line in commands)
        self.run("bash", "-c", script, env={"LORAFLOW_VENV": str(BIN.parent), "PREFECT_CLI_PROMPT": "false"})

    def client_settings(self):
        from prefect.settings import PREFECT_API_URL, temporary_settings

        return temporary_settings({PREFECT_API_URL: self.api_url})


@contextmanager
def real_server(home: Path, startup_timeout: float = 120):
    home.mkdir(parents=True, exist_ok=True)
    seed_database(home)
    server = Server(home)
    process = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(server.port)], server.env, server.log)
    server.processes.append(process)
    try:
        deadline = time.time() + startup_timeout
        while True:
            try:
                with urllib.request.urlopen(f"{server.api_url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"prefect server did not start:\n{server.log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield server
    finally:
        for started in reversed(server.processes):
            _stop(started)


@contextmanager
def server_with_pool_worker(home: Path, worker_name: str):
    """A real server with the xpu pool from its JSON, the deployments, and a worker of the pool started as
    `infra/worker/start-worker xpu &` from a script starts it (SIGINT ignored)."""
    with real_server(home) as server:
        server.create_pool_and_deploy()
        server.worker_log = server.start_background(str(REPO / "infra/worker/start-worker"), "xpu", log_name="worker.log",
                                                    env={"LORAFLOW_VENV": str(BIN.parent), "LORAFLOW_WORKER_NAME": worker_name},
                                                    sigint_ignored=True)
        yield server


def flow_run_logs(server: Server, flow_run_id) -> list:
    """Every log of a flow run, oldest first (the API answers 200 at a time; a fine-tune logs more)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    logs = []
    with server.client_settings(), get_client(sync_client=True) as client:
        while page := client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                       sort=LogSort.TIMESTAMP_ASC, limit=200, offset=len(logs)):
            logs += page
            if len(page) < 200:
                break
    return logs
