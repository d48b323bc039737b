"""SFT examples: a shape's rows → texts with trained spans (its formatter and template) → token ids and labels.

The objective-specific half of the SFT dataset stage (loraflow.data.stage runs the rest): rows are formatted and
tokenized a chunk at a time, a row whose labels are all masked within cutoff_len is left out, and a split's parquet
holds input_ids and labels per row.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from loraflow.data.stage import Examples, build_dataset, token_length_percentiles
from loraflow.data.templates import template_markers_not_in_vocabulary
from loraflow.data.tokenize import tokenize, write_parquet

if TYPE_CHECKING:
    from loraflow.config import DataSettings
    from loraflow.data.shapes import Shape

# Rows formatted and tokenized at a time. The tokenizer's encodings take about 140 bytes a token (ids, offsets, token
# strings), so all 200k Alpaca rows at once held 6.5 GB; a chunk's are freed once its ids and labels are kept as int32
# arrays (8 bytes a token). 4,096 rows still keep encode_batch's threads busy.
CHUNK_ROWS = 4096


def _joined(chunks: list[tuple]) -> tuple:
    """The chunks' (ids, labels, row lengths, full_lengths, truncated, label_counts) as (ids, labels, row_starts,
    full_lengths, truncated, label_counts) over all rows."""
    if not chunks:
        return (np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros(0, np.int64),
                np.zeros(0, bool), np.zeros(0, np.int64))
    ids, labels, lengths, full_lengths, truncated, label_counts = (np.concatenate(parts) for parts in zip(*chunks))
    return ids, labels, np.concatenate([[0], np.cumsum(lengths)]), full_lengths, truncated, label_counts


def sft_examples(data: DataSettings, shape: Shape, rows: list, tokenizer, log) -> Examples:
    train_on_inputs = data.effective_train_on_inputs
    split_markers = template_markers_not_in_vocabulary(data.template, tokenizer)
    if split_markers:
        log(f"warning: the {data.template} template's markers {', '.join(split_markers)} are not tokens of this tokenizer "
            f"({type(tokenizer).__name__}): they are trained as plain multi-token text. Add them as new tokens "
            f"(data.new_tokens: {json.dumps(split_markers)}), use a base whose tokenizer has them, or a template it knows "
            "(vicuna_v1.1 needs no special tokens).")
    if len(rows) > 2 * CHUNK_ROWS:
        log(f"read {len(rows):,} rows from {data.path}; formatting and tokenizing {CHUNK_ROWS:,} at a time")

    rows_read = len(rows)
    chunks, dropped, formatted_count = [], Counter(), 0
    for first in range(0, rows_read, CHUNK_ROWS):
        chunk = rows[first:first + CHUNK_ROWS]
        rows[first:first + CHUNK_ROWS] = [None] * len(chunk)  # each row's objects are freed once its chunk is done
        formatted = shape.format_rows(data.path, chunk, data.template, train_on_inputs, tokenizer.eos_token, first)
        dropped.update(formatted.dropped)
        formatted_count += len(formatted.texts)
        if formatted.texts:
            ids, labels, row_starts, full_lengths, truncated = tokenize(formatted.texts, formatted.spans, tokenizer,
                                                                        data.cutoff_len, data.add_eos)
            # (trained tokens per row counted here, on a chunk: on all rows at once numpy's reduceat copies every label)
            label_counts = np.add.reduceat(labels != -100, row_starts[:-1])
            chunks.append((ids.astype(np.int32), labels.astype(np.int32), np.diff(row_starts), full_lengths, truncated, label_counts))
        done = min(first + CHUNK_ROWS, rows_read)
        if rows_read > 2 * CHUNK_ROWS and (10 * done // rows_read > 10 * first // rows_read):  # about every tenth
            log(f"tokenized {done:,} of {rows_read:,} rows")
    log(f"formatted {formatted_count:,} of {rows_read:,} rows with template {data.template!r}")
    ids, labels, row_starts, full_lengths, truncated, label_counts = _joined(chunks)
    del chunks
    usable = np.flatnonzero(label_counts > 0)
    dropped = dict(dropped)
    no_labels = formatted_count - len(usable)
    if no_labels:
        dropped["no trained tokens within cutoff_len"] = no_labels
    reasons = ", ".join(f"{count} {reason}" for reason, count in dropped.items()) or "none"
    kept_tokens = int((row_starts[1:] - row_starts[:-1])[usable].sum())
    stats = {} if not len(usable) else {
        "truncated_rows": int(truncated[usable].sum()),
        "cutoff_len": data.cutoff_len,
        "token_length_percentiles": token_length_percentiles(full_lengths[usable]),
        "tokens": kept_tokens,
        "label_token_fraction": round(float(label_counts[usable].sum()) / kept_tokens, 4),
        "train_on_inputs": train_on_inputs,
        "template": data.template,
        "pad_is_eos": tokenizer.pad_token_id == tokenizer.eos_token_id,
        "max_token_id": int(ids.max()) if len(ids) else -1,
        "template_markers_split": split_markers,
    }
    return Examples(
        usable=usable, dropped=dropped, stats=stats,
        write=lambda path, picked: write_parquet(path, ids, labels, row_starts, picked),
        none_usable=(f"{data.path}: no usable rows after filtering ({rows_read} read; dropped: {reasons}); "
                     "check data.format, data.template and data.cutoff_len"),
    )


def prepare_dataset(data: DataSettings, tokenizer_path: str, out_dir: Path, log=print) -> dict:
    """The SFT dataset stage: train.parquet, val.parquet (if val_set_size), tokenizer/ and stats.json in out_dir."""
    return build_dataset(data, "sft", tokenizer_path, out_dir, sft_examples, log)
