"""Preference pairs (DPO): a shape's rows → (prompt turns, chosen, rejected) → template → token ids.

The shapes (which fields, how each is detected) are registered in loraflow.data.shapes, each with its row reader
(loraflow.data.pairs). Invalid rows are dropped and counted by reason; none left is an error. The text is formatted
with the tokenizer's chat template when it has one, else the configured conversation template (ChatML by default,
as the recipe does); the end of an assistant turn comes from the template, never from a constant here. The rest of
the stage (read, split, parquet, stats) is loraflow.data.stage's, shared with SFT.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from loraflow.data.pairs import ASSISTANT, HUMAN, Invalid, PreferencePairs, Turns, read_pairs
from loraflow.data.shapes import names, shape_named
from loraflow.data.stage import Examples, build_dataset, token_length_percentiles
from loraflow.data.templates import CONVERSATION, render_conversation, template_markers_not_in_vocabulary
from loraflow.errors import LoraflowError

if TYPE_CHECKING:
    from loraflow.config import DataSettings
    from loraflow.data.shapes import Shape

__all__ = ["ASSISTANT", "HUMAN", "PreferencePairs", "Turns", "prepare_preference_dataset", "render", "to_pairs",
           "tokenize_pairs"]


def to_pairs(uri: str, rows: list[dict], shape: str) -> PreferencePairs:
    """Every valid row of the named preference shape as a pair; the others counted under the reason they were dropped."""
    if shape not in names("dpo"):
        raise LoraflowError(f"unknown preference format {shape!r}; known: {', '.join(names('dpo'))}")
    return read_pairs(uri, rows, shape, shape_named(shape).pair)


def render(turns: Turns, answer: str, template: str, tokenizer) -> tuple[str, str]:
    """(prompt text up to where the answer starts, answer text with the template's end of turn)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": role, "content": text} for role, text in turns]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
        if not full.startswith(prompt):
            raise Invalid("the tokenizer's chat template renders the prompt differently once answered")
        return prompt, full[len(prompt):]
    if template not in CONVERSATION:
        raise LoraflowError(f"data.template {template!r} formats alpaca rows; preference pairs need a conversation "
                            f"template ({', '.join(CONVERSATION)}), chatml by default")
    segments = render_conversation(template, turns + [("assistant", answer)], tokenizer.eos_token or "")
    return "".join(text for text, _ in segments[:-1]), segments[-1][0]


def tokenize_pairs(pairs: PreferencePairs, template: str, tokenizer, max_prompt_length: int, max_length: int) -> tuple[dict, Counter]:
    """Columns prompt_ids / chosen_ids / rejected_ids (what TRL's DPOTrainer takes pre-tokenized) and counts of
    truncations and of rows dropped here. The prompt keeps its end (the question nearest the answer) within
    max_prompt_length; each answer keeps its start within max_length minus the prompt."""
    columns: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    counts: Counter = Counter()
    for turns, chosen, rejected in zip(pairs.turns, pairs.chosen, pairs.rejected):
        try:
            prompt, chosen_text = render(turns, chosen, template, tokenizer)
            _, rejected_text = render(turns, rejected, template, tokenizer)
        except Invalid as reason:
            pairs.dropped[str(reason)] += 1
            continue
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        cut_prompt = len(prompt_ids) > max_prompt_length
        if cut_prompt:
            prompt_ids = prompt_ids[-max_prompt_length:]
            counts["prompt truncated"] += 1
        room = max_length - len(prompt_ids)
        answers = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (chosen_text, rejected_text)]
        cut_answer = any(len(ids) > room for ids in answers)
        if cut_answer:
            counts["answer truncated"] += 1
        answers = [ids[:room] for ids in answers]
        if answers[0] == answers[1]:
            pairs.dropped["chosen and rejected identical within max_length"] += 1
            continue
        counts["rows"] += cut_prompt or cut_answer
        columns["prompt_ids"].append(prompt_ids)
        columns["chosen_ids"].append(answers[0])
        columns["rejected_ids"].append(answers[1])
    return columns, counts


def preference_examples(dpo) -> Callable:
    """The preference half of the dataset stage, for these DpoSettings (max_prompt_length, max_length)."""

    def examples(data: DataSettings, shape: Shape, rows: list, tokenizer, log) -> Examples:
        pairs = read_pairs(data.path, rows, shape.name, shape.pair)
        own_template = bool(getattr(tokenizer, "chat_template", None))
        template = "the tokenizer's chat template" if own_template else data.template
        split_markers = [] if own_template else template_markers_not_in_vocabulary(data.template, tokenizer)
        if split_markers:
            log(f"warning: the {data.template} template's markers {', '.join(split_markers)} are not tokens of this "
                f"tokenizer ({type(tokenizer).__name__}): they are trained as plain multi-token text. Use a base whose "
                "tokenizer has them or a chat template of its own.")
        columns, truncations = tokenize_pairs(pairs, data.template, tokenizer, dpo.max_prompt_length, dpo.max_length)
        kept = len(columns["prompt_ids"])
        reasons = ", ".join(f"{count} {reason}" for reason, count in pairs.dropped.items())
        if kept:
            log(f"formatted {kept} of {len(rows)} rows ({shape.name}) with {template}")
        lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(*columns.values())]
        stats = {} if not kept else {
            "truncated_rows": int(truncations.pop("rows", 0)),
            "truncations": dict(truncations),
            "max_prompt_length": dpo.max_prompt_length,
            "max_length": dpo.max_length,
            "token_length_percentiles": token_length_percentiles(lengths),
            "tokens": int(sum(len(p) * 2 + len(c) + len(r) for p, c, r in zip(*columns.values()))),
            "template": template,
            "max_token_id": max(i for values in columns.values() for row in values for i in row),
            "template_markers_split": split_markers,
        }

        def write(path: Path, picked: np.ndarray) -> None:
            pq.write_table(pa.table({name: pa.array([values[i] for i in picked], pa.list_(pa.int32()))
                                     for name, values in columns.items()}), path)

        return Examples(usable=np.arange(kept), dropped=dict(pairs.dropped), write=write, stats=stats,
                        none_usable=f"{data.path}: no usable pairs ({len(rows)} read; dropped: {reasons}); check dpo.max_length")

    return examples


def prepare_preference_dataset(data, dpo, tokenizer_path: str, out_dir, log=print) -> dict:
    """The preference data stage: train.parquet / val.parquet (prompt_ids, chosen_ids, rejected_ids), tokenizer/,
    stats.json. `data` is the config's DataSettings, `dpo` its DpoSettings."""
    return build_dataset(data, "dpo", tokenizer_path, out_dir, preference_examples(dpo), log)
