"""The ipex-llm backend (model.backend: ipex-llm): a legacy opt-in, kept for existing users.

ipex-llm was archived upstream in January 2026 (last release 2.2.0) and cannot import beside transformers 5, so
everything of it runs in its own pinned Python (infra/envs/ipex-llm); loraflow.models.ipex_llm does the work there.

Supports: SFT with a plain LoRA adapter on ipex-llm's own low-bit base (NF4 on an Intel GPU, sym_int4 on a CPU, which
has no NF4 kernel), ipex-llm's QLoRA layers, the local, torchrun and mpirun launchers (oneCCL's `ccl` on an Intel GPU:
its torch 2.1 has no xccl). Not: DPO, other adapter methods or LoRA variants, new tokens, DeepSpeed, trackers,
torch.compile, packing, the evaluation stage, quantization none (see `refusals`).
"""

from __future__ import annotations

import json
from pathlib import Path

from loraflow import adapters
from loraflow.backends.base import Backend, trust_flag
from loraflow.errors import LoraflowError


def _models():
    from loraflow.models import ipex_llm  # lazy: config.py reads the registry; its module imports torch (through models.native)

    return ipex_llm


class IpexLlmBackend(Backend):
    name = "ipex-llm"
    title = "Intel's ipex-llm 2.2 low-bit base and QLoRA layers, in its own Python (legacy)"
    legacy = True
    objectives = ("sft",)
    low_bit_formats = ("nf4", "sym_int4")
    trains_in_this_python = False  # (its trainer runs in the pinned environment: no warm trainer here)
    library_names = ("torch", "transformers", "peft", "ipex-llm")
    # Packed rows rely on transformers 5 building a mask that keeps a row's examples apart.
    packing_refusal = "the ipex-llm backend's transformers 4.36 cannot keep packed examples apart"
    adapter_layers_note = " (ipex-llm QLoRA layers)"

    def refusals(self, config) -> list[str]:
        """What ipex-llm 2.2's QLoRA and the libraries of its environment can train: an SFT LoRA on its low-bit base,
        without the features that need the main environment's newer libraries."""
        lora, train = config.lora, config.train
        unsupported = [  # (the setting as it is, what to do instead)
            (config.objective not in self.objectives, f"objective {config.objective} (TRL's DPOTrainer is in the main environment)",
             "use model.backend: native"),
            (config.model.quantization != "nf4", "model.quantization none (the backend trains its own low-bit base)", "use model.quantization: nf4"),
            (self.name not in adapters.method(lora.method).backends, f"lora.method {lora.method} (ipex-llm's QLoRA layers are LoRA's)",
             "use lora.method: " + " or ".join(entry.name for entry in adapters.METHODS if self.name in entry.backends)),
            # (the LoRA variants' fields; another method has none of them and is refused above)
            (getattr(lora, "use_dora", False), "lora.use_dora", "set it to false"),
            (getattr(lora, "use_rslora", False), "lora.use_rslora", "set it to false"),
            (getattr(lora, "init", "default") != "default", f"lora.init {getattr(lora, 'init', '')}", "use lora.init: default"),
            (bool(config.data.new_tokens), "data.new_tokens", "remove them"),
            (train.launcher == "deepspeed" or bool(train.deepspeed_zero), "DeepSpeed (train.launcher, train.deepspeed_zero)",
             "use train.launcher: local, torchrun or mpirun"),
            (bool(train.report_to), "train.report_to (the trackers are not in its environment)", "set train.report_to: []"),
            (train.compile, "train.compile (torch 2.1's compiler fails on its low-bit layers)", "set train.compile: false"),
            (config.evaluation.enabled, "the evaluation stage (it loads the low-bit base in the main environment)",
             "clear evaluation.tasks_path and evaluation.general_text_path"),
        ]
        return [f"{what}: {fix}" for wrong, what, fix in unsupported if wrong]

    # ---- its Python -----------------------------------------------------------------------------------
    def trainer_python(self) -> str:
        return _models().python_executable()

    def environment_report(self) -> dict | str:
        try:
            return _models().probe(log=lambda line: None)
        except LoraflowError as error:
            return f"not available: {error}"

    # ---- the env check ----------------------------------------------------------------------------------
    def training_device(self, config, report: dict) -> str:
        """Its own environment's device and libraries are the ones training uses."""
        pinned = _models().probe(log=lambda line: None)
        report.update(backend=self.name, backend_python=pinned["python"], backend_versions=pinned["versions"])
        if config.train.device not in ("auto", pinned["device"]):
            raise LoraflowError(f"train.device is {config.train.device}, but the ipex-llm environment ({pinned['python']}) finds "
                                f"only the {pinned['device']}; set train.device: auto, or install ipex-llm's XPU build there "
                                "(infra/envs/ipex-llm/README.md)")
        return pinned["device"]

    def describe_quantization(self, config, device: str) -> str:
        return f"{_models().low_bit_format(device)} with ipex-llm (estimated as NF4, of about its size)"

    def ddp_backend(self, device: str) -> str:
        # (its torch 2.1 has no xccl: oneCCL's bindings register ccl there)
        return "ccl" if device == "xpu" else super().ddp_backend(device)

    # ---- the quantize stage (run in its own Python) --------------------------------------------------------
    def quantize_key_fields(self, config, env) -> dict:
        # Another format of the same base: its low-bit format is chosen by the device and has no double quantization;
        # it quantizes in its own environment, so those libraries decide the bytes (and the lora stage's and
        # training's keys follow from this one).
        return {"quantization": config.model.quantization, "backend": self.name, "device": env.metrics["device"],
                "versions": env.metrics.get("backend_versions")}

    def quantize(self, config, env, sources, out: Path, log) -> dict:
        device = env.metrics["device"]
        log(f"quantizing {sources.metrics['model_path']} to {_models().low_bit_format(device)} with ipex-llm on {device}")
        return {"in_store": True, **_models().run_command(
            "quantize", sources.metrics["model_path"], str(out), "--device", device, "--precision", env.metrics["precision"],
            *trust_flag(config), log=log)}

    def init_adapter(self, config, env, sources, base_dir: Path, quantized: bool, tokenizer, out: Path, log) -> dict:
        lora = {"r": config.lora.r, "lora_alpha": config.lora.alpha, "lora_dropout": config.lora.dropout,
                "target_modules": sources.metrics["lora_targets"]}
        return _models().run_command("init-adapter", str(base_dir), str(out), "--device", env.metrics["device"],
                                     "--precision", env.metrics["precision"], "--lora", json.dumps(lora),
                                     "--seed", str(config.train.seed), *trust_flag(config), log=log)

    # ---- the trainer's side (in its own Python) --------------------------------------------------------------
    def load_causal_lm(self, base_dir: Path, device: str, precision: str, trust_remote_code: bool = False):
        return _models().load_causal_lm(base_dir, device, precision, trust_remote_code)

    def prepare_for_training(self, model, quantized: bool, gradient_checkpointing: bool):
        return _models().prepare_for_training(model, quantized, gradient_checkpointing)

    def with_adapter(self, model, adapter_dir: Path, tokenizer=None, trainable: bool = False):
        return _models().with_adapter(model, adapter_dir, tokenizer, trainable)


IPEX_LLM = IpexLlmBackend()
