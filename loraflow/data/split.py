"""The train/validation split both data stages (SFT rows, preference pairs) make: seeded, and scaled to the data.

`data.val_set_size` is a number of rows (alpaca-lora's 2000 of 52k, the demo's 20 of 200). On a small upload the same
number would take most of the rows (20 of 28 left 8 to train on), so it is capped at `MAX_VALIDATION_SHARE` of the
usable rows, and the cap is said in the log and the run's summary.
"""

from __future__ import annotations

import numpy as np

# At most a fifth of the rows for validation: 80/20 is the largest split the common recipes use.
MAX_VALIDATION_SHARE = 0.2


def validation_size(requested: int, usable: int) -> tuple[int, str | None]:
    """(rows to hold out, a note when fewer than requested are)."""
    cap = int(usable * MAX_VALIDATION_SHARE)
    if requested <= cap:
        return requested, None
    if cap == 0:
        return 0, (f"no validation split: data.val_set_size {requested}, but {usable} usable rows are too few to hold any "
                   f"out (at most {MAX_VALIDATION_SHARE:.0%} of them are)")
    return cap, (f"validation split of {cap} rows, not data.val_set_size {requested}: at most {MAX_VALIDATION_SHARE:.0%} of "
                 f"the {usable} usable rows are held out")


def split_validation(usable: np.ndarray, requested: int, seed: int) -> tuple[np.ndarray, np.ndarray, str | None]:
    """(validation indices, training indices, note) of `usable` row indices, each sorted."""
    size, note = validation_size(requested, len(usable))
    order = np.random.default_rng(seed).permutation(usable)
    return np.sort(order[:size]), np.sort(order[size:]), note


def training_subset(rows: int, used: int, seed: int) -> np.ndarray | None:
    """The training rows a run that stops at max_steps reaches (`used` of `rows`, a seeded choice, sorted), or None
    when it reaches them all. A run of 10 steps × batch 8 sees 80 pairs whichever they are: choosing them here lets
    the reference stage compute log-probs for those 80 instead of every pair of the split."""
    if used >= rows:
        return None
    return np.sort(np.random.default_rng(seed).permutation(rows)[:used])
