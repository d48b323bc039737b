"""Templates are byte-identical to alpaca-lora's; labels carry loss exactly where the recipe says."""

import json

import numpy as np
import pytest

from loraflow.config import DataSettings
from loraflow.data.sft import prepare_dataset
from loraflow.data.formats import format_alpaca, format_conversations, read_rows
from loraflow.data.templates import VICUNA_SYSTEM, alpaca_template
from loraflow.data.tokenize import IGNORE_INDEX, load_tokenizer, tokenize
from loraflow.errors import LoraflowError


def rows_of(ids, labels, starts, i):
    return ids[starts[i] : starts[i + 1]].tolist(), labels[starts[i] : starts[i + 1]].tolist()


def test_alpaca_prompts_equal_the_published_alpaca_text_column(shared_data):
    # The first 100 Stanford Alpaca rows carry `text` = alpaca template prompt + output.
    rows = json.loads((shared_data / "alpaca_first100.json").read_text())
    template = alpaca_template("alpaca")
    assert sum(1 for r in rows if r["input"]) == 46
    for row in rows:
        assert template.prompt(row["instruction"], row["input"]) + row["output"] == row["text"]


@pytest.mark.parametrize("name", ["alpaca", "alpaca_legacy", "alpaca_short", "vigogne"])
def test_every_template_matches_the_reference_file(shared_data, name):
    reference = json.loads((shared_data / "templates" / f"{name}.json").read_text())
    template = alpaca_template(name)
    assert template.prompt("Sort {these}", "3, 1, 2") == reference["prompt_input"].format(instruction="Sort {these}", input="3, 1, 2")
    assert template.prompt("Say hi", "") == reference["prompt_no_input"].format(instruction="Say hi")


def test_alpaca_short_literal():
    assert alpaca_template("alpaca_short").prompt("Add", "1 2") == "### Instruction:\nAdd\n\n### Input:\n1 2\n\n### Response:\n"
    assert alpaca_template("alpaca_legacy").prompt("Add").endswith("### Response:")


ROWS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue is a colour."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
]


def test_prompt_is_masked_and_answer_plus_eos_trained(tokenizer):
    formatted = format_alpaca("rows", ROWS, "alpaca", train_on_inputs=False)
    ids, labels, starts, _, truncated = tokenize(formatted.texts, formatted.spans, tokenizer, 256, add_eos=True)
    assert not truncated.any()
    for i, row in enumerate(ROWS):
        row_ids, row_labels = rows_of(ids, labels, starts, i)
        trained = [t for t in row_labels if t != IGNORE_INDEX]
        assert row_ids[-1] == tokenizer.eos_token_id
        assert trained[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(trained[:-1]) == row["output"]
        prompt_tokens = len(row_ids) - len(trained)
        assert all(t == IGNORE_INDEX for t in row_labels[:prompt_tokens])
        assert tokenizer.decode(row_ids[1:prompt_tokens]) == alpaca_template("alpaca").prompt(row["instruction"], row["input"])


def test_train_on_inputs_trains_every_token(tokenizer):
    formatted = format_alpaca("rows", ROWS, "alpaca", train_on_inputs=True)
    ids, labels, *_ = tokenize(formatted.texts, formatted.spans, tokenizer, 256, add_eos=True)
    assert np.array_equal(ids, labels)


def test_rows_are_tokenized_whole_after_the_tokenizer_was_called_with_padding_and_truncation(tokenizer):
    """A tokenizer used for a padded, truncated batch keeps those settings on its Rust backend (transformers 5); the
    data stage's tokenize still reads each row whole and unpadded."""
    formatted = format_alpaca("rows", ROWS, "alpaca", train_on_inputs=False)
    before = tokenize(formatted.texts, formatted.spans, tokenizer, 256, add_eos=True)
    tokenizer(["a", "a much longer text than the first one"], padding=True, truncation=True, max_length=4)
    after = tokenize(formatted.texts, formatted.spans, tokenizer, 256, add_eos=True)
    for was, now in zip(before, after):
        assert np.array_equal(was, now)
    assert tokenizer.pad_token_id not in after[0].tolist()


def test_truncation_counts_and_no_eos_on_truncated_rows(tokenizer):
    rows = [{"instruction": "Repeat.", "input": "", "output": "word " * 200}, *ROWS]
    formatted = format_alpaca("rows", rows, "alpaca", train_on_inputs=False)
    *_, untruncated, _ = tokenize(formatted.texts, formatted.spans, tokenizer, 10_000, add_eos=True)
    cutoff = int(untruncated[1:].max()) + 1  # the short rows and their EOS fit, the long one does not
    ids, labels, starts, full, truncated = tokenize(formatted.texts, formatted.spans, tokenizer, cutoff, add_eos=True)
    lengths = np.diff(starts)
    assert truncated.tolist() == [True, False, False]
    assert lengths[0] == cutoff and ids[starts[1] - 1] != tokenizer.eos_token_id
    assert full[0] > cutoff
    assert ids[starts[2] - 1] == ids[starts[3] - 1] == tokenizer.eos_token_id
    assert (lengths <= cutoff).all()


def test_sharegpt_trains_only_assistant_turns(tokenizer, shared_data):
    rows = json.loads((shared_data / "sharegpt_dummy_conversation.json").read_text())[:3]
    formatted = format_conversations("rows", rows, "sharegpt", "vicuna_v1.1", False, tokenizer.eos_token)
    ids, labels, starts, *_ = tokenize(formatted.texts, formatted.spans, tokenizer, 512, add_eos=True)
    for i, row in enumerate(rows):
        _, row_labels = rows_of(ids, labels, starts, i)
        trained_text = tokenizer.decode([t for t in row_labels if t != IGNORE_INDEX], skip_special_tokens=False)
        answers = "".join(f" {t['value']}{tokenizer.eos_token}" for t in row["conversations"] if t["from"] == "gpt")
        assert trained_text == answers
        assert formatted.texts[i].startswith(VICUNA_SYSTEM + " USER: ")


def test_gpt2_tokenizer_without_pad_keeps_eos_in_the_labels(shared_data, tmp_path):
    # GPT-2 has one special token for bos/eos/unk and no pad: pad must reuse it, and EOS must still be trained.
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_file=str(shared_data / "tokenizers" / "gpt2_tokenizer.json"),
                            eos_token="<|endoftext|>", unk_token="<|endoftext|>").save_pretrained(tmp_path)
    gpt2 = load_tokenizer(str(tmp_path))
    assert gpt2.pad_token_id == gpt2.eos_token_id == 50256
    formatted = format_alpaca("rows", ROWS, "alpaca", train_on_inputs=False)
    ids, labels, starts, *_ = tokenize(formatted.texts, formatted.spans, gpt2, 256, add_eos=True)
    assert labels[starts[1] - 1] == 50256
    assert gpt2.decode([t for t in labels[: starts[1]] if t != IGNORE_INDEX]) == ROWS[0]["output"] + "<|endoftext|>"


def test_dataset_stage_writes_parquet_and_stats(tiny_model, tmp_path, shared_data):
    import pyarrow.parquet as pq

    data = DataSettings(path=str(shared_data / "alpaca_gpt4_en_demo_1k.json"), val_set_size=50, cutoff_len=128)
    stats = prepare_dataset(data, str(tiny_model), tmp_path)
    assert stats["rows_read"] == 999
    assert stats["train_rows"] + stats["val_rows"] == stats["rows_kept"]
    assert stats["val_rows"] == 50
    assert stats["truncated_rows"] > 0 and stats["token_length_percentiles"]["max"] > 128
    train = pq.read_table(tmp_path / "train.parquet")
    assert train.num_rows == stats["train_rows"]
    assert max(len(x) for x in train.column("input_ids").to_pylist()) <= 128
    again = prepare_dataset(data, str(tiny_model), tmp_path / "again")
    assert again == stats  # the split is seeded
    assert pq.read_table(tmp_path / "again" / "val.parquet").equals(pq.read_table(tmp_path / "val.parquet"))


def test_the_stage_tokenizes_in_chunks_with_the_same_output_and_row_numbers(tiny_model, tmp_path, shared_data, monkeypatch):
    """Rows go through the tokenizer a chunk at a time (memory); the files and stats equal one pass over all rows, and a
    bad row in a later chunk is named by its place in the file."""
    import importlib

    import pyarrow.parquet as pq

    import loraflow.data.sft as stage

    tokenize_module = importlib.import_module("loraflow.data.tokenize")  # (the package's `tokenize` is the function)

    data = DataSettings(path=str(shared_data / "alpaca_gpt4_en_demo_1k.json"), val_set_size=50, cutoff_len=128)
    whole = prepare_dataset(data, str(tiny_model), tmp_path / "whole")
    monkeypatch.setattr(stage, "CHUNK_ROWS", 97)
    monkeypatch.setattr(tokenize_module, "ROWS_PER_GROUP", 300)
    calls = tokenize_module.TOKENIZE_CALLS
    assert prepare_dataset(data, str(tiny_model), tmp_path / "chunked") == whole
    assert tokenize_module.TOKENIZE_CALLS - calls == 11  # 999 rows, 97 at a time
    for split in ("train", "val"):
        assert pq.read_table(tmp_path / "chunked" / f"{split}.parquet").equals(pq.read_table(tmp_path / "whole" / f"{split}.parquet"))
    assert pq.ParquetFile(tmp_path / "chunked" / "train.parquet").num_row_groups == 4  # 949 rows, 300 a group

    rows = read_rows(data.path)
    rows[250]["output"] = 7
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    with pytest.raises(LoraflowError, match=r"bad.json: row 250: field 'output' is a int"):
        prepare_dataset(data.model_copy(update={"path": str(tmp_path / "bad.json")}), str(tiny_model), tmp_path / "bad")


def test_sharegpt_reads_from_jsonl_and_parquet_alike(tiny_model, tmp_path, shared_data):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = read_rows(str(shared_data / "sharegpt_dummy_conversation.json"))[:40]
    (tmp_path / "conv.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "conv.parquet")
    stats = [
        prepare_dataset(DataSettings(path=str(tmp_path / f"conv.{suffix}"), format="sharegpt", template="vicuna_v1.1", val_set_size=4),
                        str(tiny_model), tmp_path / suffix)
        for suffix in ("jsonl", "parquet")
    ]
    assert stats[0]["tokens"] == stats[1]["tokens"] and stats[0]["rows_kept"] == 40
    assert stats[0]["train_on_inputs"] is False


def test_chatml_renders_turns_and_trains_assistant_text(tokenizer):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi {there}"},
                          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                          {"role": "assistant", "content": "Bye."}]}]
    formatted = format_conversations("rows", rows, "messages", "chatml", False, tokenizer.eos_token)
    assert formatted.texts[0] == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi {there}<|im_end|>\n<|im_start|>assistant\n"
        "Hello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nBye.<|im_end|>"
    )
    text = formatted.texts[0]
    assert [text[a:b] for a, b in formatted.spans[0]] == ["Hello.<|im_end|>", "Bye.<|im_end|>"]
