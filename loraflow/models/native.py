"""The native backend: transformers + bitsandbytes + peft on one code path for XPU, CUDA and CPU.

bitsandbytes ≥ 0.48 ships NF4 kernels for all three devices, and accelerate finds XPU through stock
`torch.xpu`, so nothing here branches on the device beyond choosing it and its dtype.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

import torch

from loraflow import adapters
from loraflow.data.tokenize import load_tokenizer
from loraflow.errors import LoraflowError
from loraflow.storage import fingerprint_file

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)


# bitsandbytes (0.49 on) asks the Hugging Face hub for optional CPU kernels through the `kernels` package when it is
# imported: a lookup of huggingface.co from every process, and code fetched from a hub that no setting of the user's
# asked to run (the trust rule: code runs only where the flow's parameters allow it). Its built-in CPU path needs
# neither: bitsandbytes is imported here first with `kernels` hidden, so it takes that path at once; `kernels` is
# visible again afterwards (transformers asks for it by name).
#
# It also wraps its fallback kernels in torch.compile as it is imported, and torch.compile imports TorchDynamo and
# Inductor at that call, though compiling waits for a kernel's first call: about 1 s of CPU (measured: a trainer's and a
# flow's imports 9.2-9.5 s instead of 9.8-10.6 s) in every process that imports it (each trainer, flow process and
# command), for kernels a run on CPU, CUDA or XPU seldom calls. While it imports, torch.compile is a wrapper that calls
# torch.compile at a kernel's first call: what compiles, and when, is unchanged.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _compile_at_first_call(function=None, **options):
    """torch.compile's signature (as a decorator, with or without options); the real call waits for the first call."""
    if function is None:
        return lambda decorated: _compile_at_first_call(decorated, **options)
    compiled = None

    @functools.wraps(function)
    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            compiled = _torch_compile(function, **options)
        return compiled(*args, **kwargs)

    return call


_hidden = sys.modules.get("kernels")
sys.modules["kernels"] = None
_torch_compile, torch.compile = torch.compile, _compile_at_first_call
try:
    import bitsandbytes  # noqa: F401
except ImportError:  # (the ipex-llm backend's environment has none: it quantizes with ipex-llm)
    pass
finally:
    torch.compile = _torch_compile
    if _hidden is None:
        del sys.modules["kernels"]
    else:
        sys.modules["kernels"] = _hidden


# ---- devices and precision ------------------------------------------------------------------
def available_device() -> str:
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return available_device()
    if requested == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise LoraflowError("train.device is xpu, but torch.xpu finds no Intel GPU; install the XPU build of torch or set train.device: auto")
    if requested == "cuda" and not torch.cuda.is_available():
        raise LoraflowError("train.device is cuda, but torch.cuda finds no GPU; set train.device: auto or cpu")
    return requested


def torch_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def device_map(device: str) -> dict:
    if device == "cpu":
        return {"": "cpu"}
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return {"": f"{device}:{local_rank}"}


# ---- model identity ---------------------------------------------------------------------------
def resolve_model_path(base: str) -> Path:
    """A local folder for a model path or hub id (the hub id goes through the Hugging Face cache)."""
    path = Path(base).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoraflowError(f"{base}: no config.json in this folder; model.base must be a transformers model folder or a hub id")
        return path
    if path.exists():
        raise LoraflowError(f"{base}: is a file; model.base must be a model folder or a hub id")
    if base.startswith(("/", "./", "../", "~")) or base.count("/") > 1:
        raise LoraflowError(f"{base}: model folder not found")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base))
    except Exception as error:  # offline, gated, or a typo: the hub client raises many types
        raise LoraflowError(
            f"{base}: not a local folder and not available from the Hugging Face hub or its cache ({type(error).__name__}); "
            "download it first (huggingface-cli download) or point model.base at a folder"
        ) from None


def model_fingerprint(path: Path) -> dict:
    """Content identity of a model: its config and the fingerprints of its weight files."""
    weights = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not weights:
        raise LoraflowError(f"{path}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) in the model folder")
    return {
        "config": json.loads((path / "config.json").read_text()),
        "weights": [fingerprint_file(p) for p in weights],
    }


# Text whose token ids show how a tokenizer normalises, pre-tokenises and marks words: two tokenizers
# built from the same files (transformers picks the class from config.json's model_type) can differ here.
_PROBE = " Hello  world!\n\tÜber 123 ünïcode — 你好 <s></s> end"


def tokenizer_identity(path: Path) -> dict:
    """The tokenizer as built (as the data stage builds it), not only its files: class, size, special
    tokens with their ids, chat template, the ids of a probe text, and the files' fingerprints."""
    files = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
    if not files:
        raise LoraflowError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, …) in the model folder")
    tokenizer = load_tokenizer(str(path))
    return {
        "class": type(tokenizer).__name__,
        "size": len(tokenizer),
        "special_tokens": {name: [token, tokenizer.convert_tokens_to_ids(token)]
                           for name, token in sorted(tokenizer.special_tokens_map.items()) if isinstance(token, str)},
        "chat_template": tokenizer.chat_template,
        "probe_ids": tokenizer(_PROBE, add_special_tokens=True)["input_ids"],
        "files": [fingerprint_file(p) for p in files],
    }


def config_vocab_size(path: Path) -> int | None:
    """The model's vocabulary (embedding rows) from its config.json (text_config for multimodal configs)."""
    config = json.loads((path / "config.json").read_text())
    return config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")


# ---- loading ----------------------------------------------------------------------------------
def bnb_config(double_quant: bool, compute_precision: str):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch_dtype(compute_precision),
    )


def is_prequantized(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and "quantization_config" in json.loads(config.read_text())


def load_causal_lm(path: str | Path, device: str, precision: str, quantization_config=None, trust_remote_code=False):
    """Load a causal LM on `device`: full precision at `precision`, or 4-bit (a fresh NF4 config, or a
    pre-quantized folder whose saved config decides the dtypes: forcing one there breaks the load)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"device_map": device_map(device), "trust_remote_code": trust_remote_code}
    # An explicit quantization_config=None overrides the one saved with a pre-quantized folder, so
    # the key is only passed when there is a config to pass.
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    elif not is_prequantized(path):
        kwargs["dtype"] = torch_dtype(precision)
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def quantize(model_path: Path, out_dir: Path, device: str, precision: str, double_quant: bool, trust_remote_code=False) -> dict:
    """Load the base in NF4 and save the pre-quantized model, so later fine-tunes skip quantization."""
    import bitsandbytes as bnb

    model = load_causal_lm(model_path, device, precision, bnb_config(double_quant, precision), trust_remote_code)
    quantized = [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    head = model.get_output_embeddings()
    if isinstance(head, bnb.nn.Linear4bit):
        raise LoraflowError("the output head was quantized; loraflow keeps lm_head in full precision")
    model.save_pretrained(str(out_dir))
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.suffix == ".safetensors")
    return {"quantized_linear_layers": len(quantized), "weights_bytes": size, "compute_dtype": precision}


# ---- adapter targets (each method finds its own: loraflow.adapters) -----------------------------
def meta_model(model_path: str | Path, trust_remote_code: bool = False):
    """The model's architecture from its config alone, on the meta device: no weights read, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def targets_without_weights(model_path: str | Path, lora, trust_remote_code: bool = False) -> list[str]:
    """The adapter's target modules (its method's targets; none for a method that targets no modules, such as prompt and
    prefix tuning) resolved on the model's architecture built on the meta device (no weights read, no memory): a wrong
    module name is reported before anything is quantized or trained."""
    method = adapters.method(lora.method)
    if method.targets is None:
        return []
    return method.targets(meta_model(model_path, trust_remote_code), lora)


def keep_4bit_training_kernels(model) -> None:
    """bitsandbytes (0.50) repacks a CPU Linear4bit's weight for its AVX512-BF16 inference kernel the first time the
    layer runs in eval mode, and keeps it repacked; that kernel has no backward. Training after any evaluation then
    lost the gradient through every quantized layer without an error (the LoRA gradients of all but the last layers
    were wrong: tests/test_quantized_training.py). A model that is trained keeps the training kernels, and so does a
    separate DPO reference copy: its log-probs are compared with the policy's, so they use the same arithmetic."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def prepare_for_training(model, quantized: bool, gradient_checkpointing: bool):
    from peft import prepare_model_for_kbit_training

    if quantized:
        keep_4bit_training_kernels(model)
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def adapter_config(model, lora, tokenizer_dir: Path | None = None):
    """The PEFT config of the adapter lora.method asks for, on this model (its targets resolved): its method's own."""
    return adapters.method(lora.method).peft_config(model, lora, tokenizer_dir)


def fit_vocabulary(model, tokenizer, initialise: bool = False) -> bool:
    """Grow the model's embeddings and output head to the tokenizer's size when data.new_tokens made it larger; True
    if it grew. initialise: new rows drawn around the mean of the old ones (transformers' mean resizing), for a fresh
    adapter; elsewhere the adapter brings its trained rows and the base's new rows are never used."""
    if len(tokenizer) <= model.get_input_embeddings().num_embeddings:
        return False
    model.resize_token_embeddings(len(tokenizer), mean_resizing=initialise)
    return True


def with_adapter(base, adapter_dir: Path, tokenizer, trainable: bool = False):
    """base + the saved adapter (PeftModel.from_pretrained), the base's embeddings first grown to the run's tokenizer
    when it added tokens (the adapter holds their trained rows, and PEFT needs the shapes to match)."""
    from peft import PeftModel

    fit_vocabulary(base, tokenizer)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)
    if trainable:
        save_embeddings_once(model)
    return model


def save_embeddings_once(model) -> None:
    """Grown embeddings are trained and saved as the adapter's modules_to_save. PEFT's save_pretrained would also save
    the whole embedding modules a second and third time (its save_embedding_layers="auto" sees a vocabulary larger
    than the base's config: 3 copies, gigabytes on a real model), and the Trainer saves without a way to say otherwise:
    this model's save_pretrained says it."""
    import functools

    model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)


def embedding_module_names(model) -> list[str]:
    """The input embeddings' and output head's module names (e.g. embed_tokens, lm_head): what PEFT trains in full
    (modules_to_save) when new tokens were added."""
    wanted = {id(model.get_input_embeddings()): None, id(model.get_output_embeddings()): None}
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if id(module) in wanted})


def inject_adapter(model, lora, seed: int, tokenizer_dir: Path | None = None, train_embeddings: bool = False):
    """The base with a fresh adapter of lora.method (seeded), and what it trains: its parameters against the model's.
    train_embeddings: the embeddings and output head are trained in full too (new tokens were added)."""
    from peft import get_peft_model

    config = adapter_config(model, lora, tokenizer_dir)
    if train_embeddings:
        config.modules_to_save = embedding_module_names(model)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    save_embeddings_once(peft_model)
    targets = sorted(config.target_modules) if getattr(config, "target_modules", None) else []
    return peft_model, trainable_report(peft_model, lora.method, targets)


def trainable_report(peft_model, method: str, targets: list[str]) -> dict:
    """What an adapter trains against the model's parameters: the lora stage's record (the summary and compare show it)."""
    trainable, total = peft_model.get_nb_trainable_parameters()
    return {"method": method, "target_modules": targets, "trainable_params": trainable, "total_params": total,
            "trainable_percent": round(100 * trainable / total, 4)}
