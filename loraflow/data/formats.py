"""Reading dataset files and turning rows into (text, trained character spans).

Input: JSON (a list of objects), JSONL, or parquet; local or any fsspec URL; `.gz` etc. decompressed
by fsspec. Malformed input fails with the file, the line (JSON/JSONL) or row, and what to do.
Rows that are well-formed but unusable (an empty answer) are dropped and counted by reason.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field

from fsspec.utils import infer_compression

from loraflow.data.templates import alpaca_template, render_conversation
from loraflow.errors import LoraflowError
from loraflow.storage import open_url, remote_failure

SUFFIXES = (".json", ".jsonl", ".parquet")
ROLES = {  # the role names rows use, as the templates' three
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
    "system": "system",
}


def _base_suffix(uri: str) -> str:
    name = uri.rsplit("/", 1)[-1].lower()
    for compression in (".gz", ".bz2", ".xz", ".zst"):
        name = name.removesuffix(compression)
    return "." + name.rsplit(".", 1)[-1] if "." in name else ""


class Rows(list):
    """A file's rows; `under`: the key of the JSON object that held them, when the file was one."""

    under: str | None = None

    @property
    def note(self) -> str | None:
        """What a log says about how the rows were found, when it is not plain."""
        return None if self.under is None else f"the file is a JSON object; its rows are the list under {self.under!r}"


def read_rows(uri: str) -> Rows:
    """All rows of a dataset file as dicts. UTF-8 text may start with a byte-order mark (as Excel and Notepad write it;
    pandas and HF datasets accept it too)."""
    suffix = _base_suffix(uri)
    if suffix not in SUFFIXES:
        raise LoraflowError(f"{uri}: unsupported file type {suffix or '(none)'}; expected one of {', '.join(SUFFIXES)}")
    compression = infer_compression(uri)
    try:
        with open_url(uri, "rb", compression=compression) as stream:
            payload = stream.read()
    except FileNotFoundError as error:
        raise remote_failure(error, uri, "data.path") or LoraflowError(f"{uri}: dataset file not found; check data.path") from None
    except Exception as error:  # a remote store's failures, whatever their type
        if failure := remote_failure(error, uri, "data.path"):
            raise failure from None
        if compression:  # (gzip, bz2, lzma and zstd each raise their own types for a corrupt or cut-short file)
            raise LoraflowError(f"{uri}: not a readable {compression} file ({error or type(error).__name__}); it may be cut "
                                f"short or not {compression}-compressed: check the file, or name it without .{uri.rsplit('.', 1)[-1]}") from None
        raise
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(io.BytesIO(payload)).to_pylist()
        except Exception as error:  # pyarrow raises several types for a corrupt file
            raise LoraflowError(f"{uri}: not a readable parquet file ({error})") from None
    else:
        try:
            text = payload.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise LoraflowError(f"{uri}: not UTF-8 text (byte {error.start}); re-encode the file as UTF-8") from None
        del payload  # the file once in memory while it is parsed, not twice
        rows = _parse_jsonl(uri, text) if suffix == ".jsonl" else _parse_json(uri, text)
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise LoraflowError(f"{uri}: row {index} is a {type(row).__name__}, expected a JSON object")
    return rows if isinstance(rows, Rows) else Rows(rows)


def _json_problem(error: json.JSONDecodeError, text: str) -> str:
    """json's message as a whole sentence ("Unterminated string starting at line 1, column 30"), with what it usually means."""
    where = f"line {error.lineno}, column {error.colno}"
    message = f"{error.msg} {where}" if error.msg.endswith(" at") else f"{error.msg} at {where}"
    if not text[error.pos:].strip() or error.msg.startswith("Unterminated string"):
        message += "; the file ends in the middle of a value: it may still be uploading, or was cut short"
    return message


_TOO_DEEP = "values nested deeper than a JSON reader follows (about 1,000 levels); a row is an object of strings and short lists"


def _parse_json(uri: str, text: str) -> list:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise LoraflowError(
            f"{uri}: malformed JSON: {_json_problem(error, text)}"
            + ("; if this file has one object per line, name it .jsonl" if error.msg == "Extra data" else "")
        ) from None
    except RecursionError:
        raise LoraflowError(f"{uri}: {_TOO_DEEP}") from None
    if isinstance(value, dict):
        # {"data": [...]} / {"train": [...]}: the rows under the object's one key, unwrapped and said (as HF datasets'
        # json loader does with field="data"). Several keys: which one holds the rows is a guess, so it is refused.
        lists = [key for key, held in value.items() if isinstance(held, list)]
        if len(value) == 1 and lists:
            rows = Rows(value[lists[0]])
            rows.under = lists[0]
            return rows
        holding = f" (lists under {', '.join(map(repr, lists))})" if lists else ""
        raise LoraflowError(f"{uri}: expected a JSON list of rows, found an object with keys "
                            f"{', '.join(map(repr, list(value)[:8])) or 'none'}{holding}; write the rows as a list, or as an "
                            "object with one key holding that list")
    if not isinstance(value, list):
        raise LoraflowError(f"{uri}: expected a JSON list of rows, found a {type(value).__name__}")
    return value


def _parse_jsonl(uri: str, text: str) -> list:
    rows = []
    # (split at newlines only: str.splitlines also splits at U+2028 and other separators a JSON string may hold raw)
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise LoraflowError(
                f"{uri}: malformed JSON on line {number}: {_json_problem(error, line).replace('line 1, column', 'column')}; "
                "fix or remove that line (each line must be one complete JSON object)"
            ) from None
        except RecursionError:
            raise LoraflowError(f"{uri}: line {number}: {_TOO_DEEP}") from None
    return rows


@dataclass
class FormattedRows:
    """Texts to tokenize and, per text, the sorted character spans that carry loss."""

    texts: list[str] = field(default_factory=list)
    spans: list[list[tuple[int, int]]] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)


def _require_string(uri: str, index: int, row: dict, name: str, optional: bool = False) -> str:
    if name not in row or row[name] is None:
        if optional:
            return ""
        raise LoraflowError(
            f"{uri}: row {index} has no {name!r} field (fields present: {', '.join(sorted(row)) or 'none'}); "
            f"alpaca rows need instruction, output and optionally input — check data.format"
        )
    value = row[name]
    if not isinstance(value, str):
        raise LoraflowError(f"{uri}: row {index}: field {name!r} is a {type(value).__name__}, expected a string")
    return value


def format_alpaca(uri: str, rows: list[dict], template_name: str, train_on_inputs: bool, first_index: int = 0) -> FormattedRows:
    """(first_index: the file's row number of rows[0], for errors when rows are a chunk of the file)"""
    template = alpaca_template(template_name)
    out = FormattedRows()
    for index, row in enumerate(rows, start=first_index):
        instruction = _require_string(uri, index, row, "instruction")
        context = _require_string(uri, index, row, "input", optional=True)
        answer = _require_string(uri, index, row, "output")
        if not answer.strip():
            out.dropped["empty output"] += 1
            continue
        if not instruction.strip():
            out.dropped["empty instruction"] += 1
            continue
        prompt = template.prompt(instruction, context)
        text = prompt + answer
        out.texts.append(text)
        out.spans.append([(0 if train_on_inputs else len(prompt), len(text))])
    return out


def _turns(uri: str, index: int, row: dict, data_format: str) -> list[tuple[str, str]]:
    field_name, role_key, text_key = (
        ("conversations", "from", "value") if data_format == "sharegpt" else ("messages", "role", "content")
    )
    turns = row.get(field_name)
    if not isinstance(turns, list):
        raise LoraflowError(
            f"{uri}: row {index} has no {field_name!r} list (fields present: {', '.join(sorted(row)) or 'none'}); "
            f"{data_format} rows need {field_name}: [{{{role_key}, {text_key}}}, …]"
        )
    result = []
    for position, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise LoraflowError(f"{uri}: row {index}, turn {position}: expected {{{role_key!r}, {text_key!r}}}")
        role = ROLES.get(str(turn[role_key]).lower())
        if role is None:
            raise LoraflowError(
                f"{uri}: row {index}, turn {position}: unknown role {turn[role_key]!r}; "
                f"known: {', '.join(sorted(ROLES))}"
            )
        result.append((role, str(turn[text_key])))
    return result


def format_conversations(
    uri: str, rows: list[dict], data_format: str, template: str, train_on_inputs: bool, eos_token: str, first_index: int = 0
) -> FormattedRows:
    out = FormattedRows()
    for index, row in enumerate(rows, start=first_index):
        turns = _turns(uri, index, row, data_format)
        dialogue = [role for role, _ in turns if role != "system"]
        # FastChat skips a leading assistant turn and requires user/assistant alternation.
        if dialogue and dialogue[0] == "assistant":
            turns = turns[1:] if turns[0][0] == "assistant" else turns
            dialogue = dialogue[1:]
        if not any(role == "assistant" for role in dialogue):
            out.dropped["no assistant turn"] += 1
            continue
        if any(role != ("user" if i % 2 == 0 else "assistant") for i, role in enumerate(dialogue)):
            out.dropped["turns do not alternate user/assistant"] += 1
            continue
        text, spans = "", []
        for segment, trained in render_conversation(template, turns, eos_token):
            if trained or train_on_inputs:
                if spans and spans[-1][1] == len(text):
                    spans[-1] = (spans[-1][0], len(text) + len(segment))
                else:
                    spans.append((len(text), len(text) + len(segment)))
            text += segment
        out.texts.append(text)
        out.spans.append(spans)
    return out
