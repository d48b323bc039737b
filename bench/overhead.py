"""Orchestration overhead: what a `loraflow run` costs beyond its training loop.

    .venv/bin/python bench/overhead.py [--steps 20]

On the small built model and the embedded 200-row Alpaca sample, each `loraflow run` as a user starts it (a fresh
store each time, its own process):
  temporary server   no PREFECT_API_URL: loraflow starts a temporary Prefect server for the run
  running server     a `prefect server start` already up (started here first), PREFECT_API_URL set; measured for the
                     first run on that server and for another one after it
  retry              after a run whose training failed at step 3 (checkpoint at 2), `loraflow run` again: the
                     time from the command to the trainer's first resumed step
Overhead = the command's wall time minus the training loop's (train_runtime_s in the run's summary).
"""

from __future__ import annotations

import sys

_HERE = __file__.rsplit("/", 1)[0]
sys.path[:] = [p for p in sys.path if p not in ("", _HERE)]

import argparse
import json
import os
import re
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _config(work: Path, model: Path, name: str, steps: int) -> Path:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "storage": str(work / f"store-{name}"), "model": {"base": str(model)},
        "data": {"path": str(REPO / "loraflow/data/sample/alpaca_gpt4_sample.json"), "val_set_size": 20},
        "train": {"learning_rate": 1e-3, "batch_size": 16, "max_steps": steps, "save_steps": 2, "eval_steps": 1000,
                  "retries": 0},
        "merge": {"enabled": False},
    }))
    return path


def _run(config: Path, env: dict, first_step_after: int | None = None) -> tuple[float, float | None, int]:
    """(wall seconds, seconds to the first training step numbered above first_step_after, exit code)."""
    started = time.time()
    first = None
    process = subprocess.Popen([str(BIN / "loraflow"), "run", str(config)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        step = re.search(r"\[(\d+)/\d+\] step=", line)
        if first is None and step and first_step_after is not None and int(step.group(1)) > first_step_after:
            first = time.time() - started
    return time.time() - started, first, process.wait()


def _train_runtime(store: Path) -> float:
    [summary] = store.glob("runs/*/checkpoints/final/train_summary.json")
    return json.loads(summary.read_text())["train_runtime_s"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loraflow-bench-overhead-"))
    base_env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home")}
    base_env.pop("PREFECT_API_URL", None)
    subprocess.run([str(BIN / "loraflow"), "build-model", str(work / "model")], check=True, env=base_env, stdout=subprocess.DEVNULL)
    model = work / "model"
    rows = []

    wall, _, code = _run(_config(work, model, "temporary", args.steps), base_env)
    assert code == 0
    rows.append(("temporary server", wall, _train_runtime(work / "store-temporary")))

    port = _free_port()
    server_env = {**base_env, "PREFECT_HOME": str(work / "server-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        api = f"http://127.0.0.1:{port}/api"
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{api}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise SystemExit("the Prefect server did not start in 120 s")
                time.sleep(0.5)
        running_env = {**server_env, "PREFECT_API_URL": api}
        # The first run on a server also registers the flow there; later ones do not.
        for name, label in (("running", "running server"), ("again", "running server, again")):
            wall, _, code = _run(_config(work, model, name, args.steps), running_env)
            assert code == 0
            rows.append((label, wall, _train_runtime(work / f"store-{name}")))

        retry = _config(work, model, "retry", args.steps)
        _, _, code = _run(retry, {**running_env, "LORAFLOW_TEST_FAIL_AT_STEP": "3"})
        assert code != 0, "the injected failure did not fail the run"
        wall, first_step, code = _run(retry, running_env, first_step_after=2)
        assert code == 0
    finally:
        server.terminate()
        server.wait(30)

    print(f"small built model, 200 Alpaca rows, {args.steps} steps of 16 examples; `loraflow run` from a fresh store")
    print(f"{'':<22} {'wall s':>7} {'training loop s':>16} {'overhead s':>11}")
    for name, wall_s, loop_s in rows:
        print(f"{name:<22} {wall_s:>7.1f} {loop_s:>16.1f} {wall_s - loop_s:>11.1f}")
    print(f"retry after a failure at step 3 (running server): first resumed step {first_step:.1f} s after the command; "
          f"the whole rerun {wall:.1f} s")
    print(f"(work folder: {work})")


if __name__ == "__main__":
    main()
