"""The ipex-llm backend (model.backend: ipex-llm): Intel's ipex-llm 2.2 low-bit base and its QLoRA layers.

ipex-llm is archived upstream and cannot import beside transformers 5, so it runs in its own pinned environment
(infra/envs/ipex-llm). The main environment only starts processes there:

- the base stage runs `python -m loraflow.models.ipex_llm quantize` (ipex-llm's own low-bit format),
- the lora stage runs `python -m loraflow.models.ipex_llm init-adapter` (ipex-llm's QLoRA layers, a PEFT folder),
- the train stage runs `python -m loraflow.train` there whole, which loads through load_causal_lm and with_adapter here.

What crosses between the environments is plain files (safetensors, JSON, parquet), never a pickle. On an Intel GPU
the base is NF4; on a CPU sym_int4 (symmetric int4), because ipex-llm has no NF4 kernel for the CPU. Nothing of
ipex-llm is imported at the top of this module: the main environment imports it too.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from loraflow import process
from loraflow.errors import LoraflowError
from loraflow.launch import LaunchCommand, run_streaming
from loraflow.models.native import torch_dtype, trainable_report
from loraflow.versions import installed_version

PYTHON_VARIABLE = "LORAFLOW_IPEX_LLM_PYTHON"
DEFAULT_VENV = ".venv-ipex-llm"  # beside the checkout: where infra/envs/ipex-llm/setup puts it
RESULT_PREFIX = "loraflow-result: "
LOW_BIT_WEIGHTS = "model.safetensors"
LOW_BIT_FILES = ("config.json", "generation_config.json", "load_keys.json")  # what save_low_bit writes beside its weights


# ---- the main environment's side: which Python, and running a command there ---------------------
def python_executable() -> str:
    """The pinned environment's Python: $LORAFLOW_IPEX_LLM_PYTHON (a pool's job variable sets it), else the one
    infra/envs/ipex-llm/setup made beside this checkout."""
    configured = os.environ.get(PYTHON_VARIABLE)
    python = Path(configured) if configured else Path(__file__).resolve().parents[2] / DEFAULT_VENV / "bin" / "python"
    if python.is_dir() and (python / "bin" / "python").is_file():  # (the environment's folder, given for its Python)
        python = python / "bin" / "python"
    if not python.is_file():
        where = f"{PYTHON_VARIABLE} is {configured}, which does not exist" if configured else f"there is no {python}"
        raise LoraflowError(f"model.backend ipex-llm runs in its own Python environment, and {where}: build it with "
                            f"infra/envs/ipex-llm/setup (or set {PYTHON_VARIABLE} to that environment's python; on a work "
                            "pool's host, the pool's ipex_llm_python variable), or set model.backend: native")
    return str(python)


def run_command(command: str, *args: str, log=print) -> dict:
    """`python -m loraflow.models.ipex_llm COMMAND ARGS…` in the pinned environment; its output lines go to log, and its
    result (the line starting with RESULT_PREFIX) is returned. In its own process group, killed with this process."""
    lines: list[str] = []
    results: list[dict] = []

    def each_line(line: str) -> None:
        if line.startswith(RESULT_PREFIX):
            results.append(json.loads(line.removeprefix(RESULT_PREFIX)))
        elif line.strip():
            lines.append(line)
            if not line.startswith("error: "):  # (raised below, once)
                log(line)

    code = run_streaming(LaunchCommand([python_executable(), "-m", "loraflow.models.ipex_llm", command, *args]), each_line)
    if code != 0 or not results:
        errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
        if errors:
            raise LoraflowError("; ".join(errors))
        raise RuntimeError(f"the ipex-llm environment's {command} exited with code {code}:\n" + "\n".join(lines[-20:]))
    return results[-1]


def probe(log=print) -> dict:
    """The pinned environment's library versions and its device (an Intel GPU through ipex-llm, or the CPU)."""
    return run_command("probe", log=log)


# ---- the pinned environment's side ----------------------------------------------------------------
def _quiet_ipex_llm() -> None:
    # ipex-llm logs "Converting the current model to sym_int4 format......" with its own timestamp at every load.
    import logging

    logging.getLogger("ipex_llm").setLevel(logging.WARNING)


def low_bit_format(device: str) -> str:
    return "nf4" if device == "xpu" else "sym_int4"


def _ipex_device(device: str) -> None:
    if device == "xpu":
        import intel_extension_for_pytorch  # noqa: F401  (registers torch.xpu with the torch 2.1 of this environment)


def _available_device() -> str:
    import torch

    try:
        _ipex_device("xpu")
    except ImportError:
        return "cpu"
    return "xpu" if hasattr(torch, "xpu") and torch.xpu.is_available() else "cpu"


def _probe() -> dict:
    try:
        import ipex_llm.transformers  # noqa: F401  (what the stages use: it fails here, once, if it cannot import)
    except ImportError as error:
        raise LoraflowError(f"{sys.executable} cannot import ipex-llm ({error}): it is not the ipex-llm backend's environment; "
                            f"build that with infra/envs/ipex-llm/setup and point {PYTHON_VARIABLE} at its python, or "
                            "unset it to use .venv-ipex-llm beside the checkout") from None
    return {"python": sys.executable, "device": _available_device(),
            "versions": {name: installed_version(name) for name in ("ipex-llm", "torch", "transformers", "peft")}}


def _from_pretrained_options(precision: str) -> dict:
    # optimize_model off: ipex-llm's inference rewrites of attention have no backward; the output head stays full
    # precision (as QLoRA keeps it): the settings of ipex-llm's own QLoRA example.
    return {"optimize_model": False, "torch_dtype": torch_dtype(precision), "modules_to_not_convert": ["lm_head"]}


def quantize(model_path: Path, out: Path, device: str, precision: str, trust_remote_code: bool = False) -> dict:
    """The base in ipex-llm's low-bit format, written as safetensors (save_low_bit writes a pickle, which the store
    never holds) with save_low_bit's own configs."""
    import torch
    from ipex_llm.transformers import AutoModelForCausalLM
    from safetensors.torch import save_file

    _quiet_ipex_llm()
    low_bit = low_bit_format(device)
    model = AutoModelForCausalLM.from_pretrained(str(model_path), load_in_low_bit=low_bit, trust_remote_code=trust_remote_code,
                                                 **_from_pretrained_options(precision))
    with tempfile.TemporaryDirectory(prefix="loraflow-ipex-low-bit-") as tmp:
        model.save_low_bit(tmp)
        # (this process's own file, written a moment ago: tensors only, read back with the restricted unpickler anyway)
        state = torch.load(Path(tmp) / "pytorch_model.bin", map_location="cpu", weights_only=True)
        save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(out / LOW_BIT_WEIGHTS), metadata={"format": "pt"})
        for name in LOW_BIT_FILES:
            if (Path(tmp) / name).is_file():
                shutil.copyfile(Path(tmp) / name, out / name)
    converted = sum(1 for module in model.modules() if type(module).__name__ == "LowBitLinear")
    return {"quantization": low_bit, "backend": "ipex-llm", "quantized_linear_layers": converted,
            "weights_bytes": (out / LOW_BIT_WEIGHTS).stat().st_size, "compute_dtype": precision}


def load_causal_lm(base_dir: Path, device: str, precision: str, trust_remote_code: bool = False):
    """The quantize stage's low-bit base, on `device`. ipex-llm's load_low_bit reads only a pytorch_model.bin, so
    one is written locally from the safetensors (this process pickles plain tensors itself; nothing from the store is
    unpickled)."""
    import torch
    from ipex_llm.transformers import AutoModelForCausalLM
    from safetensors.torch import load_file

    _ipex_device(device)
    _quiet_ipex_llm()
    with tempfile.TemporaryDirectory(prefix="loraflow-ipex-low-bit-") as tmp:
        for name in LOW_BIT_FILES:
            if (base_dir / name).is_file():
                shutil.copyfile(base_dir / name, Path(tmp) / name)
        torch.save(load_file(str(base_dir / LOW_BIT_WEIGHTS)), Path(tmp) / "pytorch_model.bin")
        model = AutoModelForCausalLM.load_low_bit(tmp, trust_remote_code=trust_remote_code, **_from_pretrained_options(precision))
    # (not the temporary folder, which is gone: PEFT reads the base's config there when it saves an adapter)
    model.name_or_path = model.config._name_or_path = str(base_dir)
    return model.to(device)


def prepare_for_training(model, quantized: bool, gradient_checkpointing: bool):
    from ipex_llm.transformers.qlora import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def _lora_config(saved: dict):
    """ipex-llm's LoraConfig (PEFT's, with its QLoRA training mode) from a saved adapter_config.json's fields."""
    from ipex_llm.transformers.qlora import LoraConfig

    return LoraConfig(r=saved["r"], lora_alpha=saved["lora_alpha"], lora_dropout=saved["lora_dropout"],
                      target_modules=sorted(saved["target_modules"]), bias=saved.get("bias", "none"), task_type="CAUSAL_LM",
                      training_mode="qlora")


def with_adapter(model, adapter_dir: Path, tokenizer=None, trainable: bool = False):
    """The base with ipex-llm's LoRA layers, given the saved adapter's weights."""
    import torch
    from ipex_llm.transformers.qlora import get_peft_model
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    peft_model = get_peft_model(model, _lora_config(json.loads((adapter_dir / "adapter_config.json").read_text())))
    set_peft_model_state_dict(peft_model, load_file(str(adapter_dir / "adapter_model.safetensors")))
    # DistributedDataParallel broadcasts every parameter and buffer from rank 0 when it wraps the model, and gloo/ccl
    # refuse the low-bit weights' packed type ("Invalid scalar type"). Only the adapter is trained, and every rank
    # loaded the same frozen base from the same files: those are left out of DDP's synchronisation.
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        peft_model, [name for name, parameter in peft_model.named_parameters() if not parameter.requires_grad]
        + [name for name, _ in peft_model.named_buffers()])
    return _saves_standard_config(peft_model)


def _saves_standard_config(peft_model):
    """Its save_pretrained (the Trainer's too) writes a config PEFT anywhere reads: without training_mode, ipex-llm's own
    field (always qlora here), which the main environment's PEFT warns about and ignores. And it never saves the
    embeddings, which this backend does not train (PEFT 0.10 asks the hub whether the vocabulary changed, and warns
    at every save when it cannot reach it)."""
    save = peft_model.save_pretrained

    def save_pretrained(directory, *args, **kwargs):
        save(directory, *args, **{**kwargs, "save_embedding_layers": False})
        for config in Path(directory).rglob("adapter_config.json"):
            saved = json.loads(config.read_text())
            if saved.pop("training_mode", None) is not None:
                config.write_text(json.dumps(saved, indent=2))

    peft_model.save_pretrained = save_pretrained
    return peft_model


def init_adapter(base_dir: Path, out: Path, device: str, precision: str, lora: dict, seed: int, trust_remote_code: bool = False) -> dict:
    """A fresh LoRA adapter (seeded) on the low-bit base, saved as a PEFT folder in out/adapter."""
    import torch

    model = prepare_for_training(load_causal_lm(base_dir, device, precision, trust_remote_code), True, gradient_checkpointing=False)
    torch.manual_seed(seed)
    from ipex_llm.transformers.qlora import get_peft_model

    peft_model = _saves_standard_config(get_peft_model(model, _lora_config(lora)))
    peft_model.save_pretrained(str(out / "adapter"))
    return trainable_report(peft_model, "lora", sorted(lora["target_modules"]))


def main(argv: list[str] | None = None) -> int:
    """`python -m loraflow.models.ipex_llm probe | quantize | init-adapter` in the pinned environment."""
    import argparse

    process.setup()  # (its libraries' deprecation warnings filtered: loraflow.process)
    parser = argparse.ArgumentParser(prog="python -m loraflow.models.ipex_llm", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("probe", help="print the versions and the device")
    for name in ("quantize", "init-adapter"):
        command = commands.add_parser(name)
        command.add_argument("source", type=Path, help="quantize: the model folder; init-adapter: the low-bit base folder")
        command.add_argument("out", type=Path)
        command.add_argument("--device", required=True)
        command.add_argument("--precision", required=True)
        command.add_argument("--trust-remote-code", action="store_true")
        if name == "init-adapter":
            command.add_argument("--lora", required=True, help="JSON: r, lora_alpha, lora_dropout, target_modules")
            command.add_argument("--seed", type=int, required=True)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "probe":
            result = _probe()
        elif args.command == "quantize":
            result = quantize(args.source, args.out, args.device, args.precision, args.trust_remote_code)
        else:
            result = init_adapter(args.source, args.out, args.device, args.precision, json.loads(args.lora), args.seed,
                                  args.trust_remote_code)
    except LoraflowError as error:
        print(f"error: {error}", flush=True)
        return 3
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
