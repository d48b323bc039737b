"""The data shapes loraflow reads: one registry, asked by the CLI, the flows, the watcher and the docs.

A shape is a way dataset rows are written (Alpaca's instruction/input/output, ShareGPT conversations, …). Each is
registered with its name (the value of `data.format`), the objective that trains on it (`sft`, or `dpo` for
preference pairs), how it is recognised from a row, the template `data.template: auto` gives it, and how its rows are
checked (the formatter the data stage uses). `detect_shape` is the one function that tells a file's shape;
`resolve_data` turns a config's `data.format` / `data.template` (possibly `auto`) into the shape and template a run
uses, or one error that names the set format and the shape the file has.

Detection reads the first row, in the order of SHAPES (preference shapes first: their rows may also carry a
`conversations` or `prompt` field); every row is then checked by the shape's formatter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loraflow.config import template_problem
from loraflow.data.preference import HUMAN
from loraflow.errors import LoraflowError

if TYPE_CHECKING:
    from loraflow.config import DataSettings


@dataclass(frozen=True)
class Shape:
    name: str
    objective: str  # the objective that trains on it: sft, or dpo (preference pairs)
    fields: str  # what its rows hold, for docs and errors
    matches: Callable[[dict], bool]
    template: str  # what data.template auto resolves to for it

    def usable_rows(self, uri: str, rows: list[dict]) -> int:
        """How many rows the data stage's formatter accepts; a LoraflowError (file, row, field) when the rows are not
        this shape, or when none is usable."""
        from loraflow.data.formats import format_alpaca, format_conversations
        from loraflow.data.preference import to_pairs

        if self.objective == "dpo":
            return len(to_pairs(uri, rows, self.name).turns)
        if self.name == "alpaca":
            formatted = format_alpaca(uri, rows, self.template, train_on_inputs=True)
        else:
            formatted = format_conversations(uri, rows, self.name, self.template, False, "</s>")
        if not formatted.texts:
            reasons = ", ".join(f"{count} {reason}" for reason, count in formatted.dropped.items())
            raise LoraflowError(f"{uri}: none of its {len(rows)} {self.name} rows is usable ({reasons})")
        return len(formatted.texts)


def _pair(row: dict) -> bool:
    return "chosen" in row and "rejected" in row


# Detection order: the first that matches a row is its shape.
SHAPES: tuple[Shape, ...] = (
    Shape("openai", "dpo", "input.messages, preferred_output, non_preferred_output (OpenAI preference fine-tuning)",
          lambda row: isinstance(row.get("input"), dict) and "preferred_output" in row, "chatml"),
    Shape("sharegpt-preference", "dpo", "conversations [{from, value}] + chosen/rejected turns, optional system (LLaMA-Factory)",
          lambda row: _pair(row) and "conversations" in row, "chatml"),
    Shape("orca", "dpo", "system, question, chosen, rejected (Intel/orca_dpo_pairs)",
          lambda row: _pair(row) and "question" in row, "chatml"),
    Shape("trl", "dpo", "prompt, chosen, rejected as message lists (TRL's conversational shape)",
          lambda row: _pair(row) and isinstance(row.get("prompt"), list), "chatml"),
    Shape("pairs", "dpo", "prompt, chosen, rejected strings, optional system",
          lambda row: _pair(row) and "prompt" in row, "chatml"),
    Shape("hh-rlhf", "dpo", "chosen, rejected full '\\n\\nHuman: … \\n\\nAssistant: …' transcripts (Anthropic hh-rlhf)",
          lambda row: _pair(row) and isinstance(row.get("chosen"), str) and HUMAN in row["chosen"], "chatml"),
    Shape("sharegpt", "sft", "conversations [{from: human/gpt, value}] (ShareGPT, FastChat)",
          lambda row: "conversations" in row, "chatml"),
    Shape("messages", "sft", "messages [{role: system/user/assistant, content}] (OpenAI chat)",
          lambda row: "messages" in row, "chatml"),
    Shape("alpaca", "sft", "instruction, output, optional input (Stanford Alpaca; the alpaca-lora recipe)",
          lambda row: "instruction" in row and "output" in row, "alpaca"),
)
BY_NAME = {shape.name: shape for shape in SHAPES}


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
                            f"{', '.join(s.name for s in SHAPES if s.objective == 'dpo')} rows, or set objective: sft")
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
