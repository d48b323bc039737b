"""Data-stage tokenization vs the seeds' recipe, measured in the same run.

    .venv/bin/python bench/tokenize.py [--rows 20000] [--cutoff 256]

Rows: the 999 real Alpaca-GPT4 rows of ../shared/data/alpaca_gpt4_en_demo_1k.json, repeated to reach
--rows (there are no 20k distinct real rows on disk; repetition does not help either side: neither caches).
Tokenizer: the real GPT-2 byte-level BPE (../shared/data/tokenizers/gpt2_tokenizer.json).

Compared, each from rows in memory to token ids + labels:
  recipe   alpaca-lora's generate_and_tokenize_prompt through a per-example `datasets.map` (one
           tokenizer call per row, two when the prompt is masked), as in alpaca-lora / ipex-llm
  loraflow format + one `encode_batch` over all rows + numpy label masking + an Arrow table
  raw      the fast tokenizer's `encode_batch` on the full texts alone (the ceiling)
Token ids must be identical between recipe and loraflow; the benchmark fails if they are not.
"""

from __future__ import annotations

import sys

# Run as a script, this file's folder comes first on sys.path and its name shadows the standard
# library's `tokenize` (which `inspect` imports); drop the folder before anything else is imported.
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from loraflow.data.formats import format_alpaca
from loraflow.data.templates import alpaca_template
from loraflow.data.tokenize import load_tokenizer, to_table, tokenize

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def recipe(rows, tokenizer, cutoff_len, train_on_inputs):
    """alpaca-lora finetune.py's tokenization, verbatim in logic, through datasets.map (not batched)."""
    from datasets import Dataset

    template = alpaca_template("alpaca")

    def tokenize_one(prompt, add_eos_token=True):
        result = tokenizer(prompt, truncation=True, max_length=cutoff_len, padding=False, return_tensors=None)
        if result["input_ids"][-1] != tokenizer.eos_token_id and len(result["input_ids"]) < cutoff_len and add_eos_token:
            result["input_ids"].append(tokenizer.eos_token_id)
            result["attention_mask"].append(1)
        result["labels"] = result["input_ids"].copy()
        return result

    def generate_and_tokenize_prompt(point):
        full = tokenize_one(template.prompt(point["instruction"], point["input"]) + point["output"])
        if not train_on_inputs:
            user = tokenize_one(template.prompt(point["instruction"], point["input"]))
            user_len = len(user["input_ids"]) - 1  # alpaca-lora: add_eos_token → the prompt's EOS is not part of it
            full["labels"] = [-100] * user_len + full["labels"][user_len:]
        return full

    dataset = Dataset.from_list(rows)
    return dataset.map(generate_and_tokenize_prompt, remove_columns=dataset.column_names, load_from_cache_file=False)


def loraflow_stage(rows, tokenizer, cutoff_len, train_on_inputs):
    formatted = format_alpaca("bench", rows, "alpaca", train_on_inputs)
    ids, labels, starts, _, _ = tokenize(formatted.texts, formatted.spans, tokenizer, cutoff_len, add_eos=True)
    return to_table(ids, labels, starts, np.arange(len(formatted.texts)))


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--cutoff", type=int, default=256)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

    base = json.loads((SHARED / "alpaca_gpt4_en_demo_1k.json").read_text())
    rows = (base * (args.rows // len(base) + 1))[: args.rows]
    from transformers import PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory() as folder:
        PreTrainedTokenizerFast(tokenizer_file=str(SHARED / "tokenizers" / "gpt2_tokenizer.json"),
                                eos_token="<|endoftext|>", unk_token="<|endoftext|>").save_pretrained(folder)
        tokenizer = load_tokenizer(folder)

    print(f"{len(rows)} alpaca rows ({len(base)} real rows repeated), GPT-2 tokenizer, cutoff {args.cutoff}, {os.cpu_count()} cores")
    texts = format_alpaca("bench", rows, "alpaca", True).texts
    raw, raw_s = timed(tokenizer.backend_tokenizer.encode_batch, texts)
    total_tokens = sum(len(e.ids) for e in raw)
    print(f"  raw encode_batch on full texts: {len(rows) / raw_s:10,.0f} rows/s  {total_tokens / raw_s:12,.0f} tokens/s")

    for train_on_inputs in (True, False):
        ours, ours_s = timed(loraflow_stage, rows, tokenizer, args.cutoff, train_on_inputs)
        theirs, theirs_s = timed(recipe, rows, tokenizer, args.cutoff, train_on_inputs)
        our_ids = ours.column("input_ids").to_pylist()
        if our_ids != theirs["input_ids"]:
            raise SystemExit("token ids differ between loraflow and the recipe")
        label_rows_differ = sum(a != b for a, b in zip(ours.column("labels").to_pylist(), theirs["labels"]))
        tokens = sum(map(len, our_ids))
        mode = "train_on_inputs" if train_on_inputs else "prompt masked  "
        print(f"  {mode}  recipe:   {len(rows) / theirs_s:10,.0f} rows/s  {tokens / theirs_s:12,.0f} tokens/s  ({theirs_s:.2f} s)")
        print(f"  {mode}  loraflow: {len(rows) / ours_s:10,.0f} rows/s  {tokens / ours_s:12,.0f} tokens/s  ({ours_s:.2f} s)"
              f"  → {theirs_s / ours_s:.2f}x the recipe; token ids identical; label rows differing: {label_rows_differ}")
    print(f"  raw encode_batch alone is {theirs_s / raw_s:.2f}x the (masked) recipe: the ceiling for any tokenizing stage")


if __name__ == "__main__":
    main()
