"""Padding-free micro batches (`train.packing`): the examples of a micro batch packed into as few rows as fit.

A padded micro batch of B examples is B rows as long as its longest example; most of it is padding when lengths
vary (instruction data: a few hundred tokens beside a few dozen). Packed, the same B examples are laid end to end
in rows of at most `row_tokens` tokens (best fit, longest first), each example's position ids restarting at 0, so
transformers builds a block-diagonal causal mask from the position ids (masking_utils.find_packed_sequence_indices;
no attention_mask is passed): no token attends across examples. The first label of every example is ignored, so the
last token of one example is never trained to predict the first of the next. The loss is the padded loss: the same
trained tokens, summed and divided by their count (the Trainer counts `labels[..., 1:] != -100`, equal in both).

Why not TRL's packing (`pack_dataset`, SFTTrainer's `packing=True`): it packs the whole dataset before training, so a
step's batch becomes rows, not the configured number of examples, and a packed run optimises differently from the
padded one. Packing inside each micro batch keeps batch_size's meaning (examples per step), and the loss and
gradients of a step equal the padded ones (tests/test_packing.py).
"""

from __future__ import annotations

import torch

IGNORE = -100


def pack_into_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """Indices of the examples in each row: best-fit decreasing (each example, longest first, into the row whose
    room it fills best; a new row when none has room). An example longer than row_tokens gets a row of its own."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [r for r in range(len(rows)) if room[r] >= lengths[index]]
        if fits:
            best = min(fits, key=lambda r: room[r])
            rows[best].append(index)
            room[best] -= lengths[index]
        else:
            rows.append([index])
            room.append(row_tokens - lengths[index])
    return rows


class PackedCollator:
    """Collates tokenized examples (input_ids, labels) into packed rows: input_ids, labels, position_ids, and
    use_cache=False: with a KV cache transformers builds no block-diagonal mask from the position ids, so a packed batch
    says so itself rather than rely on every caller having switched the cache off."""

    def __init__(self, pad_token_id: int, row_tokens: int, pad_to_multiple_of: int = 8):
        self.pad_token_id = pad_token_id
        self.row_tokens = row_tokens
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(feature["input_ids"]) for feature in features]
        rows = pack_into_rows(lengths, self.row_tokens)
        width = max(sum(lengths[i] for i in row) for row in rows)
        width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for index in row:
                n = lengths[index]
                input_ids[r, start:start + n] = torch.as_tensor(features[index]["input_ids"])
                labels[r, start + 1:start + n] = torch.as_tensor(features[index]["labels"][1:])
                position_ids[r, start:start + n] = torch.arange(n)
                start += n
            # The padding is a segment of its own (positions restart), so it is masked off like another example.
            position_ids[r, start:] = torch.arange(width - start)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "use_cache": False}
