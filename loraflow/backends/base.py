"""What a backend is: the library that loads the base, quantizes it, makes its adapter and trains it, in which Python.

A `Backend` answers every question the stages, the env check, the config's validation, the flows and the trainer
ask about "which backend": nothing outside loraflow/backends/ compares backend names. This module and the backend
modules import nothing heavy at their top (config.py reads the registry for its choices); the work itself is done
by loraflow.models.native / loraflow.models.ipex_llm, imported when first used.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow.launch import distributed_backend
from loraflow.versions import installed_version

if TYPE_CHECKING:  # (annotations only: config imports this package)
    from loraflow.config import FinetuneConfig
    from loraflow.storage import StageRecord

Log = Callable[[str], None]


def trust_flag(config: FinetuneConfig) -> list[str]:
    return ["--trust-remote-code"] if config.model.trust_remote_code else []


class Backend:
    """One backend. Subclasses set the attributes and implement the methods; the defaults are the native backend's
    answers where a default makes sense."""

    name: str = ""
    title: str = ""  # a short description, for docs and the doctor
    legacy: bool = False  # kept for existing users only (said where a user chooses it)
    objectives: tuple[str, ...] = ("sft", "dpo")  # the training objectives its trainer runs
    low_bit_formats: tuple[str, ...] = ()  # what its quantize stage's record names as `quantization`
    trains_in_this_python: bool = True  # False: its trainer runs in another Python (no warm trainer started here)
    library_names: tuple[str, ...] = ()  # the libraries whose versions a run's summary records
    packing_refusal: str = ""  # why packed rows cannot train here ("" where they can)
    adapter_layers_note: str = ""  # said after the lora stage's description ("" for PEFT's own layers)

    # ---- what it supports -------------------------------------------------------------------------
    def refusals(self, config: FinetuneConfig) -> list[str]:
        """What of this config the backend cannot train, each as "the setting: what to do instead" ([] = all of it)."""
        if config.objective not in self.objectives:
            return [f"objective {config.objective}: use model.backend: native"]
        return []

    # ---- its Python and libraries -------------------------------------------------------------------
    def trainer_python(self) -> str | None:
        """The Python that runs `python -m loraflow.train` for this backend (None: this process's own)."""
        return None

    def library_versions(self) -> dict:
        """The versions, in the Python running this, of what trains (a run's summary records them)."""
        return {name: installed_version(name) for name in self.library_names}

    def environment_report(self) -> dict | str | None:
        """For `loraflow doctor`: its own environment where it has one (None: it is this one)."""
        return None

    # ---- the env check --------------------------------------------------------------------------------
    def training_device(self, config: FinetuneConfig, report: dict) -> str:
        """The device training uses for this config (train.device resolved where the trainer runs); what it learned
        about its environment goes into the env stage's report."""
        raise NotImplementedError

    def environment_problems(self, config: FinetuneConfig, report: dict) -> list[str]:
        """What this environment lacks for the config (each a sentence saying what to install or set)."""
        return []

    def describe_quantization(self, config: FinetuneConfig, device: str) -> str:
        """The base's quantization as `loraflow plan` says it."""
        return config.model.quantization

    def ddp_backend(self, device: str) -> str:
        """torch.distributed's backend for several ranks on this device."""
        return distributed_backend(device)

    # ---- the quantize stage -------------------------------------------------------------------------
    def quantize_key_fields(self, config: FinetuneConfig, env: StageRecord) -> dict:
        """The config and environment fields the quantized base's bytes depend on (part of the base stage's key)."""
        return config.model.model_dump(include={"quantization", "double_quant"})

    def quantize(self, config: FinetuneConfig, env: StageRecord, sources: StageRecord, out: Path, log: Log) -> dict:
        """The quantized base written into out; the base stage's metrics (`quantization` names the format)."""
        raise NotImplementedError

    # ---- the lora stage -----------------------------------------------------------------------------
    def init_adapter(self, config: FinetuneConfig, env: StageRecord, sources: StageRecord, base_dir: Path, quantized: bool,
                     tokenizer: Callable[[], Any], out: Path, log: Log) -> dict:
        """A fresh adapter (seeded) on the base, saved as a PEFT folder in out/adapter; the trainable-parameter report.
        tokenizer() loads the run's tokenizer (data.new_tokens added), for a backend that needs it."""
        raise NotImplementedError

    # ---- the trainer's side (in the trainer's Python) ------------------------------------------------
    def load_causal_lm(self, base_dir: Path, device: str, precision: str, trust_remote_code: bool = False) -> Any:
        raise NotImplementedError

    def prepare_for_training(self, model, quantized: bool, gradient_checkpointing: bool) -> Any:
        raise NotImplementedError

    def with_adapter(self, model, adapter_dir: Path, tokenizer=None, trainable: bool = False) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<backend {self.name}>"
