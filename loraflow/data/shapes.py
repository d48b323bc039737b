"""The data shapes loraflow reads: one registry, asked by the config's choices, the CLI, the flows, the watcher, the
data stage and the docs.

A shape is a way dataset rows are written. Registered (the value of `data.format`; `auto` detects it):
- SFT: `sharegpt` (conversations [{from, value}]), `messages` (messages [{role, content}]), `alpaca`
  (instruction/input/output);
- preference pairs (objective dpo): `openai`, `sharegpt-preference`, `orca`, `trl`, `pairs`, `hh-rlhf`.

Each is registered with its objective, what its rows hold (for docs and errors), how it is recognised from a row, the
template `data.template: auto` gives it and the templates that can write it, what `train_on_inputs: auto` means for
it, and how its rows are rendered and checked: an SFT shape's formatter (loraflow.data.formats) or a preference
shape's row reader (loraflow.data.pairs). `detect_shape` is the one function that tells a file's shape;
`resolve_data` turns a config's `data.format` / `data.template` (possibly `auto`) into the shape and template a run
uses, or one error that names the set format and the shape the file has; `format_problem` and `template_problem`
are the config's checks; `names`, `format_help` and `template_help` its choices and their descriptions.

Detection reads the first row, in the order of SHAPES (preference shapes first: their rows may also carry a
`conversations` or `prompt` field); every row is then checked by the shape's formatter or reader.

Adding a shape: its formatter or row reader, one `Shape(...)` here, and a writer of sample rows in
tests/shape_samples.py (the generated tests then run it through every entry point).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loraflow.data import pairs
from loraflow.data.formats import FormattedRows, format_alpaca, format_conversations
from loraflow.data.pairs import HUMAN, Pair
from loraflow.data.templates import ALPACA_TEMPLATES, CONVERSATION_TEMPLATES
from loraflow.errors import LoraflowError

if TYPE_CHECKING:
    from loraflow.config import DataSettings

# What each objective's rows are called in errors.
ROWS_OF = {"sft": "SFT rows (instructions or conversations with their answers)", "dpo": "preference pairs"}


@dataclass(frozen=True)
class Shape:
    """One way rows are written. An SFT shape renders rows with `format_rows` (uri, rows, template, train_on_inputs,
    eos_token, first_index) into texts and trained spans; a preference shape reads a row with `pair` into
    (prompt turns, chosen, rejected), raising loraflow.data.pairs.Invalid with the reason a row is dropped."""

    name: str
    objective: str  # the objective that trains on it: sft, or dpo (preference pairs)
    fields: str  # what its rows hold, for docs and errors
    matches: Callable[[dict], bool]
    template: str  # what data.template auto resolves to for it
    templates: tuple[str, ...]  # the templates that can write it
    train_on_inputs: bool = False  # what data.train_on_inputs auto means for it (the loss on the prompt too)
    format_rows: Callable[..., FormattedRows] | None = None
    pair: Callable[[dict], Pair] | None = None

    def usable_rows(self, uri: str, rows: list[dict]) -> int:
        """How many rows the data stage's formatter accepts; a LoraflowError (file, row, field) when the rows are not
        this shape, or when none is usable."""
        if self.pair is not None:
            return len(pairs.read_pairs(uri, rows, self.name, self.pair).turns)
        formatted = self.format_rows(uri, rows, self.template, True, "</s>", 0)
        if not formatted.texts:
            reasons = ", ".join(f"{count} {reason}" for reason, count in formatted.dropped.items())
            raise LoraflowError(f"{uri}: none of its {len(rows)} {self.name} rows is usable ({reasons})")
        return len(formatted.texts)


def _pair(row: dict) -> bool:
    return "chosen" in row and "rejected" in row


def _alpaca(uri, rows, template, train_on_inputs, eos_token, first_index=0) -> FormattedRows:
    return format_alpaca(uri, rows, template, train_on_inputs, first_index=first_index)


def _conversations(name: str) -> Callable[..., FormattedRows]:
    def format_rows(uri, rows, template, train_on_inputs, eos_token, first_index=0) -> FormattedRows:
        return format_conversations(uri, rows, name, template, train_on_inputs, eos_token, first_index=first_index)
    return format_rows


_PREFERENCE = {"objective": "dpo", "template": "chatml", "templates": CONVERSATION_TEMPLATES}
_CONVERSATION = {"objective": "sft", "template": "chatml", "templates": CONVERSATION_TEMPLATES}

# Detection order: the first that matches a row is its shape.
SHAPES: tuple[Shape, ...] = (
    Shape("openai", fields="input.messages, preferred_output, non_preferred_output (OpenAI preference fine-tuning)",
          matches=lambda row: isinstance(row.get("input"), dict) and "preferred_output" in row, pair=pairs.openai_pair,
          **_PREFERENCE),
    Shape("sharegpt-preference", fields="conversations [{from, value}] + chosen/rejected turns, optional system (LLaMA-Factory)",
          matches=lambda row: _pair(row) and "conversations" in row, pair=pairs.sharegpt_pair, **_PREFERENCE),
    Shape("orca", fields="system, question, chosen, rejected (Intel/orca_dpo_pairs)",
          matches=lambda row: _pair(row) and "question" in row, pair=pairs.orca_pair, **_PREFERENCE),
    Shape("trl", fields="prompt, chosen, rejected as message lists (TRL's conversational shape)",
          matches=lambda row: _pair(row) and isinstance(row.get("prompt"), list), pair=pairs.trl_pair, **_PREFERENCE),
    Shape("pairs", fields="prompt, chosen, rejected strings, optional system",
          matches=lambda row: _pair(row) and "prompt" in row, pair=pairs.prompt_pair, **_PREFERENCE),
    Shape("hh-rlhf", fields="chosen, rejected full '\\n\\nHuman: … \\n\\nAssistant: …' transcripts (Anthropic hh-rlhf)",
          matches=lambda row: _pair(row) and isinstance(row.get("chosen"), str) and HUMAN in row["chosen"],
          pair=pairs.transcript_pair, **_PREFERENCE),
    # (FastChat trains on the assistant turns only: train_on_inputs auto is no for conversations)
    Shape("sharegpt", fields="conversations [{from: human/gpt, value}] (ShareGPT, FastChat)",
          matches=lambda row: "conversations" in row, format_rows=_conversations("sharegpt"), **_CONVERSATION),
    Shape("messages", fields="messages [{role: system/user/assistant, content}] (OpenAI chat)",
          matches=lambda row: "messages" in row, format_rows=_conversations("messages"), **_CONVERSATION),
    # (alpaca-lora computes the loss on the prompt too: train_on_inputs auto is yes)
    Shape("alpaca", "sft", "instruction, output, optional input (Stanford Alpaca; the alpaca-lora recipe)",
          lambda row: "instruction" in row and "output" in row, "alpaca", ALPACA_TEMPLATES, train_on_inputs=True,
          format_rows=_alpaca),
)
BY_NAME = {shape.name: shape for shape in SHAPES}
OBJECTIVES = tuple(dict.fromkeys(shape.objective for shape in SHAPES))


def names(objective: str) -> tuple[str, ...]:
    """The shapes an objective trains on (the values of its data.format besides auto), in detection order."""
    return tuple(shape.name for shape in SHAPES if shape.objective == objective)


def format_help(objective: str) -> str:
    """The form's description of data.format for an objective: auto, then each of its shapes and what its rows hold."""
    return "; ".join(["auto: detected from the file's first row"] +
                     [f"{shape.name}: {shape.fields}" for shape in SHAPES if shape.objective == objective]) + "."


def template_help(objective: str) -> str:
    """The form's description of data.template for an objective: what auto picks, and which templates write which rows."""
    shapes = [shape for shape in SHAPES if shape.objective == objective]
    auto = "; ".join(f"{template} for {', '.join(s.name for s in shapes if s.template == template)} rows"
                     for template in dict.fromkeys(shape.template for shape in shapes))
    writers: dict[tuple[str, ...], list[str]] = {}
    for shape in shapes:
        writers.setdefault(shape.templates, []).append(shape.name)
    which = ". ".join(f"{', '.join(templates)} write {', '.join(rows)} rows" for templates, rows in writers.items())
    own = (" A tokenizer with a chat template of its own formats preference pairs with it instead."
           if any(shape.pair for shape in shapes) else "")
    alpaca = " (the alpaca ones are alpaca-lora's, byte for byte)" if any(set(t) & set(ALPACA_TEMPLATES) for t in writers) else ""
    return f"Prompt template. auto: {auto}. {which}{alpaca}.{own}"


def format_problem(objective: str, data_format: str) -> str | None:
    """Why a run of `objective` cannot read rows of `data_format`: a shape of another objective. None for auto, its own
    shapes, and a name that is no shape (the config's choices refuse that one, with their list)."""
    if data_format not in BY_NAME or data_format in names(objective):
        return None
    other = BY_NAME[data_format].objective
    return (f"{data_format!r} is for {ROWS_OF[other]} (objective {other}); set objective: {other} to train on them. "
            f"objective {objective} trains on {ROWS_OF[objective]}, but data.format is {data_format!r}: use auto "
            f"(detected from the first row) or one of {', '.join(names(objective))}")


def template_problem(data_format: str, template: str) -> str | None:
    """Why a template cannot write rows of this format, or None. With either auto, it is decided once the file's shape
    is known (resolve_data asks this again with the resolved values)."""
    if "auto" in (data_format, template) or data_format not in BY_NAME:
        return None
    shape = BY_NAME[data_format]
    if template in shape.templates:
        return None
    if shape.objective == "dpo":
        return (f"format {data_format!r} is for preference pairs (objective dpo), which use a conversation template "
                f"({', '.join(shape.templates)}; chatml by default), not {template!r}; for SFT use format {', '.join(names('sft'))}")
    writes = "alpaca rows" if template in ALPACA_TEMPLATES else "conversations"
    return f"template {template!r} formats {writes}, but format is {data_format!r}; use one of {', '.join(shape.templates)} (or auto)"


def shape_named(name: str) -> Shape:
    if name not in BY_NAME:
        raise LoraflowError(f"unknown data format {name!r}; known: auto, {', '.join(BY_NAME)}")
    return BY_NAME[name]


def _fields(row: dict) -> str:
    return ", ".join(sorted(map(str, row))) or "none"


def _known() -> str:
    return "; ".join(f"{shape.name} ({shape.fields})" for shape in SHAPES)


def detect_shape(uri: str, rows: list[dict]) -> Shape:
    """The shape of a file's rows, from its first row; a LoraflowError naming the fields found and the shapes known."""
    if not rows:
        raise LoraflowError(f"{uri}: the dataset is empty")
    first = rows[0]
    for shape in SHAPES:
        if shape.matches(first):
            return shape
    raise LoraflowError(f"{uri}: row 0 has fields {_fields(first)}, which is no data shape loraflow knows; rows are one of: {_known()}")


def resolve_shape(uri: str, rows: list[dict], objective: str, data_format: str = "auto") -> Shape:
    """The shape a run of `objective` reads the file as: the detected one for `auto`, else the set one, when it fits."""
    if data_format != "auto" and rows and not any(shape.matches(rows[0]) for shape in SHAPES):
        wanted = shape_named(data_format)
        raise LoraflowError(f"{uri}: data.format is {data_format!r} ({wanted.fields}), but row 0 has fields {_fields(rows[0])}, "
                            f"which is no shape loraflow knows; rows are one of: {_known()}")
    detected = detect_shape(uri, rows)
    if detected.objective != objective:
        if objective == "sft":
            raise LoraflowError(f"{uri}: its rows are preference pairs ({detected.name}: {detected.fields}), not SFT rows; "
                                "set objective: dpo to preference-tune on them")
        raise LoraflowError(f"{uri}: its rows are {detected.name} rows ({detected.fields}), not preference pairs; DPO takes "
                            f"{', '.join(names('dpo'))} rows, or set objective: sft")
    if data_format == "auto" or data_format == detected.name:
        return detected
    wanted = shape_named(data_format)
    if wanted.matches(rows[0]):  # set explicitly, and its fields are there: the user's choice over detection's order
        return wanted
    raise LoraflowError(f"{uri}: data.format is {data_format!r} ({wanted.fields}), but the file's rows are {detected.name} "
                        f"({detected.fields}); set data.format: auto (or {detected.name})")


def resolve_data(data: DataSettings, objective: str, rows: list[dict]) -> DataSettings:
    """`data` with format and template as this file is read: `auto` resolved by its shape, a set format checked
    against it, the template checked against the shape. Unchanged (the same values) for a config that set both."""
    shape = resolve_shape(data.path, rows, objective, data.format)
    template = shape.template if data.template == "auto" else data.template
    if problem := template_problem(shape.name, template):
        detected = " (detected)" if data.format == "auto" else ""
        raise LoraflowError(f"{data.path}: its rows are {shape.name}{detected}, and data.{problem}")
    return data.model_copy(update={"format": shape.name, "template": template})


def markdown_table() -> str:
    """The README's table of shapes (a test holds the README's copy equal to this)."""
    lines = ["| `data.format` | objective | rows hold | `template: auto` |", "|---|---|---|---|"]
    lines += [f"| `{shape.name}` | {shape.objective} | {shape.fields} | `{shape.template}` |" for shape in SHAPES]
    return "\n".join(lines)
