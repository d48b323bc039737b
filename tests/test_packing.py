"""Packed micro batches (train.packing) train exactly what padded ones do: same loss, same gradients."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from loraflow.config import DataSettings
from loraflow.data.sft import prepare_dataset
from loraflow.data.packing import PackedCollator, pack_into_rows

REPO = Path(__file__).resolve().parents[1]


def test_best_fit_decreasing_fills_rows_and_gives_an_overlong_example_its_own_row():
    # Longest first, each into the row it fills best: 300 alone (longer than a row), 250 alone (6 left), 200 then
    # 30 and 10 (16 left), 100 then 60.
    assert pack_into_rows([100, 30, 250, 60, 200, 10, 300], row_tokens=256) == [[6], [2], [4, 1, 5], [0, 3]]


@pytest.fixture(scope="module")
def rows(tiny_model, tmp_path_factory):
    """Real tokenized rows of the data stage (Alpaca sample, prompts masked), lengths from a few dozen to 256."""
    out = tmp_path_factory.mktemp("packing")
    data = DataSettings(path=str(REPO / "loraflow/data/sample/alpaca_gpt4_sample.json"), cutoff_len=256, val_set_size=0)
    prepare_dataset(data, str(tiny_model), out, log=lambda _: None)
    return pq.read_table(out / "train.parquet").slice(0, 12).to_pylist()


def _loss_and_grads(model, batch, num_items):
    model.zero_grad()
    # The model as loaded (use_cache on): a packed batch must switch the cache off itself, or transformers builds no
    # block-diagonal mask from the positions and the examples attend to each other.
    loss = model(**batch, num_items_in_batch=num_items).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_packed_loss_and_gradients_equal_the_padded_ones(rows, tiny_model, tokenizer):
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32, attn_implementation="sdpa")
    assert model.config.use_cache
    features = [{"input_ids": row["input_ids"], "labels": row["labels"]} for row in rows]
    padded = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)(features)
    packed = PackedCollator(tokenizer.pad_token_id, row_tokens=256)(features)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # fewer rows: the point of packing
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    assert "attention_mask" not in packed  # the block-diagonal mask comes from the position ids
    # The Trainer's count of trained tokens (labels[..., 1:] != -100) is the same for both.
    trained = int(padded["labels"][..., 1:].ne(-100).sum())
    assert int(packed["labels"][..., 1:].ne(-100).sum()) == trained

    padded_loss, padded_grads = _loss_and_grads(model, padded, trained)
    packed_loss, packed_grads = _loss_and_grads(model, packed, trained)
    assert torch.allclose(packed_loss, padded_loss, rtol=1e-5, atol=1e-6), (packed_loss, padded_loss)
    assert padded_grads.keys() == packed_grads.keys()
    for name, grad in padded_grads.items():
        assert torch.allclose(packed_grads[name], grad, rtol=1e-4, atol=1e-6), name

    # Without the restarting positions the examples would attend to each other and the loss would differ.
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]))
    leaky_loss, _ = _loss_and_grads(model, leaky, trained)
    assert not torch.allclose(leaky_loss, padded_loss, rtol=1e-4)
