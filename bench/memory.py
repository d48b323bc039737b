"""The memory estimate made before loading (loraflow.plan.estimate_memory, `loraflow plan`) against what training
measured, on this machine's CPU (peak RSS of the trainer above its RSS after imports):

    .venv/bin/python bench/memory.py [--steps 4]

Both built models of bench/train.py (small: 4.7M parameters; large: 110M), NF4 + LoRA r8 on every linear layer,
micro batch 4 padded (not packed) at cutoff 128 so every row is full (most Alpaca-GPT4 rows are longer), with and
without gradient checkpointing, each trained in a process of its own. Prints each estimate part, the total, the
measured figure (the peak resident memory above the resident memory once the libraries are imported) and the error.
"""

from __future__ import annotations

import sys

_HERE = __file__.rsplit("/", 1)[0]
sys.path[:] = [p for p in sys.path if p not in ("", _HERE)]  # (bench/tokenize.py would shadow the standard library's)

import argparse
import importlib.util
import json
import subprocess
import tempfile
from pathlib import Path

from loraflow import stages
from loraflow.config_loader import build_config
from loraflow.data.formats import read_rows
from loraflow.models.tiny import build_tiny_llama, sample_texts
from loraflow.plan import GB, estimate_memory

_spec = importlib.util.spec_from_file_location("bench_train", f"{_HERE}/train.py")
bench_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_train)


def measure(spec_uri: str) -> None:
    """Train one spec in this process and print the resident memory it added: the peak since the libraries were
    imported (Linux's VmHWM, reset by /proc/self/clear_refs) above the resident size then. (The trainer's own
    peak_rss_mb minus imports_rss_mb misses runs smaller than the imports' own transient peak.)"""
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import transformers.trainer  # noqa: F401

    from loraflow import train

    def status(field: str) -> float:
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
        return int(line.split()[1]) / 1024

    Path("/proc/self/clear_refs").write_text("5")  # the peak resident size starts again from the current one
    before = status("VmRSS")
    summary = train.train(train.read_spec(spec_uri))
    print(json.dumps({"run_mb": status("VmHWM") - before, "precision": summary["precision"]}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args.measure)
    work = Path(tempfile.mkdtemp(prefix="loraflow-bench-memory-"))
    rows = read_rows(str(bench_train.SHARED / "alpaca_gpt4_en_demo_1k.json"))[:200]
    (work / "data.json").write_text(json.dumps(rows))
    print(f"{'model':<6} {'checkpointing':<13} {'weights':>8} {'adapter+':>9} {'activ.':>8} {'estimate':>9} {'measured':>9} {'error':>7}   (MB)")
    for size in ("small", "large"):
        model = build_tiny_llama(work / size, sample_texts(rows), **bench_train.MODELS[size])
        for checkpointing in ("off", "on"):
            tree = {"name": "mem", "storage": str(work / "store"), "model": {"base": str(model)},
                    "data": {"path": str(work / "data.json"), "val_set_size": 0, "cutoff_len": 128, "train_on_inputs": "yes"},
                    "train": {"batch_size": 4, "micro_batch_size": 4, "packing": False, "max_steps": args.steps,
                              "save_steps": 10 * args.steps, "gradient_checkpointing": checkpointing}}
            config = build_config(tree)
            _, _, _, spec_uri = stages.prepare_training(config, log=lambda _: None)
            measured = json.loads(subprocess.run([sys.executable, __file__, "--measure", spec_uri], check=True, text=True,
                                                 capture_output=True).stdout.strip().splitlines()[-1])
            estimate = estimate_memory(config, model, measured["precision"])
            mb = 1024 * 1024
            run_mb = measured["run_mb"]
            others = sum(estimate.parts[name] for name in ("adapter", "gradients", "optimizer"))
            print(f"{size:<6} {checkpointing:<13} {estimate.parts['weights'] / mb:>8.1f} {others / mb:>9.1f} "
                  f"{estimate.parts['activations'] / mb:>8.1f} {estimate.total / mb:>9.1f} {run_mb:>9.1f} "
                  f"{(estimate.total / mb - run_mb) / run_mb:>+7.0%}")
    print(f"(GB = {GB} bytes; work folder: {work})")


if __name__ == "__main__":
    main()
