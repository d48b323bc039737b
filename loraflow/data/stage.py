"""The dataset stage both objectives run: read → resolve the shape → the objective's examples → split → parquet + stats.

What differs between objectives is only how a shape's rows become tokenized examples (SFT: texts with trained spans,
loraflow.data.sft; preference pairs: prompt/chosen/rejected ids, loraflow.data.preference); that is the `examples`
function `build_dataset` is given. Reading, shape resolution, the seeded validation split, the parquet files, the
saved tokenizer and the common statistics are here once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from loraflow.data.formats import Rows, read_rows
from loraflow.data.shapes import Shape, resolve_data, shape_named
from loraflow.data.split import split_validation
from loraflow.data.tokenize import load_tokenizer
from loraflow.errors import LoraflowError

if TYPE_CHECKING:
    from loraflow.config import DataSettings


@dataclass
class Examples:
    """A file's rows as an objective's tokenized examples."""

    usable: np.ndarray  # the indices of the examples that can be trained on
    dropped: dict[str, int]  # rows left out, by reason
    write: Callable[[Path, np.ndarray], None]  # writes one split's parquet file: the examples of these indices
    stats: dict  # the objective's own statistics (lengths, truncation, template, …)
    none_usable: str  # the error when no example is usable


# (data settings with format and template resolved, the shape, the rows, the tokenizer, log) → Examples
MakeExamples = Callable[["DataSettings", Shape, Rows, object, Callable[[str], None]], Examples]


def build_dataset(data: DataSettings, objective: str, tokenizer_path: str, out_dir, examples: MakeExamples,
                  log=print) -> dict:
    """Write train.parquet, val.parquet (when data.val_set_size holds any out), tokenizer/ and stats.json into out_dir;
    return the statistics."""
    out_dir = Path(out_dir)
    rows = read_rows(data.path)
    rows_read, under = len(rows), rows.under
    if under:
        log(f"{data.path}: {rows.note}")
    data = resolve_data(data, objective, rows)  # (a flow's config is resolved already: the same values, checked again)
    tokenizer = load_tokenizer(tokenizer_path, data.new_tokens)
    made = examples(data, shape_named(data.format), rows, tokenizer, log)
    del rows  # (the SFT examples free each row once it is tokenized; the list itself goes here)
    if len(made.usable) == 0:
        raise LoraflowError(made.none_usable)
    val_rows, train_rows, val_note = split_validation(made.usable, data.val_set_size, data.seed)
    if val_note:
        log(val_note)
    out_dir.mkdir(parents=True, exist_ok=True)
    made.write(out_dir / "train.parquet", train_rows)
    if len(val_rows):
        made.write(out_dir / "val.parquet", val_rows)
    tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    stats = {
        "source": data.path,
        "format": data.format,
        "rows_read": rows_read,
        "rows_kept": int(len(made.usable)),
        "rows_dropped": made.dropped,
        "train_rows": int(len(train_rows)),
        "val_rows": int(len(val_rows)),
        **({"val_note": val_note} if val_note else {}),
        **made.stats,
        "pad_token": tokenizer.pad_token,
        "pad_token_id": tokenizer.pad_token_id,
        "new_token_ids": {token: tokenizer.convert_tokens_to_ids(token) for token in data.new_tokens},
        "tokenizer_class": type(tokenizer).__name__,
    } | ({"rows_under_key": under} if under else {})
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def token_length_percentiles(lengths) -> dict[str, int]:
    return {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 95, 99)} | {"max": int(np.max(lengths))}
