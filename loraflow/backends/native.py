"""The native backend (model.backend: native, the default): transformers + bitsandbytes + PEFT in this Python.

Supports: XPU, CUDA and CPU on one code path; NF4 (bitsandbytes ≥ 0.48, double quantization optional) or no
quantization; every adapter method and objective; the trainer in this Python (a warm trainer can start early).
The work is loraflow.models.native's.
"""

from __future__ import annotations

from pathlib import Path

from loraflow.backends.base import Backend


def _models():
    from loraflow.models import native  # lazy: torch, transformers and bitsandbytes (seconds); config.py reads the registry

    return native


class NativeBackend(Backend):
    name = "native"
    title = "transformers + bitsandbytes + PEFT (XPU, CUDA, CPU)"
    objectives = ("sft", "dpo")
    low_bit_formats = ("nf4",)
    trains_in_this_python = True
    library_names = ("torch", "transformers", "peft", "bitsandbytes")

    def training_device(self, config, report: dict) -> str:
        return _models().resolve_device(config.train.device)

    def environment_problems(self, config, report: dict) -> list[str]:
        if config.model.quantization == "nf4" and report["versions"]["bitsandbytes"] is None:
            return ["quantization nf4 needs bitsandbytes (pip install 'bitsandbytes>=0.48'), or set model.quantization: none"]
        return []

    def quantize(self, config, env, sources, out: Path, log) -> dict:
        device, precision = env.metrics["device"], env.metrics["precision"]
        log(f"quantizing {sources.metrics['model_path']} to NF4 on {device}")
        return {"quantization": "nf4", "double_quant": config.model.double_quant, "in_store": True, **_models().quantize(
            Path(sources.metrics["model_path"]), out, device, precision, config.model.double_quant, config.model.trust_remote_code)}

    def init_adapter(self, config, env, sources, base_dir: Path, quantized: bool, tokenizer, out: Path, log) -> dict:
        native = _models()
        model = native.load_causal_lm(base_dir, env.metrics["device"], env.metrics["precision"], None, config.model.trust_remote_code)
        model = native.prepare_for_training(model, quantized, gradient_checkpointing=False)  # (init only)
        # (the model's own tokenizer: prompt tuning may start its virtual tokens from a text's embeddings)
        new_vocabulary = native.fit_vocabulary(model, tokenizer(), initialise=True)
        peft_model, report = native.inject_adapter(model, config.lora, config.train.seed, Path(sources.metrics["model_path"]),
                                                   train_embeddings=new_vocabulary)
        peft_model.save_pretrained(str(out / "adapter"))
        return report

    def load_causal_lm(self, base_dir: Path, device: str, precision: str, trust_remote_code: bool = False):
        return _models().load_causal_lm(base_dir, device, precision, trust_remote_code=trust_remote_code)

    def prepare_for_training(self, model, quantized: bool, gradient_checkpointing: bool):
        return _models().prepare_for_training(model, quantized, gradient_checkpointing)

    def with_adapter(self, model, adapter_dir: Path, tokenizer=None, trainable: bool = False):
        return _models().with_adapter(model, adapter_dir, tokenizer, trainable)


NATIVE = NativeBackend()
