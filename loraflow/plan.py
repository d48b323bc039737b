"""The training plan: settings left on `auto` decided from the device and the memory a micro batch needs.

- precision auto: bf16 where the device computes it fast (XPU, CUDA with bf16, a CPU with AVX512-BF16 or AMX),
  else fp32 (bf16 on other CPUs is emulated: slower than fp32); LORAFLOW_CPU_BF16=0/1 overrides the CPU's detection.
- micro batch size auto (0) and gradient checkpointing auto: the largest micro batch whose activations fit
  comfortably in the memory free after the model is loaded, without checkpointing; checkpointing only when not
  even one example fits. Checkpointing recomputes every layer's forward pass in the backward pass (about a third
  more compute); the QLoRA recipe turns it on because its models fill a GPU, which a small model or a large host
  does not. Larger micro batches mean fewer, larger matrix products per step: faster, most of all on a CPU.

Each decision comes with its reason, printed at the start of training and kept in the run summary.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from loraflow.errors import LoraflowError
from loraflow.models import native

# On a CPU, micro batches beyond this many tokens ran no faster (bench/train.py: 8 rows of 256 tokens ran as fast as
# 16) and only took more memory; an accelerator's micro batch is bounded by its memory alone.
CPU_MICRO_BATCH_TOKENS = 2048
# Checkpointing turns on when the estimated activations exceed this share of the free memory: the rest is for the
# optimizer state, the allocator's fragmentation and what the estimate misses.
ACTIVATIONS_SHARE = 0.5


# LORAFLOW_CPU_BF16=0 decides as on a CPU without AVX512-BF16/AMX (fp32 on auto), 1 as on one with them (bf16),
# auto (the default) detects: so one host can exercise what another meets (the suite runs under both). Read from the
# environment, which the trainer's process inherits from the flow's (loraflow.launch), so both decide alike.
CPU_BF16_SETTING = "LORAFLOW_CPU_BF16"


def cpu_has_fast_bf16() -> bool:
    # torch.cpu's capability checks are private but stable since torch 2.1; /proc/cpuinfo is Linux only.
    for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        probe = getattr(torch.cpu, check, None)
        if probe is not None and probe():
            return True
    return False


@dataclass(frozen=True)
class Bf16Support:
    """What `device` does with bf16: `usable` (a bf16 request runs: CPU autocast emulates it anywhere), `fast` (what
    precision auto picks it for) and why, in the words every command prints."""

    usable: bool
    fast: bool
    reason: str


def bf16_support(device: str) -> Bf16Support:
    """The one bf16 decision: doctor, plan, the env check, the trainer and generate all ask it."""
    if device == "cuda":
        usable = torch.cuda.is_bf16_supported()
        return Bf16Support(usable, usable, f"this cuda {'supports' if usable else 'has no'} bf16")
    if device == "xpu":
        usable = getattr(torch.xpu, "is_bf16_supported", lambda: True)()
        return Bf16Support(usable, usable, f"this xpu {'supports' if usable else 'has no'} bf16")
    setting = os.environ.get(CPU_BF16_SETTING, "auto").strip().lower() or "auto"
    if setting not in ("0", "1", "auto"):
        raise LoraflowError(f"{CPU_BF16_SETTING}={os.environ[CPU_BF16_SETTING]!r}: use 0 (decide as on a CPU without "
                            "AVX512-BF16/AMX: fp32), 1 (as on one with them: bf16) or auto (detect; the default)")
    fast = cpu_has_fast_bf16() if setting == "auto" else setting == "1"
    reason = ("this CPU has AVX512-BF16/AMX instructions" if fast else
              "this CPU has no AVX512-BF16/AMX instructions (bf16 would be emulated, slower than fp32)")
    if setting != "auto":
        reason = f"{CPU_BF16_SETTING}={setting}: decided as if {reason}"
    return Bf16Support(True, fast, reason)


def choose_precision(requested: str, device: str) -> tuple[str, str]:
    """(precision, why) for train.precision `requested` on `device`; a bf16 the device lacks is refused here."""
    support = bf16_support(device)
    if requested == "bf16" and not support.usable:
        raise LoraflowError(f"precision bf16 requested, but this {device} does not support bf16; use precision: fp16 or auto")
    if requested != "auto":
        return requested, "set in the config"
    return ("bf16" if support.fast else "fp32"), support.reason


@dataclass
class MemoryPlan:
    micro_batch_size: int
    gradient_checkpointing: bool
    reason: str
    activations_mb: float
    free_mb: float


def free_memory_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    if device == "xpu" and hasattr(torch.xpu, "mem_get_info"):
        return torch.xpu.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def activation_bytes(model_config: dict, tokens: int, element_bytes: int, checkpointing: bool) -> int:
    """What backpropagation keeps of a forward pass over `tokens` tokens: per layer about 18 hidden-size and 3
    intermediate-size values per token (Korthikanti et al. 2022, with a fused attention that keeps no score matrix),
    or with checkpointing each layer's input plus one layer recomputed; and the logits and their gradient in fp32."""
    hidden = model_config.get("hidden_size") or model_config.get("n_embd") or 0
    intermediate = model_config.get("intermediate_size") or model_config.get("n_inner") or 4 * hidden
    layers = model_config.get("num_hidden_layers") or model_config.get("n_layer") or 0
    vocab = model_config.get("vocab_size") or 0
    one_layer = tokens * (18 * hidden + 3 * intermediate) * element_bytes
    kept = layers * tokens * hidden * element_bytes + one_layer if checkpointing else layers * one_layer
    return kept + tokens * vocab * 4 * 2


def plan_memory(model_dir: Path, device: str, precision: str, per_device_batch: int, tokens_per_example: int,
                micro_batch_size: int = 0, gradient_checkpointing: str = "auto", free: float | None = None) -> MemoryPlan:
    """Micro batch size (0: auto) and gradient checkpointing (auto|on|off) for this device, with the reason.

    Auto prefers no checkpointing with the largest micro batch (a divisor of the per-device batch) whose activations
    fit in ACTIVATIONS_SHARE of the free memory: fewer, larger steps run faster, most of all on a CPU. Checkpointing
    turns on only when not even a micro batch of one example fits without it. Call with the model loaded (its
    weights are then no longer free memory), or before with `free`: what would be free once they are."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config", config)  # (multimodal configs nest the language model's)
    element_bytes = 4 if precision == "fp32" else 2
    free = free_memory_bytes(device) if free is None else max(free, 0)
    budget = ACTIVATIONS_SHARE * free
    sizes = [micro_batch_size] if micro_batch_size else [n for n in range(per_device_batch, 0, -1) if per_device_batch % n == 0]
    if not micro_batch_size and device == "cpu":
        sizes = [n for n in sizes if n * tokens_per_example <= CPU_MICRO_BATCH_TOKENS] or sizes[-1:]
    modes = {"auto": (False, True), "off": (False,), "on": (True,)}[gradient_checkpointing]
    mb = 1024 * 1024

    def needed(size: int, checkpointing: bool) -> int:
        return activation_bytes(config, size * tokens_per_example, element_bytes, checkpointing)

    chosen = next(((size, checkpointing) for checkpointing in modes for size in sizes if needed(size, checkpointing) <= budget), None)
    if chosen is None:  # nothing fits the estimate: the smallest step the settings allow, and say so
        chosen = (sizes[-1], modes[-1])
    size, checkpointing = chosen
    need = needed(size, checkpointing)
    fits = need <= budget
    cap = f", at most {CPU_MICRO_BATCH_TOKENS} tokens on a CPU" if device == "cpu" else ""
    parts = [f"micro batch {size} x accumulation {per_device_batch // size} " + (
        f"(auto: the largest of the {per_device_batch} examples per device and step that fits{cap})" if not micro_batch_size else "(set)")]
    state = "on" if checkpointing else "off"
    parts.append(f"gradient checkpointing {state} " + (
        ("(auto: a micro batch of one does not fit without it)" if checkpointing else "(auto: not needed)")
        if gradient_checkpointing == "auto" else "(set)"))
    verdict = "fit" if fits else "do NOT fit (expect running out of memory: lower micro_batch_size or data lengths)"
    reason = ", ".join(parts) + "; " + (
        f"its activations ({size * tokens_per_example:,} tokens: about {need / mb:,.0f} MB) {verdict} in half the "
        f"{free / mb:,.0f} MB free on this {device}")
    return MemoryPlan(size, checkpointing, reason, need / mb, free / mb)


# ---- the footprint before any weights are loaded -------------------------------------------------
GB = 1024 ** 3
# Bytes per NF4 weight: 4 bits, plus one fp32 absmax per block of 64 (double quantization: an 8-bit absmax per block
# and one fp32 per 256 blocks), as bitsandbytes stores them.
NF4_BYTES = {False: 0.5 + 4 / 64, True: 0.5 + 1 / 64 + 4 / (64 * 256)}
OPTIMIZER_BYTES = {"adamw_torch": 8, "adamw_torch_fused": 8, "paged_adamw_8bit": 2, "adamw_8bit": 2, "sgd": 0}  # per trained parameter
# What fits: the estimate against the memory free on the device, with this share kept for what it misses (the
# allocator's fragmentation, the framework's own buffers).
FIT_SHARE = 0.9


def size_text(size: float) -> str:
    return f"{size / GB:.2f} GiB" if size >= GB / 4 else f"{size / 2 ** 20:,.0f} MiB"


@dataclass
class MemoryEstimate:
    """Bytes per training process, by part; from the model's config alone (its architecture on the meta device)."""

    parts: dict[str, float]
    micro_batch_size: int
    tokens_per_example: int
    gradient_checkpointing: bool
    world_size: int
    zero: int
    quantized: bool
    length_setting: str = "data.cutoff_len"  # what sets tokens_per_example
    max_positions: int | None = None
    processes_per_host: int = 1  # (on a CPU they share the host's memory)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def lines(self) -> list[str]:
        shown = [f"  {name:<12} {size_text(size):>10}" for name, size in self.parts.items()]
        return shown + [f"  {'total':<12} {size_text(self.total):>10} per process, at least (micro batch {self.micro_batch_size} x "
                        f"{self.tokens_per_example} tokens, gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}"
                        + (f", ZeRO-{self.zero} over {self.world_size} ranks" if self.zero else "") + ")"]


def estimate_memory(config, model_path: str | Path, precision: str, checkpointing: bool | None = None,
                    micro_batch_size: int | None = None) -> MemoryEstimate:
    """The training footprint of one process: the base's weights at the chosen quantization (twice for DPO's separate
    reference), the adapter, its gradients and optimizer state (split over the ranks under ZeRO), and the activations
    of one micro batch of full-length examples. Nothing is loaded: the model is built on the meta device. Settings on
    auto (micro batch 0, gradient checkpointing auto) are decided as the trainer's memory plan would decide them with
    the memory free once the rest is in place (plan_memory); checkpointing and micro_batch_size override them."""
    train = config.train
    model = native.meta_model(model_path, config.model.trust_remote_code)
    element_bytes = 4 if precision == "fp32" else 2
    head = model.get_output_embeddings()
    quantized = config.model.quantization == "nf4"
    weights = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head and quantized:
            weights += module.weight.numel() * NF4_BYTES[config.model.double_quant] + (module.bias.numel() * element_bytes if module.bias is not None else 0)
        else:
            weights += sum(p.numel() for p in module.parameters(recurse=False)) * element_bytes
    # (the same adapter, counted on the meta model: a prompt's initial text changes no count; new tokens train the
    # embeddings and output head in full)
    counted = config.lora.as_counted()
    _, report = native.inject_adapter(model, counted, train.seed, train_embeddings=bool(config.data.new_tokens))
    trained = report["trainable_params"]
    world = train.nproc_per_node * max(1, len(train.hosts))
    sharded = world if train.deepspeed_zero else 1  # ZeRO-2 and -3 split gradients and optimizer state
    if train.deepspeed_zero == 3:
        weights /= world
    dpo = config.objective == "dpo"
    tokens = 2 * config.dpo.max_length if dpo else config.data.cutoff_len  # (DPO: chosen and rejected)
    parts = {"weights": weights}
    if dpo and config.dpo.reference == "separate":
        parts["reference"] = weights  # the recipe's second, frozen copy of the base
    parts |= {"adapter": trained * 4.0, "gradients": trained * 4.0 / sharded,
              "optimizer": 0.0 if train.deepspeed_offload_optimizer else trained * OPTIMIZER_BYTES.get(train.optim, 8) / sharded}
    flat = model.config.to_dict()
    flat = flat.get("text_config", flat)
    if checkpointing is None or micro_batch_size is None:
        per_device = train.batch_size // world or 1
        device = native.resolve_device(train.device)
        decided = plan_memory(Path(model_path), device, precision, per_device, tokens, train.micro_batch_size,
                              train.gradient_checkpointing, free=free_memory_bytes(device) - sum(parts.values()))
        checkpointing = decided.gradient_checkpointing if checkpointing is None else checkpointing
        micro_batch_size = decided.micro_batch_size if micro_batch_size is None else micro_batch_size
    parts["activations"] = float(activation_bytes(flat, micro_batch_size * tokens, element_bytes, checkpointing))
    return MemoryEstimate(parts, micro_batch_size, tokens, checkpointing, world, train.deepspeed_zero, quantized,
                          "dpo.max_length" if dpo else "data.cutoff_len", flat.get("max_position_embeddings"), train.nproc_per_node)


def check_fits(estimate: MemoryEstimate, device: str, free: float) -> tuple[bool, str]:
    """(fits, what to say): the estimate against the memory free on this device (the host's for a CPU, shared by the
    processes on it; one card each on an accelerator), with what would make it fit when it does not. The estimate is
    a lower bound (bench/memory.py), so one that does not fit cannot."""
    processes_here = estimate.processes_per_host if device == "cpu" else 1
    need = estimate.total * processes_here
    per = f" ({processes_here} processes of {size_text(estimate.total)})" if processes_here > 1 else ""
    verdict = f"training needs at least {size_text(need)}{per} on this {device} and {size_text(free)} are free"
    if need <= FIT_SHARE * free:
        return True, verdict
    parts = estimate.parts
    ways = []
    if not estimate.gradient_checkpointing:
        ways.append("train.gradient_checkpointing: on (or auto)")
    if estimate.micro_batch_size > 1:
        ways.append("a smaller train.micro_batch_size (or 0: auto)")
    what = "tokens a pair: chosen and rejected" if estimate.length_setting.startswith("dpo") else "tokens an example"
    ways.append(f"a shorter {estimate.length_setting} (now {estimate.tokens_per_example} {what})")
    if "reference" in parts:
        ways.append("dpo.reference: precomputed (no second copy of the base)")
    if not estimate.quantized:
        ways.append("model.quantization: nf4 (QLoRA: about a quarter of the weights' memory)")
    if device != "cpu":  # (on one CPU host more processes only add up)
        if parts["gradients"] + parts["optimizer"] > 0.1 * need and not estimate.zero:
            ways.append("DeepSpeed ZeRO-2 with deepspeed_offload_optimizer (launcher deepspeed, deepspeed_zero 2)")
        ways.append("more cards or hosts with DeepSpeed " + ("ZeRO-3 (it splits the weights too)" if not estimate.quantized else "ZeRO-2"))
    ways.append("a device with more memory")
    return False, f"{verdict}: it does not fit ({', '.join(f'{n} {size_text(v)}' for n, v in parts.items())}). Try: {'; '.join(ways)}"


def context_warning(estimate: MemoryEstimate) -> str:
    """A length setting beyond the model's context window: training would see positions it never learned."""
    longest = estimate.tokens_per_example // (2 if estimate.length_setting.startswith("dpo") else 1)
    limit = estimate.max_positions
    if limit and longest > limit:
        return f"{estimate.length_setting} {longest} is beyond the model's context window of {limit} tokens (max_position_embeddings)"
    return ""


# Fewer optimizer steps than this barely move an adapter from where it starts (LoRA's B matrices start at zero, and a
# warmup's first step runs at learning rate 0): such a run says it was too short rather than show an unchanged loss.
MIN_USEFUL_STEPS = 10


def planned_steps(train_rows: int, train) -> int:
    """The optimizer steps a run will take (about: packing changes the row count the trainer sees)."""
    if train.max_steps > 0:
        return train.max_steps
    return max(1, math.ceil(train.num_epochs * math.ceil(train_rows / train.batch_size)))


def short_run_note(steps: int, train_rows: int | None, train) -> str | None:
    """Why a run of `steps` optimizer steps cannot change the model much, and what would; None when it can."""
    if steps >= MIN_USEFUL_STEPS:
        return None
    rows = f"{train_rows} training rows, " if train_rows is not None else ""
    return (f"only {steps} optimizer step{'s' if steps != 1 else ''} ({rows}train.batch_size {train.batch_size}, "
            f"num_epochs {train.num_epochs:g}{f', max_steps {train.max_steps}' if train.max_steps > 0 else ''}): too few to "
            f"change the model much; add rows, lower train.batch_size, or raise train.num_epochs or train.max_steps "
            f"(at least {MIN_USEFUL_STEPS} steps)")


def rows_used(train_rows: int, train) -> int:
    """The training rows (pairs) a run reaches: all of them, or fewer when max_steps ends it within the first epoch."""
    return min(train_rows, planned_steps(train_rows, train) * train.batch_size)
