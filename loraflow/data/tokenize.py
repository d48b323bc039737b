"""Batched tokenization with label masking, truncation and EOS, plus the dataset statistics.

All rows go through the fast tokenizer's `encode_batch` in one call (Rust, parallel), and the label
mask is computed for the whole batch at once with numpy: a token carries loss when it starts inside
a trained character span. No Python loop runs per token, and none calls the tokenizer per row.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa

from loraflow.errors import LoraflowError

IGNORE_INDEX = -100

# How many times the tokenizer was run in this process; tests read it to prove a cache hit did no work.
TOKENIZE_CALLS = 0


def load_tokenizer(path: str, new_tokens: list[str] | tuple = ()):
    """The model's fast tokenizer, with a pad token chosen so that padding never hides EOS from the loss, and
    new_tokens (data.new_tokens) added as special tokens: each one token, never split (the model's embeddings grow to
    match in the lora stage, native.fit_vocabulary).

    Padding is handled by DataCollatorForSeq2Seq, which pads labels with -100 rather than with the pad id,
    so reusing EOS as pad would be harmless there; still, collators that mask `labels == pad_id` exist,
    so an unused special token (unk) is preferred, and EOS is reused only when nothing else exists.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except ValueError as error:
        if "TokenizersBackend" not in str(error) or not (Path(path) / "tokenizer.json").is_file():
            raise LoraflowError(f"{path}: cannot load a tokenizer ({error})") from None
        tokenizer = _saved_by_newer_libraries(Path(path))
    except OSError as error:
        raise LoraflowError(f"{path}: cannot load a tokenizer ({error})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise LoraflowError(f"{path}: loraflow needs a fast tokenizer (tokenizer.json); this one is a slow tokenizer")
    if tokenizer.eos_token is None:
        raise LoraflowError(f"{path}: the tokenizer defines no EOS token; set eos_token in tokenizer_config.json")
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None and tokenizer.unk_token != tokenizer.eos_token:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if new_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(new_tokens)}, replace_extra_special_tokens=False)
    return tokenizer


def _saved_by_newer_libraries(path: Path):
    """A tokenizer the data stage saved (transformers 5, tokenizers >= 0.20), loaded in the ipex-llm backend's environment
    (transformers 4.36, tokenizers 0.15). Its class is saved as TokenizersBackend, which 4.36 does not know: the fast
    class reads the same tokenizer.json. Its BPE merges are [left, right] pairs, which tokenizers 0.15 reads only as
    "left right" strings: a copy is rewritten that way (the same merges; one with a space in a part is refused)."""
    import json
    import shutil
    import tempfile

    from transformers import PreTrainedTokenizerFast

    spec = json.loads((path / "tokenizer.json").read_text())
    merges = (spec.get("model") or {}).get("merges") or []
    if merges and isinstance(merges[0], list):
        if any(" " in part for pair in merges for part in pair):
            raise LoraflowError(f"{path}/tokenizer.json: a BPE merge has a space in it, which the tokenizers library of the "
                                "ipex-llm backend's environment cannot read; use model.backend: native for this model")
        spec["model"]["merges"] = [" ".join(pair) for pair in merges]
    with tempfile.TemporaryDirectory(prefix="loraflow-tokenizer-") as tmp:
        for file in path.iterdir():
            if file.is_file():
                shutil.copyfile(file, Path(tmp) / file.name)
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(spec))
        return PreTrainedTokenizerFast.from_pretrained(tmp)


def _first_token_from(encoding, position: int, text_length: int) -> int:
    """Index of the first token that starts at or after character `position`."""
    if position == 0:
        return 0  # leading special tokens (BOS) belong to a span that starts the text, as in alpaca-lora
    if position >= text_length:
        return len(encoding)
    token = encoding.char_to_token(position)
    if token is None:  # the character was normalised away (e.g. stripped whitespace): look at offsets
        return next((i for i, (start, end) in enumerate(encoding.offsets) if start >= position and end > start), len(encoding))
    return token if encoding.token_to_chars(token)[0] >= position else token + 1


def tokenize(texts: list[str], spans: list[list[tuple[int, int]]], tokenizer, cutoff_len: int, add_eos: bool):
    """Token ids and labels for every text, truncated to cutoff_len, as flat arrays plus row offsets.

    Returns (ids, labels, row_starts, full_lengths, truncated) where row i is
    ids[row_starts[i]:row_starts[i+1]] and full_lengths are the lengths before truncation.
    A token carries loss when it starts inside a trained character span.
    """
    global TOKENIZE_CALLS
    TOKENIZE_CALLS += 1
    backend = tokenizer.backend_tokenizer
    # Whole rows, unpadded: a tokenizer called with padding=True or truncation keeps them on its Rust backend until its
    # next call (transformers resets them per call the same way).
    backend.no_padding()
    backend.no_truncation()
    encodings = backend.encode_batch(texts, add_special_tokens=True)
    full_lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
    total = int(full_lengths.sum())
    ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int64, count=total)
    row_base = np.cumsum(full_lengths) - full_lengths

    # Each span becomes a token range [first, end) on the flat axis; a +1/-1 difference array summed
    # up marks every trained token at once. Only the span edges are looked up (two calls into the
    # Rust encoding per span), never every token's offsets.
    edges = np.array(
        [(row_base[row] + _first_token_from(e, start, len(text)), row_base[row] + _first_token_from(e, stop, len(text)))
         for row, (e, text, row_spans) in enumerate(zip(encodings, texts, spans)) for start, stop in row_spans],
        dtype=np.int64,
    ).reshape(-1, 2)
    marks = np.zeros(total + 1, dtype=np.int64)
    np.add.at(marks, edges[:, 0], 1)
    np.add.at(marks, edges[:, 1], -1)
    inside = np.cumsum(marks[:-1]) > 0

    position = np.arange(total) - np.repeat(row_base, full_lengths)
    keep = position < cutoff_len
    ids, inside = ids[keep], inside[keep]
    lengths = np.minimum(full_lengths, cutoff_len)
    truncated = full_lengths > cutoff_len

    if add_eos:
        eos = tokenizer.eos_token_id
        row_ends = np.cumsum(lengths)
        last_ids = np.where(lengths > 0, ids[np.maximum(row_ends - 1, 0)], -1)
        # alpaca-lora: append EOS when the row has room and does not already end with it. The EOS
        # is trained when the text's end is trained (the answer runs to the end of the text).
        needs_eos = (lengths < cutoff_len) & (last_ids != eos)
        end_trained = np.array([bool(s) and s[-1][1] == len(t) for s, t in zip(spans, texts)], dtype=bool)
        insert_at = row_ends[needs_eos]
        ids = np.insert(ids, insert_at, eos)
        inside = np.insert(inside, insert_at, end_trained[needs_eos])
        lengths = lengths + needs_eos
    labels = np.where(inside, ids, IGNORE_INDEX)
    row_starts = np.concatenate([[0], np.cumsum(lengths)])
    return ids, labels, row_starts, full_lengths, truncated


def to_table(ids: np.ndarray, labels: np.ndarray, row_starts: np.ndarray, rows: np.ndarray) -> pa.Table:
    """The selected rows as a parquet-ready table (input_ids, labels as int32 lists), built without a Python loop."""
    lengths = (row_starts[1:] - row_starts[:-1])[rows]
    new_starts = np.cumsum(lengths) - lengths
    # Where each kept token is in ids: its row's old start, plus its place in the new layout minus the row's new start
    # (built in place: one index array of the kept tokens, not four).
    token_index = np.repeat(row_starts[rows] - new_starts, lengths)
    token_index += np.arange(len(token_index))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids[token_index].astype(np.int32))),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(labels[token_index].astype(np.int32))),
        }
    )


ROWS_PER_GROUP = 20_000  # rows per parquet row group: to_table's index arrays stay small however many rows there are


def write_parquet(path: Path, ids: np.ndarray, labels: np.ndarray, row_starts: np.ndarray, rows: np.ndarray) -> None:
    """The selected rows as a parquet file, written a row group at a time."""
    import pyarrow.parquet as pq

    with pq.ParquetWriter(str(path), to_table(ids, labels, row_starts, rows[:0]).schema) as writer:
        for first in range(0, len(rows), ROWS_PER_GROUP):
            writer.write_table(to_table(ids, labels, row_starts, rows[first:first + ROWS_PER_GROUP]))


def save_tokenizer(tokenizer, folder: Path) -> None:
    tokenizer.save_pretrained(str(folder))
