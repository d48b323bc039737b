"""Process setup: what every loraflow entry point does first, and how it ends, in one place.

Entry points, and what each calls:
- `loraflow …` (loraflow/cli.py): `setup(quiet_environment=True, interrupt_on_sigterm=True)`; ends with
  `exit_now(code, run_exit_handlers=True)`.
- `python -m loraflow.train` (the trainer a launcher runs): `setup(deepspeed=True)`, then `block_deepspeed()` once its
  spec says it runs without DeepSpeed (a warm-started trainer at once); ends with `exit_now(code)`.
- a flow's process (flows/__init__.py: `prefect.engine` on a worker, `loraflow serve`, the CLI's flows): `setup()`.
- `python -m loraflow.fork_server` (forks trainers already imported): `setup()`, then each forked trainer runs the
  trainer's `main` (above) and ends with `exit_now(code)`.
- `python -m loraflow.launch` (another host's torchrun ranks) and `python -m loraflow.models.ipex_llm` (the ipex-llm
  backend's commands in its own Python): `setup()`.

Supports:
- the DeepSpeed import guard (`block_deepspeed`): transformers and accelerate import DeepSpeed whenever it is
  installed, which costs about a third of a second, runs a native build check that prints "cannot find -laio", and
  prints an accelerator warning into a run's log. Only a trainer whose spec names a DeepSpeed config imports it.
- the library warnings nobody can act on (`LIBRARY_WARNINGS`), filtered by message.
- the environment variables that quiet the Hugging Face libraries for this process and the processes it starts.
- SIGTERM ending a command as Ctrl-C does (`stop_on_sigterm`).
- the fast exit (`exit_now`): after the last line, the interpreter's teardown of torch, transformers and Prefect took
  1.4-1.7 s and guarded nothing a finished process needs.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import warnings

# (message pattern, category or None): warnings of the libraries' own deprecations, which a user cannot act on.
LIBRARY_WARNINGS: tuple[tuple[str, type[Warning] | None], ...] = (
    # peft still calls transformers' renamed is_gradient_checkpointing
    (".*is_gradient_checkpointing.*", FutureWarning),
    # TRL's DPOTrainer still calls the deprecated gradient_checkpointing_enable spelling
    (".*gradient_checkpointing_enable.*deprecated.*", FutureWarning),
    # the libraries of ipex-llm's time (its own Python) warn about transformers.deepspeed and TypedStorage when ipex-llm
    # imports and saves
    (".*transformers.deepspeed module is deprecated.*", FutureWarning),
    (".*TypedStorage is deprecated.*", None),
)

# The Hugging Face libraries' console noise, for a command's own output (a user's setting wins).
QUIET_ENVIRONMENT = {"TOKENIZERS_PARALLELISM": "true", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}


def block_deepspeed() -> None:
    """Make `import deepspeed` fail in this process (transformers and accelerate then take their paths without it).
    A process that has imported it already keeps it."""
    sys.modules.setdefault("deepspeed", None)


def quiet_library_warnings() -> None:
    for message, category in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, **({"category": category} if category else {}))


def stop_on_sigterm() -> None:
    """SIGTERM (kill, systemd, a job scheduler) raises KeyboardInterrupt, as Ctrl-C does: a command's run ends Crashed and
    Prefect's temporary server is stopped. By default it killed the process at once and left that server running."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def setup(*, deepspeed: bool = False, quiet_environment: bool = False, interrupt_on_sigterm: bool = False) -> None:
    """The setup an entry point does first (idempotent). deepspeed: this process may import DeepSpeed (a trainer, until
    its spec is read). quiet_environment: the Hugging Face libraries' quiet settings, inherited by the processes this
    one starts. interrupt_on_sigterm: SIGTERM ends it as Ctrl-C does."""
    if not deepspeed:
        block_deepspeed()
    quiet_library_warnings()
    if quiet_environment:
        for name, value in QUIET_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
    if interrupt_on_sigterm:
        stop_on_sigterm()


def exit_now(code: int, run_exit_handlers: bool = False) -> None:
    """End the process with `code` once its output is flushed, skipping the interpreter's teardown. run_exit_handlers:
    the atexit handlers run first (Prefect sends its last logs and events there). The trainer skips them: everything is
    committed to the store and every collective done by then, and a rank of a process group left to the teardown had
    gloo's threads destroyed still running (SIGABRT), or with destroy_process_group first, hung under torch 2.1."""
    sys.stdout.flush()
    sys.stderr.flush()
    if run_exit_handlers:
        atexit._run_exitfuncs()  # (CPython's own call at shutdown; os._exit skips it)
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
