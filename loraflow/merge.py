"""Merge: fold the adapter into a full-precision copy of the base and prove the result is right.

The base is reloaded at bf16/fp32 (never 4-bit: merging into NF4 weights would requantize them).
Before saving, the merged model's logits on a few validation rows are compared with base+adapter
(unmerged) at the same precision. The difference is pure rounding of W + s·BA versus W·x + s·B(A·x):
fp32 allows 1e-4 and bf16 2e-2 of the logits' scale (max |logit|, at least 1). Outside that the stage
fails; it never reports success after an error, as the seeds' merge script did.
"""

from __future__ import annotations

from pathlib import Path

import torch

from loraflow.errors import LoraflowError
from loraflow.models import native

TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}


def merge_adapter(base_path: Path, adapter_dir: Path, out_dir: Path, device: str, precision: str,
                  check_rows: list[list[int]], trust_remote_code: bool = False) -> dict:
    from transformers import AutoTokenizer

    if precision not in TOLERANCE:
        raise LoraflowError(f"merge precision {precision} is not supported; use bf16 or fp32")
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))  # the run's (with any tokens it added)
    base = native.load_causal_lm(base_path, device, precision, None, trust_remote_code)
    model = native.with_adapter(base, adapter_dir, tokenizer).eval()
    batch = [torch.tensor([row], device=base.device) for row in check_rows]
    with torch.no_grad():
        reference = [model(input_ids=ids).logits.float() for ids in batch]
        merged = model.merge_and_unload()
        after = [merged(input_ids=ids).logits.float() for ids in batch]
    difference = max(float((a - r).abs().max()) for a, r in zip(after, reference))
    scale = max(1.0, max(float(r.abs().max()) for r in reference))
    allowed = TOLERANCE[precision] * scale
    if not difference <= allowed:
        raise LoraflowError(
            f"merged model disagrees with base+adapter: max |logit difference| {difference:.3g} > {allowed:.3g} "
            f"({precision}); the merged model was not saved. The trained adapter itself is committed and usable "
            f"({adapter_dir}); set merge.enabled: false to skip merging"
        )
    merged.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return {"max_abs_logit_diff": difference, "tolerance": allowed, "check_rows": len(check_rows), "dtype": precision}
