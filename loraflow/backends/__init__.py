"""Backends: the library that loads the base, quantizes it, makes its adapter and trains it, and in which Python.

Supports:
- `native` (the default): transformers + bitsandbytes + PEFT in this Python, on XPU, CUDA and CPU.
- `ipex-llm`: Intel's ipex-llm 2.2 in its own pinned Python (legacy opt-in; archived upstream).

Everything that depends on the backend asks its `Backend` (`backend(name)`): the config's choices and refusals, the
env check, the quantize and lora stages, the trainer's Python and loading, the device rule, the warm trainer.
Adding a backend: one module here with a `Backend` subclass, its entry in BACKENDS, and its tests.
"""

from __future__ import annotations

from loraflow.backends.base import Backend
from loraflow.backends.ipex_llm import IPEX_LLM
from loraflow.backends.native import NATIVE

BACKENDS: dict[str, Backend] = {part.name: part for part in (NATIVE, IPEX_LLM)}
BACKEND_NAMES: tuple[str, ...] = tuple(BACKENDS)  # (the first is the default)
# What a quantize stage's record may name as its format: a base in one of these trains as a quantized base.
LOW_BIT_FORMATS: frozenset[str] = frozenset(name for part in BACKENDS.values() for name in part.low_bit_formats)


def backend(name: str) -> Backend:
    """The backend registered under `name` (model.backend, a run spec's backend)."""
    return BACKENDS[name]


__all__ = ["BACKENDS", "BACKEND_NAMES", "LOW_BIT_FORMATS", "Backend", "backend"]
