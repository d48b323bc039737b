"""A trainer fork server: a process that has done a trainer's imports once and forks each warm trainer from itself.

A warm trainer (loraflow.launch.start_warm_trainer: `python -m loraflow.train - --store …`) spends about 4 s of CPU
importing torch, transformers, peft, datasets and bitsandbytes before it waits for its spec. Where a host starts many
(a worker host running job after job, a test session starting over a hundred), a fork server started once does those
imports once: `python -m loraflow.fork_server SOCKET`, and every process that should use it gets
LORAFLOW_TRAINER_FORK_SERVER=SOCKET in its environment (the requester's side: loraflow.launch.fork_trainer). Each
request forks a child that is what `python -m loraflow.train …` would be once imported: its own process group, the
requester's standard input, output, working folder and environment, the command line shown by ps, SIGTERM when its
requester dies (as the launcher's PR_SET_PDEATHSIG does for a started process), and its exit code sent back.

The server forks only for a requester whose environment matches its own in every setting the libraries read when
imported (IMPORT_TIME_SETTINGS: their import already happened, with the server's values); otherwise the requester
starts a trainer process as usual. One fork server serves one Python (the requester's sys.executable must be the
server's) and one user (the socket is the user's own).

Why by hand: multiprocessing's forkserver forks only for the process that started it and gives no process handle with
a command's standard streams and exit code; here the requests come from any process of the host (the flow processes a
Prefect worker starts), and the launcher treats the trainer as a process (its output lines, its exit code, a kill of
its process group).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import sys
import threading
import traceback

from setproctitle import setproctitle

from loraflow import process, train
from loraflow.launch import die_with_parent

# Environment settings read when a library is imported (or when torch's thread pools start), by prefix: a requester
# whose value differs gets a fresh process, since the server's imports used its own.
IMPORT_TIME_SETTINGS = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "OMP_", "KMP_", "MKL_", "GOMP_",
                        "OPENBLAS_", "CUDA_", "NVIDIA_", "ZE_", "ONEAPI_", "SYCL_", "CCL_", "I_MPI_", "LD_", "PYTHON",
                        "BNB_", "BITSANDBYTES_", "DATASETS_", "ACCELERATE_", "PEFT_", "TRL_", "TRITON_",
                        "XDG_CACHE_HOME", "LORAFLOW_LEASE_SECONDS")
# Settings of those prefixes read when used, not when imported: PYTHONUNBUFFERED (the child's streams are set up for it),
# PYTORCH_NVML_BASED_CUDA_CHECK (torch.cuda.is_available reads it; accelerate sets it around that call, so a requester
# may pass it while another thread is inside the call).
CALL_TIME_SETTINGS = frozenset({"PYTHONUNBUFFERED", "PYTORCH_NVML_BASED_CUDA_CHECK"})
_REQUEST_BYTES = 1 << 20


def _import_time_environment(env: dict[str, str]) -> dict[str, str]:
    # (an empty setting is an absent one: the pool's job template sets its unused device settings to "")
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_SETTINGS) and v and k not in CALL_TIME_SETTINGS}


def differences(env: dict[str, str], imported_with: dict[str, str], after_imports: dict[str, str]) -> list[str]:
    """The import-time settings in which env differs from imported_with, the environment the server's imports saw
    (a value the imports set for themselves, as in after_imports, is the same: the requester's own imports set it)."""
    before, theirs, after = (_import_time_environment(e) for e in (imported_with, env, after_imports))
    return sorted(k for k in before.keys() | theirs.keys() | after.keys() if theirs.get(k) not in (before.get(k), after.get(k)))


# ---- the server's side --------------------------------------------------------------------------------------------

def _refusal(request: dict, imported_with: dict[str, str]) -> str:
    # (the path itself, not where its links lead: a virtual environment's python links to the same interpreter as
    # another environment's, e.g. the ipex-llm backend's)
    if os.path.abspath(request["argv"][0]) != os.path.abspath(sys.executable):
        return f"another Python ({request['argv'][0]}); this server's is {sys.executable}"
    if request["argv"][1:3] != ["-m", "loraflow.train"]:
        return "not a trainer's command line"
    if different := differences(request["env"], imported_with, dict(os.environ)):
        return f"different import-time settings: {', '.join(different)}"
    if threading.active_count() != 1:  # (a fork copies only the calling thread: another one's locks would stay held)
        return "the server has more than one thread"
    return ""


def _become_trainer(request: dict, stdin_fd: int, stdout_fd: int, servers: list[socket.socket], server_fds: list[int],
                    started_fd: int) -> None:
    """In the forked child: what `python -m loraflow.train ARGS` is once imported, then exit with its code."""
    exit_code = 1
    try:
        signal.set_wakeup_fd(-1)
        for number in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(number, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for held in servers:  # (the server's sockets and wakeup pipe: the trainer keeps none of them)
            held.close()
        for fd in server_fds:
            os.close(fd)
        os.setpgid(0, 0)  # (its own process group, as the launcher's processes have: a kill takes its whole group)
        die_with_parent()  # (SIGTERM when the server dies; the server SIGTERMs it when its requester dies)
        setproctitle(" ".join(request["argv"]))  # (ps and /proc show the trainer's command line, not the server's)
        os.close(started_fd)  # (the server replies to the requester now: the group and the command line are in place)
        os.dup2(stdin_fd, 0)
        os.dup2(stdout_fd, 1)
        os.dup2(stdout_fd, 2)
        os.close(stdin_fd)
        os.close(stdout_fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        sys.argv = [train.__file__, *request["argv"][3:]]
        exit_code = train.main()
    except SystemExit as ended:
        exit_code = ended.code if isinstance(ended.code, int) else (0 if ended.code is None else 1)
    except BaseException:  # noqa: BLE001 (what the interpreter would print for an uncaught exception, and its exit code)
        traceback.print_exc()
    process.exit_now(exit_code)


def serve(path: str) -> None:
    """Import what a trainer imports, then fork a trainer for each request on the socket at path, until killed."""
    imported_with = dict(os.environ)  # (imports may set settings of their own: torch's Inductor sets its cache folder)
    process.setup()  # (warm trainers never use DeepSpeed: the launcher starts DeepSpeed runs with their spec)
    train.import_training_libraries()
    import trl  # noqa: F401  (DPO's trainer, imported once here rather than in each DPO trainer)

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if os.path.exists(path):
        os.unlink(path)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(64)
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # (a handler, so that the wakeup fd hears of each child's end)
    events = selectors.DefaultSelector()
    events.register(listener, selectors.EVENT_READ)
    events.register(wake_read, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}  # trainer's pid → its requester's connection
    print(f"fork server ready on {path}", flush=True)

    def reap() -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            connection = children.pop(pid, None)
            if connection is not None:
                try:
                    connection.send(json.dumps({"exit": os.waitstatus_to_exitcode(status)}).encode())
                except OSError:
                    pass
                if connection.fileno() in events.get_map():
                    events.unregister(connection)
                connection.close()

    while True:
        for key, _ in events.select():
            if key.fileobj is listener:
                connection = listener.accept()[0]
                connection.settimeout(10)
                try:
                    message, fds, _, _ = socket.recv_fds(connection, _REQUEST_BYTES, 2)
                    request = json.loads(message)
                except (OSError, ValueError):
                    connection.close()
                    continue
                refusal = _refusal(request, imported_with) if len(fds) == 2 else "no standard streams were passed"
                if refusal:
                    print(f"refused: {refusal}", flush=True)  # (the requester starts its trainer as a process)
                    connection.send(json.dumps({"refused": refusal}).encode())
                    connection.close()
                    for fd in fds:
                        os.close(fd)
                    continue
                started_read, started_write = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.close(started_read)
                    _become_trainer(request, fds[0], fds[1], [listener, connection, *children.values()],
                                    [wake_read, wake_write], started_write)
                os.close(started_write)
                os.read(started_read, 1)  # (until the child closes its end, or dies)
                os.close(started_read)
                for fd in fds:
                    os.close(fd)
                children[pid] = connection
                connection.send(json.dumps({"pid": pid}).encode())
                events.register(connection, selectors.EVENT_READ, pid)
            elif key.fileobj == wake_read:
                while True:
                    try:
                        if not os.read(wake_read, 512):
                            break
                    except BlockingIOError:
                        break
                reap()
            else:  # a requester's connection: readable only when the requester has closed it or died
                events.unregister(key.fileobj)
                if key.data in children:
                    try:
                        os.killpg(key.data, signal.SIGTERM)
                    except ProcessLookupError:
                        pass


if __name__ == "__main__":
    serve(sys.argv[1])
