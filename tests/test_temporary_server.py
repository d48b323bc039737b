"""Prefect's temporary server, which `loraflow run`, `demo`, `sweep`, `runs` and `artifacts` start when PREFECT_API_URL
names no server: it comes up on a slow or busy machine, and where it cannot, the command says so in one line."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The console script a user runs (installed beside this Python), else the module it calls.
LORAFLOW = [str(Path(sys.executable).parent / "loraflow")] if (Path(sys.executable).parent / "loraflow").exists() else \
    [sys.executable, "-m", "loraflow.cli"]
BUSY_SECONDS = 240  # each busy loop ends by itself after this, should the test be killed before it stops them


def _fresh_prefect_env(home: Path, **settings: str) -> dict:
    """This process's environment with its own new PREFECT_HOME, no server named and no start bound of the user's."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("PREFECT_API_URL", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")}
    return {**env, "PREFECT_HOME": str(home), "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "results"), **settings}


@pytest.fixture
def busy_cores():
    """A busy loop on every core (at least 2), for the test's duration (and never longer than BUSY_SECONDS)."""
    loop = f"import time\nend = time.monotonic() + {BUSY_SECONDS}\nwhile time.monotonic() < end:\n    pass\n"
    loops = [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(max(2, os.cpu_count() or 1))]
    yield len(loops)
    for process in loops:
        process.kill()
        process.wait()


def test_the_temporary_server_starts_from_a_fresh_home_with_every_core_busy(busy_cores, tmp_path):
    # `loraflow runs` is the cheapest command that needs the server: it lists the (here no) fine-tunes in its database.
    # Prefect's own 20 s bound failed here (and fails with PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=20): a first
    # start creates the database, which took 35-40 s with both cores busy.
    started = time.monotonic()
    result = subprocess.run([*LORAFLOW, "runs"], capture_output=True, text=True, timeout=600,
                            env=_fresh_prefect_env(tmp_path / "prefect"))
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in output, output[-3000:]
    assert "no fine-tune flow runs (loraflow-sft, loraflow-dpo) in this Prefect database" in result.stdout
    print(f"`loraflow runs` from a fresh PREFECT_HOME beside {busy_cores} busy loops: {time.monotonic() - started:.0f} s")


def test_a_temporary_server_that_cannot_start_in_time_is_one_error_line_saying_what_to_do(tmp_path):
    # A bound the user set is kept, and no server answers within 1 s (Prefect's imports alone take longer).
    env = _fresh_prefect_env(tmp_path / "prefect", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")
    result = subprocess.run([*LORAFLOW, "runs"], capture_output=True, text=True, timeout=300, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output[-3000:]
    [error] = [line for line in output.splitlines() if line.startswith("error: ")]
    assert error.startswith(f"error: Prefect's temporary server (PREFECT_HOME {tmp_path / 'prefect'}) did not answer "
                            "within its start bound of 1 s (waited "), error
    assert error.endswith("allow more, e.g. export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=300, or start a server "
                          "once (`.venv/bin/prefect server start`) and export PREFECT_API_URL=http://127.0.0.1:4200/api, then run this "
                          "again"), error
    assert output.count("did not answer") == 1


def test_a_command_waits_for_a_server_started_just_before_it(tmp_path):
    """The README's steps start `prefect server start &` and run `loraflow demo` on the next line: the demo failed with
    httpx's ConnectError traceback while the server was still starting. A server that answers a moment later is
    waited for."""
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from loraflow.cli import wait_for_server

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", port), Health)
    starter = threading.Timer(1.5, server.serve_forever)  # it answers 1.5 s after the command began
    starter.start()
    try:
        started = time.monotonic()
        wait_for_server(f"http://127.0.0.1:{port}/api")
        assert time.monotonic() - started >= 1.0
    finally:
        starter.cancel()
        server.shutdown()
        server.server_close()


def test_a_named_server_that_never_answers_is_one_error_line(tmp_path):
    with __import__("socket").socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]  # closed once the with ends: nothing listens there
    env = {**_fresh_prefect_env(tmp_path / "home"), "PREFECT_API_URL": f"http://127.0.0.1:{closed}/api",
           "LORAFLOW_SERVER_WAIT_SECONDS": "2"}
    result = subprocess.run([*LORAFLOW, "runs"], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"PREFECT_API_URL=http://127.0.0.1:{closed}/api did not answer within 2 s" in errors[0], result.stderr
