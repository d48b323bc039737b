"""Environment check: what this machine offers, and whether it can run the configured fine-tune."""

from __future__ import annotations

import platform

import torch

from loraflow import tracking
from loraflow.backends import BACKEND_NAMES, backend
from loraflow.config import FinetuneConfig
from loraflow.errors import LoraflowError
from loraflow.launch import LAUNCHER_BINARIES, distributed_backend, launcher_available
from loraflow.models import native
from loraflow.plan import check_fits, choose_precision, context_warning, estimate_memory, free_memory_bytes
from loraflow.versions import installed_version

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "deepspeed", "prefect")


def _device_memory(device: str) -> list[int]:
    if device == "cpu":
        return []
    module = getattr(torch, device)
    return [module.get_device_properties(i).total_memory for i in range(module.device_count())]


def describe_environment() -> dict:
    device = native.available_device()
    # what `train.precision: auto` picks on this host and why, in the words every run here prints (loraflow.plan)
    auto_precision, why = choose_precision("auto", device)
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "device_count": 1 if device == "cpu" else getattr(torch, device).device_count(),
        "device_memory_bytes": _device_memory(device),
        "precision": auto_precision,
        "precision_reason": why,
        "distributed_backend": distributed_backend(device),
        "backend": BACKEND_NAMES[0],  # (this Python's: the default backend's)
        "versions": {name: installed_version(name) for name in PACKAGES},
        "launchers": {name: launcher_available(name) for name in ("local", *LAUNCHER_BINARIES)},
    }


def memory_check(config: FinetuneConfig, device: str, precision: str) -> tuple[bool, str]:
    """(fits, what to say): the training footprint estimated from the model's config (loraflow.plan; settings on auto
    decided as the trainer will) against this device's free memory. The estimate is a lower bound: on this
    repository's CPU it missed about 170 MB of the process's own and half the activations (bench/memory.py), so a run
    it stops would not have fitted either. (True, why not) when the model's config cannot be read yet: the stages
    that read the model say what is wrong."""
    try:
        estimate = estimate_memory(config, native.resolve_model_path(config.model.base), precision)
    except Exception as error:  # an estimate never stops a run by failing
        return True, f"not estimated ({type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]})"
    fits, said = check_fits(estimate, device, free_memory_bytes(device))
    if fits and (beyond := context_warning(estimate)):
        said = f"warning: {beyond}; {said}"
    return fits, said


def check_environment(config: FinetuneConfig) -> dict:
    """The environment report, or a LoraflowError naming what the config asks for and the machine lacks."""
    report = describe_environment()
    part = backend(config.model.backend)
    device = part.training_device(config, report)  # (the ipex-llm backend's: its own environment's)
    report["device"] = device
    report["distributed_backend"] = distributed_backend(device)
    # (a bf16 the device lacks is refused here, before any stage)
    report["precision"], report["precision_reason"] = choose_precision(config.train.precision, device)
    problems = part.environment_problems(config, report)
    if not report["launchers"][config.train.launcher]:
        problems.append(f"train.launcher is {config.train.launcher}, but {LAUNCHER_BINARIES[config.train.launcher]} is not on PATH nor beside this Python")
    if config.train.launcher == "deepspeed" and report["versions"]["deepspeed"] is None:
        problems.append("train.launcher deepspeed needs the deepspeed package (pip install deepspeed)")
    if device != "cpu" and config.train.nproc_per_node > report["device_count"]:
        problems.append(f"train.nproc_per_node={config.train.nproc_per_node} but this host has {report['device_count']} {device} device(s)")
    if not config.train.pool:  # (a pool's job runs on a worker host: the trainer checks there)
        problems += tracking.problems(config.train.report_to)
        fits, said = memory_check(config, device, report["precision"])
        report["memory"] = said
        if not fits:
            problems.append(said)
    if problems:
        raise LoraflowError("environment check failed:\n  " + "\n  ".join(problems))
    return report
