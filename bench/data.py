"""The SFT data stage at scale: rows/s and peak RSS at 20k and 200k rows.

    .venv/bin/python bench/data.py [--rows 20000 200000]

Rows: the 999 real Alpaca-GPT4 rows of ../shared/data repeated to the count (there are not 200k distinct real rows
on disk), written as one JSON file; GPT-2's tokenizer (../shared/data/tokenizers/gpt2_tokenizer.json), cutoff 256,
prompt masked, 1% validation. Each measurement is `loraflow.data.sft.prepare_dataset` (read → format → tokenize and
mask → split → parquet) in a fresh process, so its peak RSS is its own.
"""

from __future__ import annotations

import sys

_HERE = __file__.rsplit("/", 1)[0]
sys.path[:] = [p for p in sys.path if p not in ("", _HERE)]

import argparse
import json
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def measure(data: str, tokenizer: str, out: str, val_rows: int) -> None:
    """In the child process: run the stage once and print its figures as JSON."""
    from loraflow.config import DataSettings
    from loraflow.data.sft import prepare_dataset

    imports_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.time()
    stats = prepare_dataset(DataSettings(path=data, format="alpaca", template="alpaca", cutoff_len=256,
                                         val_set_size=val_rows, train_on_inputs="no"), tokenizer, Path(out), log=lambda _: None)
    elapsed = time.time() - started
    print(json.dumps({"seconds": elapsed, "rows": stats["rows_read"], "tokens": stats["tokens"],
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "imports_rss_mb": imports_rss}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        measure(*sys.argv[2:5], int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loraflow-bench-data-"))
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_file=str(SHARED / "tokenizers" / "gpt2_tokenizer.json"),
                            eos_token="<|endoftext|>", unk_token="<|endoftext|>").save_pretrained(str(work / "tokenizer"))
    base = json.loads((SHARED / "alpaca_gpt4_en_demo_1k.json").read_text())
    print(f"Alpaca rows ({len(base)} real rows repeated), GPT-2 tokenizer, cutoff 256, prompt masked; {os.cpu_count()} cores")
    print(f"{'rows':>8} {'rows/s':>9} {'tokens/s':>11} {'seconds':>8} {'peak RSS MB':>12} {'above imports':>14}")
    for count in args.rows:
        data = work / f"rows-{count}.json"
        data.write_text(json.dumps((base * (count // len(base) + 1))[:count]))
        line = subprocess.run([sys.executable, __file__, "--child", str(data), str(work / "tokenizer"),
                               str(work / f"out-{count}"), str(count // 100)],
                              check=True, capture_output=True, text=True,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "true"}).stdout.strip().splitlines()[-1]
        m = json.loads(line)
        print(f"{count:>8,} {m['rows'] / m['seconds']:>9,.0f} {m['tokens'] / m['seconds']:>11,.0f} "
              f"{m['seconds']:>8.1f} {m['peak_rss_mb']:>12,.0f} {m['peak_rss_mb'] - m['imports_rss_mb']:>14,.0f}")
    print(f"(work folder: {work})")


if __name__ == "__main__":
    main()
