"""DPO's three reference modes, measured in one run: memory attributable to training and step time.

    .venv/bin/python bench/dpo.py [--hidden 2048] [--layers 12] [--steps 4] [--pairs 32] [--max-length 128]

Model: a Llama-architecture model loraflow builds (random weights; hidden 2048 x 12 layers is about 0.5B
parameters, so the weights, not the Python runtime, dominate memory), NF4 base, LoRA r16 on every linear
projection, gradient checkpointing on (the recipe's settings). Data: real Anthropic hh-rlhf pairs
(../shared/data/hh_rlhf_harmless_base_test_1k.jsonl), the same pairs, steps and seed for every mode.

  separate     the recipe (ipex-llm's DPO example): a second NF4 copy of the base as TRL's ref_model
  peft         one base copy; the reference is the base with TRL's frozen copy of the starting adapter,
               run inside every training step
  precomputed  one base copy; the reference stage computes the reference once (reported separately: it is
               cached, so a retry or a new beta pays nothing) and training runs no reference pass

Each mode trains in its own `python -m loraflow.train` process. Memory = that process's peak RSS minus its
peak RSS after importing its libraries, before any model or data (the trainer records both); step time =
training time / steps.
"""

from __future__ import annotations

import sys

# This folder holds bench/tokenize.py, which would shadow the standard library's `tokenize` for a script run
# from here: drop the folder from sys.path before anything else is imported.
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--workdir", default=None, help="keeps the built model between runs (default: a temporary folder)")
    args = parser.parse_args()

    from loraflow import stages
    from loraflow.config_loader import build_config
    from loraflow.data.formats import read_rows
    from loraflow.launch import Topology, build_command, run_streaming
    from loraflow.models.tiny import build_tiny_llama, sample_texts

    work = Path(args.workdir or tempfile.mkdtemp(prefix="loraflow-bench-dpo-"))
    model = work / f"llama-h{args.hidden}-l{args.layers}"
    if not (model / "config.json").exists():
        print(f"building a {args.hidden} x {args.layers} model in {model}", flush=True)
        build_tiny_llama(model, sample_texts(read_rows(str(REPO / "loraflow/data/sample/alpaca_gpt4_sample.json"))),
                         hidden_size=args.hidden, layers=args.layers, heads=max(4, args.hidden // 128))
    from transformers import AutoConfig

    shape = AutoConfig.from_pretrained(model)
    parameters = shape.num_hidden_layers * (4 * shape.hidden_size ** 2 + 3 * shape.hidden_size * shape.intermediate_size) \
        + 2 * shape.vocab_size * shape.hidden_size
    pairs = work / f"hh{args.pairs}.jsonl"
    pairs.write_text("\n".join((SHARED / "hh_rlhf_harmless_base_test_1k.jsonl").read_text().splitlines()[:args.pairs]) + "\n")
    print(f"model: {parameters / 1e9:.2f}B parameters", flush=True)

    results = {}
    for mode, reference in (("separate", "separate"), ("peft", "adapter-disabled"), ("precomputed", "precomputed")):
        config = build_config({
            "name": f"bench-{mode}", "objective": "dpo", "storage": str(work / "store"), "model": {"base": str(model)},
            "data": {"path": str(pairs)}, "dpo": {"max_prompt_length": args.max_length // 2, "max_length": args.max_length, "reference": reference},
            "train": {"learning_rate": 5e-5, "batch_size": 4, "micro_batch_size": 4, "max_steps": args.steps, "save_steps": 10_000,
                      "warmup": 0, "seed": 7,
                      # The settings the README's figures were measured with (before auto precision/checkpointing).
                      "precision": "fp32", "gradient_checkpointing": "on"},
            "lora": {"dropout": 0.05},
            "merge": {"enabled": False},
        }).for_run()
        started = time.time()
        store, key, run, spec_uri = stages.prepare_training(config, log=lambda line: None)
        prepared = time.time() - started
        ref_stage = next((f for f in (work / "store" / "reference").glob("*/_manifest.json")), None)
        lines: list[str] = []
        code = run_streaming(build_command(Topology(), spec_uri), lines.append, timeout=3600)
        if code != 0:
            print("\n".join(lines[-40:]))
            return 1
        summary = json.loads((Path(store.path(run)) / "checkpoints/final/train_summary.json").read_text())
        results[mode] = {"memory_mb": summary["peak_rss_mb"] - summary["imports_rss_mb"], "peak_rss_mb": summary["peak_rss_mb"],
                         "imports_rss_mb": summary["imports_rss_mb"],
                         "step_s": summary["train_runtime_s"] / summary["global_step"], "reference_forwards": summary["reference_forwards"],
                         "prepare_s": prepared, "ref_stage": bool(ref_stage)}
        print(f"{mode:>11}: memory {results[mode]['memory_mb']:.0f} MB (peak RSS {summary['peak_rss_mb']:.0f}, "
              f"after imports {summary['imports_rss_mb']:.0f}), "
              f"step {results[mode]['step_s']:.1f} s, reference passes in training {summary['reference_forwards']}, "
              f"stages before training {prepared:.0f} s", flush=True)

    a, b, c = results["separate"], results["peft"], results["precomputed"]
    print(f"\npeft vs separate, memory: {b['memory_mb'] / a['memory_mb']:.2f}x (target <= 0.6)")
    print(f"precomputed vs peft, step time: {c['step_s'] / b['step_s']:.2f}x (target <= 0.7)")
    print(f"precomputed vs separate, memory: {c['memory_mb'] / a['memory_mb']:.2f}x")
    print(json.dumps({"parameters": parameters, **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
