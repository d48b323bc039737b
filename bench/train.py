"""Train-stage throughput, memory and quality on the built model, each variant against the seeds' recipe.

    .venv/bin/python bench/train.py [--steps 30] [--rows 999]

Runs the real stages (data → quantize → lora → `python -m loraflow.train` subprocess) on the 999
Alpaca-GPT4 rows of ../shared/data with the small built Llama model, for:
  recipe        the ipex-llm QLoRA recipe: NF4 base, all-linear LoRA, gradient checkpointing on
  no-ckpt       the same without gradient checkpointing (small models don't need the memory saving)
  lora-fp32     plain LoRA on the unquantized base
Prints non-pad tokens/s (tokens the model saw, padding excluded), peak RSS of the training process,
final eval loss, and each as a ratio to the recipe measured in the same run.
"""

from __future__ import annotations

import sys

# bench/tokenize.py would shadow the standard library's `tokenize` while this folder is on sys.path.
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

from loraflow import stages
from loraflow.config import build_config
from loraflow.launch import Topology, build_command
from loraflow.models.tiny import build_tiny_llama, sample_texts
from loraflow.data.formats import read_rows

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VARIANTS = {
    "recipe": {},
    "no-ckpt": {"train": {"gradient_checkpointing": False}},
    "lora-fp32": {"model": {"quantization": "none"}},
}


def merged(tree: dict, extra: dict) -> dict:
    out = json.loads(json.dumps(tree))
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


def run_variant(tree: dict) -> dict:
    store, key, run, spec_uri = stages.prepare_training(build_config(tree), log=lambda _: None)
    subprocess.run(build_command(Topology(), spec_uri).argv, check=True, stdout=subprocess.DEVNULL)
    return stages.trained_record(store, key, run, reused=False).metrics


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rows", type=int, default=999)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loraflow-bench-train-"))
    rows = read_rows(str(SHARED / "alpaca_gpt4_en_demo_1k.json"))[: args.rows]
    (work / "data.json").write_text(json.dumps(rows))
    model = build_tiny_llama(work / "tiny-llama", sample_texts(rows))
    tree = {
        "name": "bench", "storage": str(work / "store"), "model": {"base": str(model)},
        "data": {"path": str(work / "data.json"), "val_set_size": 64, "cutoff_len": 256},
        "train": {"learning_rate": 1e-2, "batch_size": 16, "micro_batch_size": 4, "max_steps": args.steps,
                  "eval_steps": args.steps, "save_steps": args.steps, "logging_steps": 5},
    }
    print(f"built model: Llama 2 layers, hidden 128, vocab 2048; {len(rows)} rows, cutoff 256, "
          f"batch 16 = 4 x 4 accumulation, {args.steps} steps, CPU fp32")
    results = {name: run_variant(merged(tree, extra)) for name, extra in VARIANTS.items()}
    recipe = results["recipe"]
    print(f"{'variant':<10} {'tokens/s':>10} {'x recipe':>9} {'peak RSS MB':>12} {'x recipe':>9} {'eval loss':>10} {'train loss first→last':>24}")
    for name, m in results.items():
        print(f"{name:<10} {m['tokens_per_s']:>10,.0f} {m['tokens_per_s'] / recipe['tokens_per_s']:>9.2f} "
              f"{m['peak_rss_mb']:>12,.0f} {m['peak_rss_mb'] / recipe['peak_rss_mb']:>9.2f} {m['eval_loss']:>10.4f} "
              f"{m['first_loss']:>11.4f} → {m['final_loss']:.4f}")
    print(f"(work folder: {work})")


if __name__ == "__main__":
    sys.exit(main())
