"""Any input gets success or one clear error: property-based tests (Hypothesis) that feed arbitrary JSON, JSONL and parquet
files through the watcher's validation and the data stage (read → detect → format → tokenize → commit), and arbitrary
`--set` overrides through the config loader. What may come out: a result, or exactly one LoraflowError with a message;
never another exception type (a traceback for the user), never a folder without `_manifest.json` in the store."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from loraflow.config_loader import build_config, load_config
from loraflow.data.formats import read_rows
from loraflow.data.shapes import resolve_data
from loraflow.errors import LoraflowError
from loraflow.storage import MANIFEST, StageRecord
from loraflow.watch import validate_dataset

# Bounded so each property runs in well under 20 s on a loaded 2-core machine; deadline off (tokenizing varies).
BOUNDED = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SCALARS = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)
ROLES = st.sampled_from(["user", "assistant", "system", "human", "gpt", "bing", "tool", ""]) | JSON
TURN = st.fixed_dictionaries({}, optional={"role": ROLES, "content": st.text(max_size=12) | JSON,
                                           "from": ROLES, "value": st.text(max_size=12) | JSON})
# Values that look like what each shape's fields hold, and anything else.
FIELD_VALUE = (st.text(max_size=24) | st.just("\n\nHuman: hi\n\nAssistant: yes") | st.lists(TURN, max_size=3) | TURN
               | st.fixed_dictionaries({"messages": st.lists(TURN, max_size=3)}) | JSON)
FIELDS = ["instruction", "input", "output", "text", "conversations", "messages", "system", "question", "prompt", "chosen",
          "rejected", "preferred_output", "non_preferred_output"]
ROW = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=4), FIELD_VALUE, max_size=5)
ROWS = st.lists(ROW, max_size=4)
CONTENT = ROWS | JSON | st.dictionaries(st.text(max_size=5), ROWS, min_size=1, max_size=2)  # rows, any value, wrapped rows


@st.composite
def near_valid_rows(draw):
    """Real rows of a random registered shape (tests/shape_samples.py), some fields replaced by anything or dropped:
    the inputs that reach the formatters and the tokenizer."""
    from shape_samples import every_shape

    _, rows = every_shape(3)[draw(st.sampled_from(sorted(every_shape(3))))]
    mutated = []
    for row in rows:
        row = dict(row)
        for field in draw(st.lists(st.sampled_from(sorted(row)), max_size=2, unique=True)):
            if draw(st.booleans()):
                row[field] = draw(FIELD_VALUE)
            else:
                del row[field]
        mutated.append(row)
    return mutated


def _dataset_bytes(content, suffix: str, bom: bool) -> bytes | None:
    """The file a user could upload holding `content` (None where the format cannot hold it: parquet of non-rows)."""
    if suffix == ".parquet":
        try:
            buffer = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(content), buffer)
            return buffer.getvalue()
        except Exception:  # (pyarrow cannot write every mix of types: that file does not exist, so nothing to read)
            return None
    if suffix == ".jsonl":
        lines = content if isinstance(content, list) else [content]
        text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    else:
        text = json.dumps(content, ensure_ascii=False)
    return ("\ufeff" if bom else "").encode() + text.encode()


def _only_a_loraflow_error(call):
    """The call's result, or None when it raised a LoraflowError with a message; any other exception fails the test."""
    try:
        return call()
    except LoraflowError as error:
        assert str(error).strip(), "a LoraflowError without a message"
        return None


def _no_partial_write(store: Path) -> None:
    for folder in (store / "dataset").glob("*"):
        assert (folder / MANIFEST).exists(), f"{folder}: a folder without {MANIFEST} left in the store"


@pytest.fixture(scope="module")
def sources(tiny_model):
    """The sources record the data stage reads (the tiny model's tokenizer), as the sources stage writes it."""
    from loraflow.models import native

    return {"model_path": str(tiny_model), "tokenizer_key": "tiny", "tokenizer": native.tokenizer_identity(tiny_model)}


def _data_stage(path: Path, objective: str, store: Path, sources: dict):
    """The data stage as a flow runs it: the shape resolved from the file, then read, format, tokenize, commit."""
    from loraflow import stages
    from loraflow.storage import sha256_hex

    tree = {"storage": str(store), "model": {"base": sources["model_path"]},
            "data": {"path": str(path), "val_set_size": 1, "cutoff_len": 32}}
    if objective == "dpo":
        tree |= {"objective": "dpo", "dpo": {"max_prompt_length": 16, "max_length": 32}}
    config = build_config(tree)
    resolved = resolve_data(config.data, objective, read_rows(str(path)))
    config = config.model_copy(update={"data": resolved})
    record = StageRecord(stage="sources", key="k", metrics={"dataset_sha256": sha256_hex(path.read_bytes()), **sources})
    return stages.prepare_data(config, record, log=lambda message: None)


@BOUNDED
@given(content=CONTENT | near_valid_rows(), suffix=st.sampled_from([".json", ".jsonl", ".parquet"]), bom=st.booleans(),
       objective=st.sampled_from(["sft", "dpo"]))
def test_any_dataset_file_is_accepted_or_refused_with_one_clear_error(sources, content, suffix, bom, objective):
    payload = _dataset_bytes(content, suffix, bom)
    if payload is None:
        return
    with tempfile.TemporaryDirectory(prefix="loraflow-any-input-") as tmp:
        path, store = Path(tmp) / f"upload{suffix}", Path(tmp) / "store"
        path.write_bytes(payload)
        _only_a_loraflow_error(lambda: validate_dataset(str(path)))
        built = _only_a_loraflow_error(lambda: _data_stage(path, objective, store, sources))
        event("the data stage committed" if built else "the data stage refused")
        _no_partial_write(store)


@BOUNDED
@example(payload=b"[" * 100_000, suffix=".json").via("nested deeper than Python's recursion limit")
@example(payload=b'{"data": ' + b"[" * 5000 + b"]" * 5001, suffix=".json").via("valid, and nested too deep")
@example(payload=b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}\n", suffix=".jsonl").via("a line nested too deep")
@given(payload=st.binary(max_size=64), suffix=st.sampled_from([".json", ".jsonl", ".parquet", ".json.gz"]))
def test_any_bytes_as_a_dataset_file_are_refused_with_one_clear_error(sources, payload, suffix):
    with tempfile.TemporaryDirectory(prefix="loraflow-any-bytes-") as tmp:
        path, store = Path(tmp) / f"upload{suffix}", Path(tmp) / "store"
        path.write_bytes(payload)
        _only_a_loraflow_error(lambda: validate_dataset(str(path)))
        _only_a_loraflow_error(lambda: _data_stage(path, "sft", store, sources))
        _no_partial_write(store)


KNOWN_KEYS = ["name", "objective", "storage", "model.base", "model.quantization", "data.path", "data.format", "data.template",
              "data.cutoff_len", "data.new_tokens", "data.val_set_size", "lora", "lora.method", "lora.r", "lora.target",
              "lora.alpha", "train.learning_rate", "train.batch_size", "train.precision", "train.pool", "merge.enabled",
              "dpo.beta", "dpo.start_from", "evaluation.answer_pattern", "model", "data", "train"]
KEY = st.sampled_from(KNOWN_KEYS) | st.builds(lambda a, b: f"{a}.{b}", st.sampled_from(KNOWN_KEYS), st.text(max_size=5)) | st.text(max_size=12)
VALUE = st.text(max_size=16) | st.sampled_from(["[q_proj", "{a: 1}", "!!binary x", "&a [*a]", "true", "1e-4", "[1, 2]", "null",
                                                "auto", "dpo", "- x", "'", "!!python/object:os.system x", "2024-01-01", "!!set {a}"])
OVERRIDE = st.builds(lambda key, value: f"{key}={value}", KEY, VALUE) | st.text(max_size=12)


@BOUNDED
@given(overrides=st.lists(OVERRIDE, max_size=4), dpo=st.booleans())
def test_any_set_overrides_give_a_config_or_one_clear_error(overrides, dpo):
    with tempfile.TemporaryDirectory(prefix="loraflow-any-set-") as tmp:
        config = Path(tmp) / "c.yaml"
        config.write_text(("objective: dpo\n" if dpo else "") + "model: {base: m}\ndata: {path: d.json}\nstorage: store\n")
        _only_a_loraflow_error(lambda: load_config(config, overrides))
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["c.yaml"]  # loading a config writes nothing
