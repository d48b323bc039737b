"""The training entrypoint a launcher runs: `python -m loraflow.train SPEC_URI`.

Supports: objectives sft (transformers' Trainer) and dpo (TRL's DPOTrainer, with the reference log-probs
precomputed by the reference stage, a PEFT reference, or a separate base copy); QLoRA (pre-quantized NF4
base from the store) and plain LoRA (bf16/fp32 base); a fresh LoRA init or an SFT run's adapter as the
start; XPU, CUDA, CPU; one process or several (torchrun / deepspeed / mpirun set the rank variables);
resuming from the newest committed checkpoint whose files all load as plain tensors; checkpoints,
metrics and the trained adapter synced to the store by rank 0 after every save.

Phases: setup_run → setup_model → setup_data → the objective's trainer → train (resuming) → save and commit.

It reads everything from the run spec (JSON, any fsspec URL) and never imports Prefect: it may run
on a worker host, under mpirun, in another Python environment.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch

from loraflow import adapters, process, tracking
from loraflow.backends import Backend, backend
from loraflow.data.split import training_subset
from loraflow.data.tokenize import load_tokenizer
from loraflow.errors import LoraflowError
from loraflow.evaluate import perplexity
from loraflow.launch import SPEC_FROM_STDIN
from loraflow.models import native
from loraflow.objectives import OBJECTIVES, Dpo, load_split
from loraflow.objectives import dpo as dpo_objective
from loraflow.plan import MemoryPlan, choose_precision, plan_memory, rows_used, short_run_note
from loraflow.spec import RunSpec
from loraflow.storage import ArtifactStore, open_url, sha256_hex

FINAL = "final"
# The exit code for a LoraflowError (bad input or configuration): the same every time, so not retried.
USER_ERROR_EXIT = 3
METRICS = "metrics.jsonl"


def rank_info() -> dict:
    """Global rank, local rank and world size from torch launchers or MPI (Intel MPI / Open MPI)."""
    env = os.environ
    rank = env.get("RANK") or env.get("PMI_RANK") or env.get("OMPI_COMM_WORLD_RANK") or "0"
    world = env.get("WORLD_SIZE") or env.get("PMI_SIZE") or env.get("OMPI_COMM_WORLD_SIZE") or "1"
    local = env.get("LOCAL_RANK") or env.get("MPI_LOCALRANKID") or env.get("OMPI_COMM_WORLD_LOCAL_RANK") or "0"
    return {"rank": int(rank), "local_rank": int(local), "world_size": int(world)}


def export_torch_rank_env() -> dict:
    """Make MPI-launched ranks look like torchrun's: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT.

    The global rank comes from the MPI world rank, never from the local rank (the ipex-llm example set
    RANK=LOCAL_RANK, which gives two rank-0s on two hosts). MASTER_ADDR/PORT must reach every host;
    the launcher passes them, and one host defaults to loopback.
    """
    ranks = rank_info()
    if ranks["world_size"] == 1:
        return ranks  # setting them for one process would make accelerate start a process group
    os.environ.setdefault("RANK", str(ranks["rank"]))
    os.environ.setdefault("LOCAL_RANK", str(ranks["local_rank"]))
    os.environ.setdefault("WORLD_SIZE", str(ranks["world_size"]))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    return ranks


def read_spec(uri: str) -> RunSpec:
    with open_url(uri, "r") as stream:
        return RunSpec.parse(stream.read(), uri)


def _memory_report(device: str) -> dict:
    report = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device in ("cuda", "xpu"):
        report["peak_device_mb"] = round(getattr(torch, device).max_memory_allocated() / 2**20, 1)
    return report


def _test_hook(name: str, run_uri: str) -> int | None:
    """Failure injection for tests of retry and resume; fires on a first attempt only (not after a resume).

    LORAFLOW_TEST_FAIL_AT_STEP=N  raise at step N
    LORAFLOW_TEST_KILL_AT_STEP=N  SIGKILL this process right after the checkpoint of step N is committed
    LORAFLOW_TEST_FAIL_RUN=TEXT   only in runs whose URI contains TEXT (one variant of a sweep)
    """
    value = os.environ.get(name)
    only = os.environ.get("LORAFLOW_TEST_FAIL_RUN")
    return int(value) if value and (not only or only in run_uri) else None


def _stop_if_diverged(record: dict, args) -> None:
    """A loss or gradient norm that is no longer a number: training has diverged and every later step is wasted (fp16's
    loss scaling skips a step whose gradients overflow on purpose, so an fp16 gradient norm may be inf)."""
    loss, norm = record.get("loss"), record.get("grad_norm")
    bad = ("loss", loss) if isinstance(loss, float) and not math.isfinite(loss) else \
        ("gradient norm", norm) if isinstance(norm, float) and not math.isfinite(norm) and not args.fp16 else None
    if bad:
        raise LoraflowError(f"training diverged at step {record['step']}: the {bad[0]} is {bad[1]}; lower train.learning_rate "
                            f"(now {args.learning_rate:g}) or train.max_grad_norm")


def _callbacks(store: ArtifactStore, run_uri: str, metrics_path: Path, device: str, is_main: bool, resumed: bool):
    from transformers import TrainerCallback

    class MetricsToStore(TrainerCallback):
        """Appends each log to metrics.jsonl, prints it for the Prefect log, syncs checkpoints to the store."""

        def __init__(self):
            self.last_time = time.time()
            self.last_tokens = 0
            self.evaluating_s = 0.0  # evaluation since the last training log: not training time

        def on_train_begin(self, args, state, control, **kwargs):
            # (a resumed run starts counting from its checkpoint's tokens, not from 0: its first tokens/s was ~30x)
            self.last_time, self.last_tokens = time.time(), state.num_input_tokens_seen or 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not is_main or not logs:
                return
            now = time.time()
            tokens = state.num_input_tokens_seen or int(logs.get("num_tokens", 0))  # TRL counts its own (DPO)
            record = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), **logs}
            _stop_if_diverged(record, args)
            self.evaluating_s += logs.get("eval_runtime", 0.0)
            training_s = now - self.last_time - self.evaluating_s
            if "loss" in logs and training_s > 0:
                record["tokens_per_s"] = round((tokens - self.last_tokens) / training_s, 1)
                self.last_time, self.last_tokens, self.evaluating_s = now, tokens, 0.0
            record.update(_memory_report(device))
            with metrics_path.open("a") as stream:
                stream.write(json.dumps(record) + "\n")
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
            print(f"[{state.global_step}/{state.max_steps}] {shown}", flush=True)

        def on_step_end(self, args, state, control, **kwargs):
            if not resumed and state.global_step == _test_hook("LORAFLOW_TEST_FAIL_AT_STEP", run_uri):
                raise RuntimeError(f"injected failure at step {state.global_step} (LORAFLOW_TEST_FAIL_AT_STEP)")

        def on_save(self, args, state, control, **kwargs):
            if not is_main:
                return
            name = f"checkpoint-{state.global_step}"
            checkpoint = Path(args.output_dir) / name
            # The checkpoint carries the metrics up to its own step, so a resume from it restores
            # exactly those (the run's live metrics may already hold steps past it).
            shutil.copyfile(metrics_path, checkpoint / METRICS)
            (checkpoint / "training_args.bin").unlink(missing_ok=True)  # a pickle nothing reads back; the spec says the same
            if rng_state_allowlist() is None:
                # A resume could not read numpy's RNG state back from the store without unpickling it: not committed,
                # and a resumed run's random state starts again from the seed (its data order does not depend on it).
                for rng_state in checkpoint.glob("rng_state*.pth"):
                    rng_state.unlink()
            store.commit(checkpoint, f"{run_uri}/checkpoints/{name}", {"step": state.global_step}, replace=True)
            store.commit(metrics_path.parent, f"{run_uri}/metrics", replace=True)
            print(f"checkpoint {name} committed to {run_uri}/checkpoints/{name}", flush=True)
            if not resumed and state.global_step == _test_hook("LORAFLOW_TEST_KILL_AT_STEP", run_uri):
                os.kill(os.getpid(), signal.SIGKILL)

    return [MetricsToStore()]


def _BaselineToBeat(patience: int):
    """Early stopping measures every step against the starting model's eval loss (step 0), not only against the
    steps after it: a run none of whose steps beats its start stops after `patience` evaluations, and exports the
    adapter it started from (_train_and_summarize). Says when it stops."""
    from transformers import TrainerCallback

    class BaselineToBeat(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if state.global_step == 0 and state.best_metric is None and metrics and "eval_loss" in metrics:
                state.best_metric = metrics["eval_loss"]

        def on_train_end(self, args, state, control, **kwargs):
            if state.global_step < state.max_steps:
                print(f"early stopping at step {state.global_step}: no eval loss below {state.best_metric:.4g} for {patience} "
                      "evaluations in a row", flush=True)

    return BaselineToBeat()


PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl")


def refused_pickles(folder: Path) -> list[str]:
    """Files in a checkpoint from the store that are not plain tensor data: "name: reason" for each.

    A checkpoint's optimizer, scheduler and RNG state are pickles. The store is shared and untrusted,
    so each is first opened with torch's restricted unpickler (weights_only: tensors, containers and
    numbers; plus the numpy RNG types transformers allows for rng_state.pth), which refuses any other
    class or call. A file that opens that way cannot run code when a library loads it again, whatever
    that library's own torch.load settings (DeepSpeed's, for instance).
    """
    import contextlib

    allowlist = rng_state_allowlist()
    refused = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in PICKLE_SUFFIXES):
        try:
            with (allowlist() if allowlist else contextlib.nullcontext()):
                torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:  # UnpicklingError, or anything a corrupt file raises
            refused.append(f"{file.relative_to(folder)}: {str(error).splitlines()[0][:200]}")
    return refused


def rng_state_allowlist():
    """transformers' context that lets the restricted unpickler read numpy's RNG state types; None where transformers
    lacks it (4.36, with torch 2.1, in the ipex-llm backend's environment): there rng_state.pth is refused (see on_save)."""
    try:
        from transformers.trainer_pt_utils import safe_globals
    except ImportError:
        return None
    return safe_globals


def resumable_checkpoint(store: ArtifactStore, run_uri: str, work: Path) -> tuple[str | None, Path | None]:
    """The newest committed checkpoint whose files are all safe to load (see refused_pickles), copied locally."""
    committed = [uri for uri in store.list_committed(f"{run_uri}/checkpoints") if uri.rsplit("/", 1)[-1].startswith("checkpoint-")]
    for uri in sorted(committed, key=lambda uri: int(uri.rsplit("-", 1)[-1]), reverse=True):
        local = store.local_copy(uri, work / "resume" / uri.rsplit("/", 1)[-1])
        refused = refused_pickles(local)
        if not refused:
            return uri, local
        print(f"not resuming from {uri}: it holds files that are not plain tensor data, which are never loaded "
              f"from the store ({'; '.join(refused)}); trying an older checkpoint", flush=True)
    return None, None


@dataclass
class RunContext:
    """What every phase shares: where this process is in the run, and where it writes."""

    spec: RunSpec
    ranks: dict
    store: ArtifactStore
    device: str
    precision: str
    work: Path
    metrics_path: Path
    trust_remote_code: bool = False  # from the command line, never from the spec
    imports_rss_mb: float = 0.0  # peak RSS before any model or data: the libraries alone
    precision_reason: str = ""
    plan: MemoryPlan | None = None  # micro batch and checkpointing, decided once the model is loaded (setup_model)

    @property
    def is_main(self) -> bool:
        return self.ranks["rank"] == 0

    def base_dir(self) -> Path:
        """The base weights: the pre-quantized NF4 copy from the store (verified: the store is shared, a file may be
        truncated or altered), or the full-precision base where it is."""
        return self.store.local_copy(self.spec.base_uri, verify=True) if self.spec.base_in_store else Path(self.spec.base_uri)

    def starting_adapter_dir(self) -> Path:
        return starting_adapter_dir(self)


def setup_run(spec: RunSpec, trust_remote_code: bool = False) -> RunContext:
    """Ranks, device, precision, seed, and this run's scratch folder on this host."""
    from transformers import set_seed

    ranks = export_torch_rank_env()
    if spec.ddp_backend == "ccl":
        import oneccl_bindings_for_pytorch  # noqa: F401  (registers the ccl backend with torch.distributed)
    device = native.resolve_device(spec.train.device)
    set_seed(spec.train.seed)
    # One folder per run and host, shared by the ranks on it: the Trainer writes each rank's RNG state
    # into the checkpoint folder, and rank 0 commits that folder.
    # LORAFLOW_SCRATCH (the work pool's scratch_dir) moves it off a small /tmp.
    work = Path(os.environ.get("LORAFLOW_SCRATCH") or tempfile.gettempdir()) / f"loraflow-train-{sha256_hex(spec.run_uri)[:16]}"
    metrics_path = work / "metrics" / METRICS
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    if ranks["rank"] == 0:
        metrics_path.write_text("")  # a previous attempt's lines; a resume restores the checkpoint's own
    # The env stage resolved train.precision on this host (a pool job runs its own) and said why; a spec written by
    # hand with auto is resolved here.
    precision, reason = choose_precision(spec.train.precision, device)
    return RunContext(spec, ranks, ArtifactStore(spec.store), device, precision, work, metrics_path,
                      trust_remote_code, _memory_report("cpu")["peak_rss_mb"], spec.precision_reason or reason)


def setup_model(run: RunContext, tokens_per_example: int, tokenizer):
    """The base with the starting adapter, trainable; micro batch and gradient checkpointing as the memory plan
    decides (loraflow.plan) once the weights are loaded."""
    spec = run.spec
    backend = model_backend(spec)
    model = backend.load_causal_lm(run.base_dir(), run.device, run.precision, trust_remote_code=run.trust_remote_code)
    run.plan = plan_memory(run.base_dir(), run.device, run.precision, spec.train.batch_size // run.ranks["world_size"] or 1,
                           tokens_per_example, spec.train.micro_batch_size, spec.train.gradient_checkpointing)
    model = backend.prepare_for_training(model, spec.quantized, run.plan.gradient_checkpointing)
    # No KV cache in training: it is never read, and with one transformers builds no block-diagonal mask for packed rows.
    model.config.use_cache = False
    adapter_dir = starting_adapter_dir(run)
    # (DPO: TRL adds a frozen copy of this starting adapter, named "ref", as the reference: the base plus a fresh
    # adapter is the base itself; plus an SFT run's adapter, the model DPO starts from.)
    if adapters.method(spec.adapter_method).loads_trainable:
        return backend.with_adapter(model, adapter_dir, tokenizer, trainable=True)
    # PEFT loads a saved prompt or prefix adapter for inference only ("cannot set a prompt learning adapter to
    # trainable"): the same adapter, built trainable and given the saved weights.
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = PeftConfig.from_pretrained(str(adapter_dir))
    config.inference_mode = False
    if getattr(config, "prompt_tuning_init", None) is not None:
        config.prompt_tuning_init = "RANDOM"  # (not from the init text's tokenizer, which may be on another host: the saved weights follow)
    trainable = get_peft_model(model, config)
    set_peft_model_state_dict(trainable, load_file(str(adapter_dir / "adapter_model.safetensors")))
    return trainable


def model_backend(spec: RunSpec) -> Backend:
    """The backend that loads the base and its adapter (loraflow.backends)."""
    return backend(spec.backend)


def starting_adapter_dir(run: RunContext) -> Path:
    """The adapter training starts from: a LoRA init stage's `adapter/`, or an SFT run's exported adapter folder."""
    folder = run.store.local_copy(run.spec.lora_uri, verify=True)
    return folder / "adapter" if (folder / "adapter").is_dir() else folder


def setup_data(run: RunContext, only_rows_used: bool = False):
    """(tokenizer, train split, validation split or None) from the data stage's output (and the reference log-probs).
    only_rows_used: the training split cut to the rows a run ended by max_steps reaches (loraflow.data.split), so a
    precomputed reference covers exactly those."""
    spec = run.spec
    dataset_dir = run.store.local_copy(spec.dataset_uri, verify=True)
    ref_logps = run.store.local_copy(spec.reference_uri, verify=True) if spec.reference_uri else None
    tokenizer = load_tokenizer(str(dataset_dir / "tokenizer"))
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # "Generating train split" and TRL's map bars: carriage-return noise in a run's log
    only = None
    if only_rows_used:
        train_rows = pq.ParquetFile(dataset_dir / "train.parquet").metadata.num_rows
        only = training_subset(train_rows, rows_used(train_rows, spec.train), spec.train.seed)
    return tokenizer, load_split(dataset_dir, "train", ref_logps, only), load_split(dataset_dir, "val", ref_logps)


def training_arguments(run: RunContext, has_eval: bool, eval_before: bool = False) -> dict:
    """The TrainingArguments every objective shares (an objective's own class adds its fields). eval_before: evaluate
    the starting model first (step 0), the baseline the trained adapter is compared with."""
    cfg, ranks = run.spec.train, run.ranks
    return dict(
        output_dir=str(run.work / "checkpoints"),
        per_device_train_batch_size=run.plan.micro_batch_size,
        per_device_eval_batch_size=run.plan.micro_batch_size,
        gradient_accumulation_steps=max(1, cfg.batch_size // (run.plan.micro_batch_size * ranks["world_size"])),
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup,
        max_grad_norm=cfg.max_grad_norm,
        weight_decay=cfg.weight_decay,
        optim=cfg.optim,
        bf16=run.precision == "bf16",
        fp16=run.precision == "fp16",
        use_cpu=run.device == "cpu",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a diverged loss shows as what it is (_stop_if_diverged), not as an average
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps,
        eval_on_start=has_eval and eval_before,
        # Early stopping: the best evaluated step's weights are loaded back at the end, and exported.
        load_best_model_at_end=has_eval and cfg.early_stopping_patience > 0,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        restore_callback_states_from_checkpoint=True,  # a resumed run keeps its early-stopping count
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        train_sampling_strategy=cfg.sampling,
        torch_compile=cfg.compile,
        report_to="none",  # the trackers in train.report_to are added as callbacks (loraflow.tracking)
        run_name=run.spec.run_uri.rstrip("/").rsplit("/", 1)[-1],
        disable_tqdm=True,
        ddp_backend=run.spec.ddp_backend,
        deepspeed=run.spec.deepspeed_config,
        ddp_find_unused_parameters=False if ranks["world_size"] > 1 else None,
    )


def train(spec: RunSpec, trust_remote_code: bool = False) -> dict:
    """Train as the spec says: setup run → model → data → trainer (the objective's) → train, resuming → save and commit.

    trust_remote_code comes from the command line (the flow's parameters), never from the spec: the spec is a
    file in the shared store.
    """
    from transformers import PrinterCallback

    if problems := tracking.problems(spec.train.report_to):
        raise LoraflowError("; ".join(problems))
    run = setup_run(spec, trust_remote_code)
    objective = OBJECTIVES[spec.objective](spec)
    tokenizer, train_set, val_set = setup_data(run, objective.trains_on_rows_used)
    model = setup_model(run, objective.tokens_per_example(train_set), tokenizer)

    resume_uri, resume_dir = resumable_checkpoint(run.store, spec.run_uri, run.work)
    if resume_uri:
        print(f"resuming from {resume_uri}", flush=True)
        if (resume_dir / METRICS).exists():
            shutil.copyfile(resume_dir / METRICS, run.metrics_path)
    resumed_step = json.loads((resume_dir / "trainer_state.json").read_text())["global_step"] if resume_dir else None
    keep_tracker_files(run, resumed_step is not None)
    # The baseline is measured once per run: a resumed attempt has it in the metrics its checkpoint carried. (Every
    # rank decides from that checkpoint, the same for all: the evaluation is collective.)
    measured = resume_dir is not None and eval_loss_before(resume_dir / METRICS) is not None
    args = objective.arguments(training_arguments(run, val_set is not None, eval_before=not measured))
    # (the trackers first: they flush before MetricsToStore commits the metrics folder at a checkpoint)
    callbacks = tracking.callbacks(spec.train.report_to, run.metrics_path.parent, args.run_name, resumed_step) if run.is_main else []
    callbacks += _callbacks(run.store, spec.run_uri, run.metrics_path, run.device, run.is_main, resumed=resume_uri is not None)
    if args.load_best_model_at_end:
        from transformers import EarlyStoppingCallback

        # (in this order: transformers' counter first sees no best, then the baseline becomes the one to beat)
        patience = spec.train.early_stopping_patience
        callbacks += [EarlyStoppingCallback(early_stopping_patience=patience), _BaselineToBeat(patience)]
        restore_best_checkpoint(run, resume_dir)
    trainer = objective.trainer(run, model, args, train_set, val_set, tokenizer, callbacks)
    trainer.remove_callback(PrinterCallback)  # our callback prints each log once, with step and memory

    print(
        f"training ({objective.name}) on {run.device} ({run.precision}), rank {run.ranks['rank']}/{run.ranks['world_size']}, "
        f"{len(train_set)} train rows, micro batch {args.per_device_train_batch_size} x accumulation {args.gradient_accumulation_steps}"
        + (", packed" if objective.packed else ", padded")
        + (f" ({objective.padded_because}: no packing)" if objective.padded_because else ""),
        flush=True,
    )
    print(f"precision {run.precision}: {run.precision_reason}", flush=True)
    print(f"memory plan: {run.plan.reason}", flush=True)
    summary = _train_and_summarize(run, objective, trainer, resume_uri, resume_dir, val_set is not None)
    _save_and_commit(run, trainer, summary)
    if run.ranks["world_size"] == 1:
        # Everything is in the store now (a retry resumes from there). With several ranks on a host the folder
        # is shared and another rank may still be leaving it, so it stays for the next run of this spec.
        shutil.rmtree(run.work, ignore_errors=True)
    return summary


def keep_tracker_files(run: RunContext, resumed: bool) -> None:
    """The trackers' files in the metrics folder (TensorBoard events, the MLflow run's id): a resumed attempt goes on
    with the earlier attempts' (from the store when this host's scratch folder lacks them: the folder's next commit
    replaces the store's); a run starting from step 0 drops any a failed attempt left here."""
    if not run.is_main:
        return
    metrics_uri = f"{run.spec.run_uri}/metrics"
    committed = run.store.local_copy(metrics_uri, run.work / "resume" / "metrics") if resumed and run.store.is_committed(metrics_uri) else None
    for name in (tracking.TENSORBOARD_FOLDER, tracking.MLFLOW_RUN):
        local = run.metrics_path.parent / name
        if not resumed:
            shutil.rmtree(local) if local.is_dir() else local.unlink(missing_ok=True)
        elif committed and (committed / name).exists() and not local.exists():
            shutil.copytree(committed / name, local) if (committed / name).is_dir() else shutil.copyfile(committed / name, local)


def restore_best_checkpoint(run: RunContext, resume_dir: Path | None) -> None:
    """A resumed run's best checkpoint so far, where the Trainer looks for it at the end (its local folder from the
    first attempt, which another host or a cleaned scratch folder lacks): copied back from the store."""
    if resume_dir is None or not run.is_main:
        return
    best = json.loads((resume_dir / "trainer_state.json").read_text()).get("best_model_checkpoint")
    if best and not Path(best).is_dir():
        copy = run.store.local_copy(f"{run.spec.run_uri}/checkpoints/{Path(best).name}", run.work / "resume", verify=True)
        if refused := refused_pickles(copy):  # the store is untrusted: the same check a resumed checkpoint passes
            raise LoraflowError(f"the best checkpoint so far, {run.spec.run_uri}/checkpoints/{Path(best).name}, holds files "
                                f"that are not plain tensor data ({'; '.join(refused)}); nothing of it was loaded. Remove "
                                "the run folder to train again from the start")
        shutil.copytree(copy, best)


def eval_loss_before(metrics_path: Path) -> float | None:
    """The starting model's eval loss: the evaluation logged at step 0 (eval_on_start), if there is one."""
    if not metrics_path.is_file():
        return None
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line)
        if row.get("step") == 0 and "eval_loss" in row:
            return row["eval_loss"]
    return None


def _train_and_summarize(run: RunContext, objective, trainer, resume_uri, resume_dir, has_eval: bool) -> dict:
    resumed = json.loads((resume_dir / "trainer_state.json").read_text()) if resume_dir else {}
    started = time.time()
    result = trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    elapsed = time.time() - started
    tokens_seen = objective.tokens_seen(trainer)
    tokens_now = tokens_seen - resumed.get("num_input_tokens_seen", 0)  # this attempt's, not the resumed part's
    # The Trainer evaluates inside train() (every eval_steps and at the last step): that time is not training.
    evaluations = [row for row in trainer.state.log_history
                   if "eval_runtime" in row and (not resume_dir or row["step"] > resumed.get("global_step", 0))]
    evaluating_s = sum(row["eval_runtime"] for row in evaluations)
    training_s = elapsed - evaluating_s
    summary = {
        "objective": objective.name,
        "train_loss": result.training_loss,
        "global_step": result.global_step,
        "train_runtime_s": round(elapsed, 2),
        "eval_runtime_s": round(evaluating_s, 2),  # (part of train_runtime_s)
        "tokens_seen": tokens_seen,
        "tokens_per_s": round(tokens_now / training_s, 1) if training_s > 0 else None,
        "device": run.device,
        "precision": run.precision,
        "precision_reason": run.precision_reason,
        "micro_batch_size": run.plan.micro_batch_size,
        "gradient_checkpointing": run.plan.gradient_checkpointing,
        "memory_plan": run.plan.reason,
        "packed": objective.packed,
        **({"padded_because": objective.padded_because} if objective.padded_because else {}),
        "world_size": run.ranks["world_size"],
        "resumed_from": resume_uri,
        # Which environment trained it (the ipex-llm backend's is another Python, with older libraries).
        "backend": run.spec.backend,
        "python": sys.executable,
        "libraries": backend(run.spec.backend).library_versions(),
        **_memory_report(run.device),
        "imports_rss_mb": run.imports_rss_mb,  # peak_rss_mb minus this: the memory the run itself needed
    }
    # A number, or None and a note saying why there is none: never a bare nan in a summary.
    # (data.val_set_size 0, or a file too small to hold rows out: the data stage's stats say which)
    summary["eval_loss"], summary["eval_note"] = None, "no validation split (data.val_set_size is 0, or too few rows to hold any out)"
    summary["eval_loss_before"] = eval_loss_before(run.metrics_path) if has_eval else None
    early_stopping = trainer.args.load_best_model_at_end
    if early_stopping:  # the adapter is the best evaluated step's, or the starting one if no step beat it
        best = trainer.state.best_model_checkpoint
        summary["kept_step"] = int(best.rsplit("-", 1)[-1]) if best else 0
        summary["stopped_early"] = result.global_step < trainer.state.max_steps
        if not best:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(trainer.model, load_file(str(starting_adapter_dir(run) / "adapter_model.safetensors")))
            print("no evaluated step beat the starting model's eval loss: the adapter exported is the one training started from",
                  flush=True)
    if has_eval:
        # The Trainer's own evaluation at the last step when there was one (transformers evaluates there), not a second;
        # with early stopping, the kept step's.
        last = evaluations[-1] if evaluations and evaluations[-1]["step"] == result.global_step else None
        eval_loss = trainer.state.best_metric if early_stopping else last["eval_loss"] if last else trainer.evaluate()["eval_loss"]
        if math.isfinite(eval_loss):
            summary["eval_loss"], summary["eval_note"] = eval_loss, None
        else:
            summary["eval_note"] = (f"the evaluation gave {eval_loss} (the model's outputs overflowed on the validation "
                                    f"rows); lower train.learning_rate, or use precision fp32")
    if too_short := short_run_note(result.global_step, None, run.spec.train):
        summary["short_run_note"] = too_short
    logged = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    losses = [row["loss"] for row in logged if "loss" in row]
    summary["first_loss"], summary["final_loss"] = (losses[0], losses[-1]) if losses else (None, None)
    if objective.reports_perplexity:
        summary["perplexity_before"], summary["perplexity"] = perplexity(summary["eval_loss_before"]), perplexity(summary["eval_loss"])
    summary.update(objective.summary(logged))
    if not math.isfinite(summary["train_loss"]):
        raise LoraflowError(f"training diverged: train loss is {summary['train_loss']}; lower train.learning_rate")
    return summary


def _save_and_commit(run: RunContext, trainer, summary: dict) -> None:
    final = run.work / FINAL
    # Every rank calls save_model: under ZeRO-3 it gathers the sharded LoRA weights (a collective);
    # only rank 0 writes files.
    trainer.save_model(str(final))
    if run.is_main:
        (final / "training_args.bin").unlink(missing_ok=True)  # a pickle; the spec and summary say the same
        (final / "train_summary.json").write_text(json.dumps(summary, indent=2))
        run.store.commit(run.metrics_path.parent, f"{run.spec.run_uri}/metrics", replace=True)
        run.store.commit(final, f"{run.spec.run_uri}/checkpoints/{FINAL}", {"global_step": summary["global_step"]}, replace=True)
        print(f"trained adapter committed to {run.spec.run_uri}/checkpoints/{FINAL}", flush=True)


def compute_reference_logps(spec: RunSpec, out: Path, trust_remote_code: bool = False, log=print) -> dict:
    """The reference stage's build: TRL's own reference pass (the same concatenation and masks its loss uses) over
    the pairs training reaches and every validation pair, kept as train.parquet / val.parquet columns
    ref_chosen_logps, ref_rejected_logps in out; progress in `log`."""
    process.block_deepspeed()  # (this pass never uses DeepSpeed)
    run = setup_run(spec, trust_remote_code)
    objective = Dpo(spec)
    tokenizer, train_set, val_set = setup_data(run, objective.trains_on_rows_used)
    all_pairs = pq.ParquetFile(run.store.local_copy(spec.dataset_uri) / "train.parquet").metadata.num_rows
    if len(train_set) < all_pairs:
        log(f"reference log-probs for the {len(train_set)} of {all_pairs} training pairs that {spec.train.max_steps} steps "
            f"× batch {spec.train.batch_size} reach" + (f", and the {len(val_set)} validation pairs" if val_set is not None else ""))
    dpo_objective.REFERENCE_PROGRESS_LOG = log
    model = setup_model(run, objective.tokens_per_example(train_set), tokenizer)
    args = objective.arguments(training_arguments(run, val_set is not None), precompute=True)
    trainer = objective.trainer(run, model, args, train_set, val_set, tokenizer, [])  # TRL computes them on init
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", trainer.train_dataset), ("val", trainer.eval_dataset)):
        if rows is not None:
            rows.select_columns(["ref_chosen_logps", "ref_rejected_logps"]).to_parquet(str(out / f"{split}.parquet"))
    shutil.rmtree(run.work, ignore_errors=True)
    return {"pairs": len(train_set) + (len(val_set) if val_set is not None else 0), "reference_forwards": dpo_objective.REFERENCE_FORWARDS}


def import_training_libraries() -> None:
    """What a trainer imports before it reads its spec, when it starts early (a warm start, loraflow.fork_server)."""
    import datasets  # noqa: F401
    import peft  # noqa: F401  (and bitsandbytes)
    import transformers.trainer  # noqa: F401


def _warm_start() -> str:
    """Started before its spec exists (loraflow.launch.start_warm_trainer): import what training uses while the stages
    before it run, then wait for the spec URI on stdin ("" when the flow ends without one)."""
    started = time.time()
    process.block_deepspeed()  # the flow starts a warm trainer only for runs without DeepSpeed
    import_training_libraries()
    imported = time.time()
    spec_uri = sys.stdin.readline().strip()
    if spec_uri:
        print(f"warm start: the trainer's imports took {imported - started:.1f} s and were done "
              f"{time.time() - imported:.1f} s before its run spec arrived", flush=True)
    return spec_uri


def main(argv: list[str] | None = None) -> int:
    import argparse

    process.setup(deepspeed=True)  # (DeepSpeed is blocked below once the spec says it is not used)
    parser = argparse.ArgumentParser(prog="python -m loraflow.train")
    parser.add_argument("spec_uri", help="the run spec (JSON, any fsspec URL); - : import first, then read it from stdin")
    # The deepspeed launcher appends --local_rank=N; the same value is in LOCAL_RANK.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the base model's own code to run")
    parser.add_argument("--store", help="with -: the artifact store the spec will be in (shown by ps; checked)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    warm = args.spec_uri == SPEC_FROM_STDIN
    if warm:
        args.spec_uri = _warm_start()
        if not args.spec_uri:
            return 0  # the flow ended (or trained elsewhere) without a spec for this process
    try:
        spec = read_spec(args.spec_uri)
        if warm and spec.deepspeed_config is not None:
            raise LoraflowError("a warm-started trainer was given a DeepSpeed run; start it with the spec's URI instead")
        if warm and args.store and spec.store != args.store:
            raise LoraflowError(f"a trainer started for the store {args.store} was given a spec of {spec.store}")
        if spec.deepspeed_config is None:
            process.block_deepspeed()  # (a run without it never uses it: loraflow.process says what its import costs)
        train(spec, trust_remote_code=args.trust_remote_code)
    except LoraflowError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
    return 0


if __name__ == "__main__":
    # Everything is committed to the store and closed by now, and every collective is done (saving the adapter was the
    # last): the interpreter's teardown (freeing the model and every library's state: 1.4 s on the CPU) is skipped, and
    # so are the exit handlers (loraflow.process.exit_now says what a rank's teardown did).
    process.exit_now(main())
