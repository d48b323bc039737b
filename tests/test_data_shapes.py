"""The data-shape registry: every registered shape is detected from real rows, resolved once, checked against a set
format (one error naming both), and is what the config's choices, the watcher's routing and docs/data.md list."""

import gzip
import json
import typing

import pytest

from loraflow.config import DataSettings
from loraflow.objectives import DpoDataSettings
from loraflow.config_loader import build_config
from loraflow.data.formats import read_rows
from loraflow.data.shapes import SHAPES, detect_shape, markdown_table, resolve_data
from loraflow.errors import LoraflowError
from loraflow.watch import Found, validate_dataset
from shape_samples import REPO, every_shape, write_jsonl

FILES = every_shape(6)


def test_every_registered_shape_has_a_sample_file():
    assert {shape for shape, _ in FILES.values()} == {shape.name for shape in SHAPES}


@pytest.mark.parametrize("stem", FILES)
def test_each_shape_is_detected_validated_and_routed_to_its_objective(stem, tmp_path):
    shape, rows = FILES[stem]
    path = write_jsonl(tmp_path / f"{stem}.jsonl", rows)
    assert detect_shape(str(path), read_rows(str(path))).name == shape
    detected, usable, note = validate_dataset(str(path))
    assert (detected, usable, note) == (shape, len(rows), None)
    objective = next(s.objective for s in SHAPES if s.name == shape)
    found = Found(str(path), "0" * 64, 1, "f", "new", format=detected, rows=usable)
    assert found.resource()["loraflow.objective"] == objective
    data = (DpoDataSettings if objective == "dpo" else DataSettings)(path=str(path))  # format auto, template auto
    resolved = resolve_data(data, objective, rows)
    assert (resolved.format, resolved.template) == (shape, "alpaca" if shape == "alpaca" else "chatml")
    assert resolve_data(resolved, objective, rows) == resolved  # resolving again changes nothing


def test_a_set_format_that_does_not_fit_names_both_and_the_fix():
    _, messages = FILES["messages"]
    with pytest.raises(LoraflowError) as error:
        resolve_data(DataSettings(path="chat.jsonl", format="alpaca"), "sft", messages)
    assert str(error.value).startswith("chat.jsonl: data.format is 'alpaca' (")
    assert "but the file's rows are messages (" in str(error.value) and str(error.value).endswith("set data.format: auto (or messages)")
    _, orca = FILES["orca"]
    with pytest.raises(LoraflowError, match=r"p\.jsonl: data\.format is 'trl' .*but the file's rows are orca .*set data\.format: auto \(or orca\)"):
        resolve_data(DpoDataSettings(path="p.jsonl", format="trl"), "dpo", orca)
    with pytest.raises(LoraflowError, match=r"its rows are preference pairs \(orca: .*set objective: dpo"):
        resolve_data(DataSettings(path="p.jsonl"), "sft", orca)
    with pytest.raises(LoraflowError, match=r"its rows are messages rows .*not preference pairs.*or set objective: sft"):
        resolve_data(DpoDataSettings(path="chat.jsonl"), "dpo", messages)
    with pytest.raises(LoraflowError, match=r"x\.json: row 0 has fields answer, question, which is no data shape loraflow knows; rows are one of: openai"):
        detect_shape("x.json", [{"question": "q", "answer": "a"}])
    # A set template that cannot format the detected shape: said after detection, with the shape.
    with pytest.raises(LoraflowError, match=r"c\.jsonl: its rows are messages \(detected\), and data\.template 'alpaca' formats alpaca rows"):
        resolve_data(DataSettings(path="c.jsonl", template="alpaca"), "sft", messages)


def test_the_config_choices_are_the_registry_shapes():
    sft, dpo = ({s.name for s in SHAPES if s.objective == objective} for objective in ("sft", "dpo"))
    assert set(typing.get_args(DataSettings.model_fields["format"].annotation)) == {"auto"} | sft
    assert set(typing.get_args(DpoDataSettings.model_fields["format"].annotation)) == {"auto"} | dpo
    assert build_config({"model": {"base": "m"}, "data": {"path": "d.json"}}).data.format == "auto"


def test_the_data_guide_lists_every_shape_from_the_registry():
    assert markdown_table() in (REPO / "docs" / "data.md").read_text()


def test_a_byte_order_mark_is_read_and_a_wrapped_list_is_unwrapped_and_said(tmp_path):
    rows = FILES["alpaca"][1]
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    (tmp_path / "bom.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8-sig")
    assert read_rows(str(tmp_path / "bom.json")) == rows == read_rows(str(tmp_path / "bom.jsonl"))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    assert validate_dataset(str(tmp_path / "wrapped.json")) == ("alpaca", len(rows), "the file is a JSON object; its rows are the list under 'data'")
    (tmp_path / "two.json").write_text(json.dumps({"version": 1, "data": rows, "extra": []}))
    with pytest.raises(LoraflowError, match=r"found an object with keys 'version', 'data', 'extra' \(lists under 'data', 'extra'\)"):
        read_rows(str(tmp_path / "two.json"))


def test_a_gzipped_hh_rlhf_file_is_detected(shared_data):
    with gzip.open(shared_data / "hh_rlhf_harmless_base_test.jsonl.gz", "rt") as stream:
        first = json.loads(stream.readline())
    assert detect_shape("hh.jsonl.gz", [first]).name == "hh-rlhf"


def test_a_jsonl_string_holding_a_line_separator_character_stays_one_row(tmp_path):
    rows = [{"instruction": "Split\u2028here\x1cand\u0085there", "output": "ok"}]
    write_jsonl(tmp_path / "separators.jsonl", rows)  # (raw characters: JSON allows them inside strings)
    assert read_rows(str(tmp_path / "separators.jsonl")) == rows
