"""The command that starts training: argv + environment for local, torchrun, deepspeed or mpirun.

Pure data (no process is started here), so every launcher is testable as a list of strings. The
training flow runs the result in its own process group.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from loraflow.errors import LoraflowError

LAUNCHER_BINARIES = {"torchrun": "torchrun", "deepspeed": "deepspeed", "mpirun": "mpirun"}


@dataclass
class LaunchCommand:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def distributed_backend(device: str) -> str:
    """xccl on XPU (torch ≥ 2.8), ccl only where oneCCL's bindings import, nccl on CUDA, gloo on CPU."""
    if device == "xpu":
        if importlib.util.find_spec("oneccl_bindings_for_pytorch") is not None:
            return "ccl"
        return "xccl"
    if device == "cuda":
        return "nccl"
    return "gloo"


def find_program(name: str) -> str | None:
    """A program on PATH, or installed beside this Python (a virtual environment that is not activated)."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None)


DEEPSPEED_CONFIGS = Path(__file__).resolve().parents[1] / "infra" / "deepspeed"


def deepspeed_config(zero_stage: int) -> dict | None:
    """The DeepSpeed config for a ZeRO stage (infra/deepspeed/zero<N>.json), to embed in the run spec."""
    if not zero_stage:
        return None
    path = DEEPSPEED_CONFIGS / f"zero{zero_stage}.json"
    if not path.is_file():
        raise LoraflowError(f"{path}: DeepSpeed config missing; loraflow looks for infra/deepspeed/ beside its package (an editable install)")
    return json.loads(path.read_text())


def launcher_available(launcher: str) -> bool:
    # torchrun is started as `python -m torch.distributed.run`: it comes with torch, PATH or not.
    if launcher in ("local", "torchrun"):
        return True
    return find_program(LAUNCHER_BINARIES[launcher]) is not None


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def build_command(launcher: str, spec_uri: str, nproc_per_node: int = 1, python: str | None = None) -> LaunchCommand:
    python = python or sys.executable
    entry = ["-m", "loraflow.train", spec_uri]
    if launcher == "local":
        if nproc_per_node != 1:
            raise LoraflowError("launcher local runs one process; use torchrun, deepspeed or mpirun for nproc_per_node > 1")
        return LaunchCommand([python, *entry])
    # A fixed default rendezvous port (29500) collides when two trainings share a host; one host
    # gets a free port unless MASTER_PORT says otherwise (several hosts must agree on it).
    port = os.environ.get("MASTER_PORT") or str(free_port())
    if launcher == "torchrun":
        return LaunchCommand([python, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}", f"--master-port={port}", *entry])
    if launcher == "deepspeed":
        # The ZeRO config travels in the run spec; the launcher only starts the ranks.
        argv = [find_program("deepspeed") or "deepspeed", f"--num_gpus={nproc_per_node}", f"--master_port={port}", "--module", "loraflow.train", spec_uri]
        return LaunchCommand(argv)
    if launcher == "mpirun":
        # Open MPI: -x passes a variable to every rank (Intel MPI spells it -genvlist).
        argv = ["mpirun", "-n", str(nproc_per_node), "-x", "MASTER_ADDR", "-x", "MASTER_PORT", "-x", "PATH"]
        if os.geteuid() == 0:
            argv.append("--allow-run-as-root")
        env = {"MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"), "MASTER_PORT": port}
        return LaunchCommand([*argv, python, *entry], env)
    raise LoraflowError(f"unknown launcher {launcher!r}; use local, torchrun, deepspeed or mpirun")


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM it if the process that started it dies (even by SIGKILL)."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not glibc Linux: the process group kill below still applies
        pass


def run_streaming(command: LaunchCommand, on_line, timeout: float | None = None, cwd: str | None = None) -> int:
    """Run the command in its own process group, pass each output line to on_line, return the exit code.

    The whole group is killed when the timeout passes (even if the command prints nothing), and on any
    exception here (a cancellation delivered as an exception, a failing on_line), so no trainer rank
    outlives the task that started it. If this process itself is killed outright, the launcher gets
    SIGTERM from the kernel (PR_SET_PDEATHSIG) and takes its ranks down with it.
    """
    import subprocess
    import threading

    process = subprocess.Popen(
        command.argv,
        env={**os.environ, **command.env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        cwd=cwd,
    )
    timed_out = threading.Event()

    def on_timeout() -> None:
        timed_out.set()
        kill_group(process.pid)

    watchdog = threading.Timer(timeout, on_timeout) if timeout else None
    try:
        if watchdog:
            watchdog.start()
        for line in process.stdout:
            on_line(line.rstrip("\n"))
        code = process.wait()
    except BaseException:
        kill_group(process.pid)
        process.wait()
        raise
    finally:
        if watchdog:
            watchdog.cancel()
    if timed_out.is_set():
        raise TimeoutError(f"training exceeded its {timeout:g} s timeout (train.timeout_s); its process group was killed")
    return code


def kill_group(pid: int) -> None:
    import signal

    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
