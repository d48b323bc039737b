"""The command that starts training: argv + environment for local, torchrun, deepspeed or mpirun, and running it.

build_command is pure data (no process is started), so every launcher is testable as a list of strings;
run_streaming runs the result in its own process group, or hands the spec to a trainer warm-started for it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from loraflow import process
from loraflow.errors import LoraflowError
from loraflow.storage import open_url

LAUNCHER_BINARIES = {"torchrun": "torchrun", "deepspeed": "deepspeed", "mpirun": "mpirun"}


@dataclass
class LaunchCommand:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def distributed_backend(device: str) -> str:
    """xccl on XPU (torch ≥ 2.8), ccl only where torch lacks xccl and oneCCL's bindings import, nccl on CUDA, gloo on CPU."""
    if device == "xpu":
        import torch.distributed

        if not torch.distributed.is_xccl_available() and importlib.util.find_spec("oneccl_bindings_for_pytorch") is not None:
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


def deepspeed_config(zero_stage: int, offload_optimizer: bool = False) -> dict | None:
    """The DeepSpeed config for a ZeRO stage (infra/deepspeed/zero<N>.json), to embed in the run spec.

    offload_optimizer keeps the optimizer state in host memory (ipex-llm's 70B ZeRO-2 recipe); DeepSpeed
    then steps it with its own CPU Adam, so the config names the optimizer and the Trainer fills in
    its hyperparameters ("auto").
    """
    if not zero_stage:
        return None
    path = DEEPSPEED_CONFIGS / f"zero{zero_stage}.json"
    if not path.is_file():
        raise LoraflowError(f"{path}: DeepSpeed config missing; loraflow looks for infra/deepspeed/ beside its package (an editable install)")
    config = json.loads(path.read_text())
    if offload_optimizer:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}
    return config


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


@dataclass
class Topology:
    """Where the ranks run: the launcher, processes per host, and the hosts (the first one is rank 0's)."""

    launcher: str = "local"
    nproc_per_node: int = 1
    hosts: list[str] = field(default_factory=list)
    master_port: int = 0  # 0: a free port on one host, 29500 across several
    mpi: str = "auto"

    @classmethod
    def from_train(cls, train) -> Topology:
        """From the train section (a TrainSettings or the dict in a run spec)."""
        get = train.get if isinstance(train, dict) else lambda name, default=None: getattr(train, name, default)
        return cls(get("launcher", "local"), get("nproc_per_node", 1), list(get("hosts", None) or []), get("master_port", 0) or 0, get("mpi", "auto"))

    @property
    def nnodes(self) -> int:
        return max(1, len(self.hosts))

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @cached_property
    def flavour(self) -> str:
        """The resolved mpi setting: `mpirun --version` is asked once per topology, not per use."""
        return mpi_flavour(self.mpi)

    @property
    def master_addr(self) -> str:
        return self.hosts[0] if self.hosts else os.environ.get("MASTER_ADDR", "127.0.0.1")

    def port(self) -> str:
        # A fixed default port (29500) collides when two trainings share a host, so one host gets a
        # free one; several hosts must agree on it, so they get the configured or the usual one.
        if self.master_port:
            return str(self.master_port)
        if self.nnodes > 1:
            return "29500"
        return os.environ.get("MASTER_PORT") or str(free_port())


def mpi_flavour(requested: str = "auto") -> str:
    """openmpi or intel: their mpirun flags differ (-x vs -genvlist, --map-by vs -ppn)."""
    if requested != "auto":
        return requested
    import subprocess

    try:
        banner = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "openmpi"
    return "intel" if "Intel" in banner else "openmpi"


def hostfile_text(topology: Topology, flavour: str = "openmpi") -> str:
    """The hostfile mpirun (Open MPI, Intel MPI) or deepspeed (same format as Open MPI) reads."""
    if flavour == "intel":
        return "".join(f"{host}:{topology.nproc_per_node}\n" for host in topology.hosts)
    return "".join(f"{host} slots={topology.nproc_per_node}\n" for host in topology.hosts)


def write_hostfile(topology: Topology, folder: Path) -> Path | None:
    """Write the hostfile for several hosts (mpirun and deepspeed read it on the launching host only)."""
    if topology.nnodes == 1 or topology.launcher not in ("mpirun", "deepspeed"):
        return None
    flavour = topology.flavour if topology.launcher == "mpirun" else "openmpi"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "hostfile"
    path.write_text(hostfile_text(topology, flavour))
    return path


def build_command(topology: Topology, spec_uri: str, node_rank: int = 0, python: str | None = None, hostfile: Path | None = None,
                  trust_remote_code: bool = False) -> LaunchCommand:
    """argv + environment to start the training ranks of this host (torchrun) or of every host (mpirun, deepspeed).

    trust_remote_code travels on the command line (from the flow's parameters), never in the spec file.
    """
    python = python or sys.executable
    module_args = [spec_uri, *(["--trust-remote-code"] if trust_remote_code else [])]
    entry = ["-m", "loraflow.train", *module_args]
    launcher, per_node, nnodes = topology.launcher, topology.nproc_per_node, topology.nnodes
    if launcher == "local":
        if per_node != 1 or nnodes != 1:
            raise LoraflowError("launcher local runs one process; use torchrun, deepspeed or mpirun for nproc_per_node > 1 or several hosts")
        return LaunchCommand([python, *entry])
    if nnodes > 1 and launcher in ("mpirun", "deepspeed") and hostfile is None:
        raise LoraflowError(f"{launcher} on {nnodes} hosts needs a hostfile (write_hostfile)")
    port = topology.port()
    if launcher == "torchrun":
        argv = [python, "-m", "torch.distributed.run", f"--nproc-per-node={per_node}"]
        if nnodes == 1:
            return LaunchCommand([*argv, f"--master-port={port}", *entry])
        # Static rendezvous: node ranks are the hosts' order, so global rank 0 (which writes the
        # checkpoints) is on hosts[0]. Each host runs this with its own --node-rank.
        return LaunchCommand([*argv, f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=static",
                              f"--rdzv-endpoint={topology.master_addr}:{port}", *entry])
    if launcher == "deepspeed":
        # The ZeRO config travels in the run spec; the launcher only starts the ranks (on other hosts over ssh/pdsh).
        argv = [find_program("deepspeed") or "deepspeed", f"--num_gpus={per_node}", f"--master_port={port}"]
        if nnodes > 1:
            argv += [f"--hostfile={hostfile}", f"--num_nodes={nnodes}", f"--master_addr={topology.master_addr}"]
        return LaunchCommand([*argv, "--module", "loraflow.train", *module_args])
    if launcher == "mpirun":
        env = {"MASTER_ADDR": topology.master_addr, "MASTER_PORT": port}
        passed = ["MASTER_ADDR", "MASTER_PORT", "PATH"]
        argv = ["mpirun", "-n", str(per_node * nnodes)]
        if topology.flavour == "intel":
            argv += ["-ppn", str(per_node), "-genvlist", ",".join(passed)]
            if hostfile:
                argv += ["-f", str(hostfile)]
        else:
            for name in passed:
                argv += ["-x", name]
            if hostfile:
                argv += ["--hostfile", str(hostfile), "--map-by", f"ppr:{per_node}:node"]
            if os.geteuid() == 0:
                argv.append("--allow-run-as-root")
        return LaunchCommand([*argv, python, *entry], env)
    raise LoraflowError(f"unknown launcher {launcher!r}; use local, torchrun, deepspeed or mpirun")


def die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM it if the process that started it dies (even by SIGKILL)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not glibc Linux: the process group kill below still applies
        pass


def _environment(env: dict[str, str]) -> dict[str, str]:
    """A started command's whole environment: this process's, with the command's own settings over it."""
    return {**os.environ, **env, "PYTHONUNBUFFERED": "1"}


def _start(argv: list[str], env: dict[str, str], cwd: str | None = None, stdin=None):
    """The process in its own group (so a kill takes every rank), dying with this one, its output one pipe of lines."""
    import subprocess

    return subprocess.Popen(
        argv,
        env=_environment(env),
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
        preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        cwd=cwd,
    )


def run_streaming(command: LaunchCommand, on_line, timeout: float | None = None, cwd: str | None = None,
                  spec_uri: str = "", forkable: bool = False) -> int:
    """Run the command in its own process group, pass each output line to on_line, return the exit code.

    A warm trainer started for this very command line (start_warm_trainer) is given spec_uri instead of starting a
    new process; else, where forkable (a one-process trainer without DeepSpeed) and a fork server is set, that server
    forks the trainer (loraflow.fork_server), already imported. The whole group is killed when the timeout passes
    (even if the command prints nothing), and on any exception here (a cancellation delivered as an exception, a failing on_line), so no trainer rank
    outlives the task that started it. If this process itself is killed outright, the launcher gets
    SIGTERM from the kernel (PR_SET_PDEATHSIG) and takes its ranks down with it.
    """
    import threading

    process = _take_warm_trainer(command, spec_uri) if spec_uri else None
    if process is not None:
        try:
            process.stdin.write(spec_uri + "\n")
            process.stdin.close()
        except OSError:  # it died while importing: its output below says why, and a retry starts a fresh one
            pass
    elif forkable and cwd is None and (process := fork_trainer(command.argv, _environment(command.env))) is not None:
        process.stdin.close()
    else:
        process = _start(command.argv, command.env, cwd)
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


# ---- warm start ---------------------------------------------------------------------------------
# A one-process trainer spends about 4 s importing torch, transformers and peft before it reads its spec. Started
# when the flow starts (`python -m loraflow.train -`: import, then read the spec URI from standard input), those
# imports run beside the stages before training instead of after them. Local launcher only: torchrun, deepspeed
# and mpirun start their own processes.
SPEC_FROM_STDIN = "-"
_warm_lock = __import__("threading").Lock()
_warm: dict[tuple[str, ...], list] = {}  # the command line (spec replaced by "-") → started, not yet given a spec


def start_warm_trainer(store: str, trust_remote_code: bool = False):
    """Start a local trainer that imports now and waits for a spec in `store` (named on its command line, so `ps` shows
    what it is for, and checked against the spec); stop_warm_trainer ends it."""
    import subprocess

    argv = [*build_command(Topology(), SPEC_FROM_STDIN, trust_remote_code=trust_remote_code).argv, "--store", store]
    process = fork_trainer(argv, _environment({})) or _start(argv, {}, stdin=subprocess.PIPE)
    with _warm_lock:
        _warm.setdefault(tuple(argv[:-2]), []).append(process)
    return process


def _take_warm_trainer(command: LaunchCommand, spec_uri: str):
    key = tuple(SPEC_FROM_STDIN if arg == spec_uri else arg for arg in command.argv)
    with _warm_lock:
        waiting = _warm.get(key)
        return waiting.pop() if waiting else None  # (one that died importing is taken too: its output says why)


def stop_warm_trainer(process) -> None:
    """End a warm trainer when its flow leaves the block: one nothing took has only imported; one that was taken and
    still runs means the flow is being stopped (cancelled, or killed by its worker), and its trainer goes with it."""
    with _warm_lock:
        for waiting in _warm.values():
            if process in waiting:
                waiting.remove(process)
    if process.poll() is None:
        kill_group(process.pid)
        process.wait()


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ---- a trainer forked by a fork server ------------------------------------------------------------------------------
# Where LORAFLOW_TRAINER_FORK_SERVER names the socket of a fork server (loraflow.fork_server: a process that has done a
# trainer's imports once), a one-process trainer without DeepSpeed is forked by it instead of started as a process.
FORK_SERVER_SETTING = "LORAFLOW_TRAINER_FORK_SERVER"


class ForkedTrainer:
    """A trainer the fork server forked, used as the launcher uses a subprocess.Popen: pid (also its process group),
    stdin, stdout (text, line-buffered), poll(), wait(), returncode (negative: the signal that ended it)."""

    def __init__(self, connection: socket.socket, pid: int, stdin_fd: int, stdout_fd: int):
        self._connection = connection
        self.pid = pid
        self.stdin = open(stdin_fd, "w", buffering=1)
        self.stdout = open(stdout_fd, "r", buffering=1)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self._connection.setblocking(False)
            try:
                self._ended(self._connection.recv(4096))
            except BlockingIOError:
                pass
            finally:
                if self.returncode is None:
                    self._connection.setblocking(True)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        import subprocess

        if self.returncode is None:
            self._connection.settimeout(timeout)
            try:
                self._ended(self._connection.recv(4096))
            except TimeoutError:
                raise subprocess.TimeoutExpired(f"forked trainer {self.pid}", timeout) from None
        return self.returncode

    def _ended(self, reply: bytes) -> None:
        # (no reply: the fork server itself ended, and its trainers with it: PR_SET_PDEATHSIG)
        self.returncode = json.loads(reply)["exit"] if reply else -signal.SIGTERM
        self._connection.close()


def fork_trainer(argv: list[str], env: dict[str, str]) -> ForkedTrainer | None:
    """A trainer (argv: `PYTHON -m loraflow.train …`, warm or given its spec) forked by the fork server
    LORAFLOW_TRAINER_FORK_SERVER names, with env as its whole environment; None where none is named, it cannot be reached, or it refuses (another
    Python, other import-time settings): the caller then starts the process itself."""
    path = os.environ.get(FORK_SERVER_SETTING)
    if not path:
        return None
    stdin_read, stdin_write = os.pipe()
    stdout_read, stdout_write = os.pipe()
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        connection.settimeout(10)  # (a server that accepts but never answers must not hold a flow up)
        connection.connect(path)
        request = {"argv": argv, "env": env, "cwd": os.getcwd()}
        socket.send_fds(connection, [json.dumps(request).encode()], [stdin_read, stdout_write])
        reply = json.loads(connection.recv(4096) or b'{"refused": "the fork server closed the connection"}')
        connection.settimeout(None)
    except (OSError, ValueError):
        reply = {"refused": "unreachable"}
    finally:
        os.close(stdin_read)
        os.close(stdout_write)
    if "pid" not in reply:
        connection.close()
        os.close(stdin_write)
        os.close(stdout_read)
        return None
    return ForkedTrainer(connection, reply["pid"], stdin_write, stdout_read)


def main(argv: list[str] | None = None) -> int:
    """`python -m loraflow.launch SPEC_URI --node-rank N`: start another host's ranks of a torchrun run.

    mpirun and deepspeed reach every host from the first one; torchrun needs its agent started on
    each host, with the same spec and that host's rank (its index in train.hosts).
    """
    import argparse

    process.setup()
    parser = argparse.ArgumentParser(prog="python -m loraflow.launch", description=main.__doc__.splitlines()[0])
    parser.add_argument("spec_uri", help="the run spec the training flow wrote (runs/<run>/spec.json, any fsspec URL)")
    parser.add_argument("--node-rank", type=int, required=True, help="this host's index in train.hosts (1, 2, …)")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the base model's own code to run (never read from the spec)")
    args = parser.parse_args(argv)
    with open_url(args.spec_uri, "r") as stream:
        topology = Topology.from_train(json.load(stream)["train"])
    if topology.launcher != "torchrun" or not 0 < args.node_rank < topology.nnodes:
        print(f"error: {args.spec_uri}: this is for torchrun runs on several hosts, node ranks 1..{topology.nnodes - 1} "
              f"(launcher {topology.launcher}, {topology.nnodes} host(s))", file=sys.stderr)
        return 2
    command = build_command(topology, args.spec_uri, args.node_rank, trust_remote_code=args.trust_remote_code)
    print(" ".join(command.argv), flush=True)
    if args.dry_run:
        return 0
    return run_streaming(command, print)


if __name__ == "__main__":
    sys.exit(main())
