"""Training throughput against the recipe it replaces (bench/recipe.py), measured in the same run.

    .venv/bin/python bench/train.py [--model small|large] [--steps 30] [--rows 999]

Same built model (small: Llama, hidden 256, 4 layers, 4.7M parameters; large: hidden 768, 16 layers, 110M), same
data (the 999 Alpaca-GPT4 rows of ../shared/data, cutoff 256, the same 64 validation rows), the same 16 examples
per optimizer step and the same steps, NF4 base, LoRA r8 on every linear layer, lr 3e-5, the prompt trained on (the
recipe's train_on_inputs), each as its own process:
  recipe      bench/recipe.py: micro batch 2 padded to a multiple of 8, bf16, no gradient checkpointing
  loraflow    loraflow's defaults: packed micro batches, micro batch and checkpointing from the memory plan,
              precision auto (bf16 on a CPU with AVX512-BF16/AMX)
  unpacked    loraflow's defaults with train.packing false
  recipe-like loraflow with the recipe's settings (micro batch 2, no packing)
Prints non-pad tokens/s of the training loop (evaluation left out), its wall time, peak RSS above the process's RSS
after imports, final eval loss, each as a ratio to the recipe's; and the ceiling: forward and backward passes alone on
full rows (bench/ceiling.py), which no training loop exceeds on this machine.
"""

from __future__ import annotations

import sys

# bench/tokenize.py would shadow the standard library's `tokenize` while this folder is on sys.path.
_HERE = __file__.rsplit("/", 1)[0]
sys.path[:] = [p for p in sys.path if p not in ("", _HERE)]

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from loraflow import stages
from loraflow.config_loader import build_config
from loraflow.data.formats import read_rows
from loraflow.launch import Topology, build_command
from loraflow.models.tiny import build_tiny_llama, sample_texts

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MODELS = {"small": {"hidden_size": 256, "layers": 4, "heads": 4, "vocab_size": 4096},
          "large": {"hidden_size": 768, "layers": 16, "heads": 12, "vocab_size": 4096, "intermediate_size": 2048}}
VARIANTS = {  # each: config sections merged over the common tree
    "loraflow": {},
    "unpacked": {"train": {"packing": False}},
    "recipe-like": {"train": {"packing": False, "micro_batch_size": 2, "gradient_checkpointing": "off", "precision": "bf16"},
                    "lora": {"dropout": 0.05}},
    # (not printed by default: --variants fp32 micro8 …)
    "fp32": {"train": {"precision": "fp32"}},
    "micro8": {"train": {"micro_batch_size": 8}},
    "micro4": {"train": {"micro_batch_size": 4}},
    "micro16": {"train": {"micro_batch_size": 16}},
    "compile": {"train": {"compile": True}},
    "no-dropout": {"lora": {"dropout": 0.0}},
    "grouped": {"train": {"packing": False, "sampling": "group_by_length"}},
}
DEFAULT_VARIANTS = ("loraflow", "unpacked", "recipe-like")


def run_loraflow(tree: dict, variant: dict) -> dict:
    config = build_config({**tree, **{section: {**tree.get(section, {}), **fields} for section, fields in variant.items()}})
    store, key, run, spec_uri = stages.prepare_training(config, log=lambda _: None)
    subprocess.run(build_command(Topology(), spec_uri).argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return stages.trained_record(store, key, run, reused=False).metrics


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=MODELS, default="small")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rows", type=int, default=999)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=DEFAULT_VARIANTS)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loraflow-bench-train-"))
    rows = read_rows(str(SHARED / "alpaca_gpt4_en_demo_1k.json"))[: args.rows]
    (work / "data.json").write_text(json.dumps(rows))
    model = build_tiny_llama(work / "model", sample_texts(rows), **MODELS[args.model])
    parameters = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(str(model)).parameters())
    tree = {
        # The recipe's optimisation (lr, no warmup, clipping at 0.3, single quantization): only how it runs differs.
        "name": "bench", "storage": str(work / "store"), "model": {"base": str(model), "double_quant": False},
        "data": {"path": str(work / "data.json"), "val_set_size": 64, "cutoff_len": 256, "train_on_inputs": "yes"},
        "lora": {"r": 8, "alpha": 16, "target": "all-linear"},
        "train": {"learning_rate": 3e-5, "warmup": 0, "max_grad_norm": 0.3, "batch_size": 16, "max_steps": args.steps, "eval_steps": 10 * args.steps,
                  "save_steps": 10 * args.steps, "logging_steps": 10},
    }

    results = {name: run_loraflow(tree, VARIANTS[name]) for name in args.variants}
    # The recipe on the very rows loraflow trained and evaluated on (its data stage's split).
    dataset = next((work / "store" / "dataset").iterdir())
    val_ids = pq.read_table(dataset / "val.parquet").column("input_ids").to_pylist()
    # Which rows those are: the recipe's own tokenization of every row gives the same ids (bench/tokenize.py checks it).
    import importlib.util

    from loraflow.data.tokenize import load_tokenizer

    spec = importlib.util.spec_from_file_location("bench_tokenize", f"{_HERE}/tokenize.py")
    bench_tokenize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_tokenize)
    all_ids = bench_tokenize.recipe(rows, load_tokenizer(str(dataset / "tokenizer")), 256, True)["input_ids"]
    by_ids: dict = {}
    for index, ids in enumerate(all_ids):
        by_ids.setdefault(tuple(ids), []).append(index)
    val_index = {by_ids[tuple(ids)].pop() for ids in val_ids}
    val_rows = [rows[i] for i in sorted(val_index)]
    train_rows = [row for i, row in enumerate(rows) if i not in val_index]
    (work / "train.json").write_text(json.dumps(train_rows))
    (work / "val.json").write_text(json.dumps(val_rows))
    subprocess.run([sys.executable, f"{_HERE}/recipe.py", str(model), str(work / "train.json"), str(work / "val.json"),
                    str(work / "recipe.json"), "--steps", str(args.steps), "--train-on-inputs"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    recipe = json.loads((work / "recipe.json").read_text())
    if sorted(map(tuple, recipe.pop("val_input_ids"))) != sorted(map(tuple, val_ids)):
        raise SystemExit("the recipe's validation rows differ from loraflow's: the comparison would be unfair")

    print(f"built Llama {args.model}: {parameters / 1e6:.1f}M parameters; {len(rows)} Alpaca-GPT4 rows, 64 for validation, "
          f"cutoff 256; 16 examples per step, {args.steps} steps; NF4 + LoRA r8 all-linear; {os.cpu_count()} CPU cores")
    print(f"{'variant':<12} {'tokens/s':>9} {'x recipe':>9} {'loop s':>8} {'run MB':>8} {'x recipe':>9} {'eval loss':>10}  settings")
    rows_out = {"recipe": recipe, **results}
    for name, m in rows_out.items():
        run_mb = m["peak_rss_mb"] - m["imports_rss_mb"]
        recipe_mb = recipe["peak_rss_mb"] - recipe["imports_rss_mb"]
        settings = ("micro batch 2, padded, bf16, no checkpointing" if name == "recipe" else
                    f"micro batch {m.get('micro_batch_size')}, {'packed' if m.get('packed') else 'padded'}, {m.get('precision')}, "
                    f"checkpointing {'on' if m.get('gradient_checkpointing') else 'off'}")
        print(f"{name:<12} {m['tokens_per_s']:>9,.0f} {m['tokens_per_s'] / recipe['tokens_per_s']:>9.2f} {m['train_runtime_s']:>8.1f} "
              f"{run_mb:>8,.0f} {run_mb / recipe_mb:>9.2f} {m['eval_loss']:>10.4f}  {settings}")
    ceiling = json.loads(subprocess.run([sys.executable, f"{_HERE}/ceiling.py", str(model)], check=True, capture_output=True,
                                        text=True).stdout.strip().splitlines()[-1])
    print(f"{'ceiling':<12} {ceiling['tokens_per_s']:>9,.0f} {ceiling['tokens_per_s'] / recipe['tokens_per_s']:>9.2f}"
          f"{'':>39}  forward + backward alone on {ceiling['rows']} full rows of {ceiling['width']} (bench/ceiling.py)")
    print(f"(work folder: {work})")


if __name__ == "__main__":
    main()
