"""Dataset stage logic: read → format with a template → tokenize + mask → split → parquet + stats."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from loraflow.config import DataSettings
from loraflow.data.split import split_validation
from loraflow.data.formats import format_alpaca, format_conversations, read_rows
from loraflow.data.shapes import resolve_data
from loraflow.data.templates import template_markers_not_in_vocabulary
from loraflow.data.tokenize import load_tokenizer, tokenize, write_parquet
from loraflow.errors import LoraflowError

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


def prepare_dataset(data: DataSettings, tokenizer_path: str, out_dir: Path, log=print) -> dict:
    """Write train.parquet, val.parquet (if val_set_size), tokenizer/ and stats.json into out_dir."""
    rows = read_rows(data.path)
    if rows_under := rows.under:
        log(f"{data.path}: {rows.note}")
    if len(rows) > 2 * CHUNK_ROWS:
        log(f"read {len(rows):,} rows from {data.path}; formatting and tokenizing {CHUNK_ROWS:,} at a time")
    data = resolve_data(data, "sft", rows)  # (a flow's config is resolved already: the same values, checked again)
    tokenizer = load_tokenizer(tokenizer_path, data.new_tokens)
    train_on_inputs = data.effective_train_on_inputs
    split_markers = template_markers_not_in_vocabulary(data.template, tokenizer)
    if split_markers:
        log(f"warning: the {data.template} template's markers {', '.join(split_markers)} are not tokens of this tokenizer "
            f"({type(tokenizer).__name__}): they are trained as plain multi-token text. Add them as new tokens "
            f"(data.new_tokens: {json.dumps(split_markers)}), use a base whose tokenizer has them, or a template it knows "
            "(vicuna_v1.1 needs no special tokens).")

    rows_read = len(rows)
    chunks, dropped, formatted_count = [], Counter(), 0
    for first in range(0, rows_read, CHUNK_ROWS):
        chunk = rows[first:first + CHUNK_ROWS]
        rows[first:first + CHUNK_ROWS] = [None] * len(chunk)  # each row's objects are freed once its chunk is done
        if data.format == "alpaca":
            formatted = format_alpaca(data.path, chunk, data.template, train_on_inputs, first_index=first)
        else:
            formatted = format_conversations(data.path, chunk, data.format, data.template, train_on_inputs,
                                             tokenizer.eos_token, first_index=first)
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
    del rows
    log(f"formatted {formatted_count:,} of {rows_read:,} rows with template {data.template!r}")
    ids, labels, row_starts, full_lengths, truncated, label_counts = _joined(chunks)
    del chunks
    usable = np.flatnonzero(label_counts > 0)
    dropped = dict(dropped)
    no_labels = formatted_count - len(usable)
    if no_labels:
        dropped["no trained tokens within cutoff_len"] = no_labels
    if len(usable) == 0:
        reasons = ", ".join(f"{count} {reason}" for reason, count in dropped.items()) or "none"
        raise LoraflowError(
            f"{data.path}: no usable rows after filtering ({rows_read} read; dropped: {reasons}); "
            "check data.format, data.template and data.cutoff_len"
        )
    val_rows, train_rows, val_note = split_validation(usable, data.val_set_size, data.seed)
    if val_note:
        log(val_note)

    out_dir.mkdir(parents=True, exist_ok=True)
    write_parquet(out_dir / "train.parquet", ids, labels, row_starts, train_rows)
    if len(val_rows):
        write_parquet(out_dir / "val.parquet", ids, labels, row_starts, val_rows)
    tokenizer.save_pretrained(str(out_dir / "tokenizer"))

    lengths = full_lengths[usable]
    kept_tokens = int((row_starts[1:] - row_starts[:-1])[usable].sum())
    stats = {
        "source": data.path,
        "format": data.format,
        "rows_read": rows_read,
        "rows_kept": int(len(usable)),
        "rows_dropped": dropped,
        "train_rows": int(len(train_rows)),
        "val_rows": int(len(val_rows)),
        **({"val_note": val_note} if val_note else {}),
        "truncated_rows": int(truncated[usable].sum()),
        "cutoff_len": data.cutoff_len,
        "token_length_percentiles": {
            f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 95, 99)
        } | {"max": int(lengths.max())},
        "tokens": kept_tokens,
        "label_token_fraction": round(float(label_counts[usable].sum()) / kept_tokens, 4),
        "train_on_inputs": train_on_inputs,
        "template": data.template,
        "pad_token": tokenizer.pad_token,
        "pad_token_id": tokenizer.pad_token_id,
        "pad_is_eos": tokenizer.pad_token_id == tokenizer.eos_token_id,
        "max_token_id": int(ids.max()) if len(ids) else -1,
        "new_token_ids": {token: tokenizer.convert_tokens_to_ids(token) for token in data.new_tokens},
        "tokenizer_class": type(tokenizer).__name__,
        "template_markers_split": split_markers,
    } | ({"rows_under_key": rows_under} if rows_under else {})
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats
