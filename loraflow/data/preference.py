"""Preference pairs (DPO): read any of the common shapes → (prompt turns, chosen, rejected) → template → token ids.

Shapes (registered, with how each is detected from a row, in loraflow.data.shapes; named by `data.format`):
- `orca`: `system`, `question`, `chosen`, `rejected` strings (Intel/orca_dpo_pairs, the ipex-llm DPO recipe's data);
- `pairs`: `prompt`, `chosen`, `rejected` strings, optional `system` (a `prompt` that is an hh-rlhf transcript,
  "\\n\\nHuman: …\\n\\nAssistant:", is split into its turns);
- `trl`: TRL's conversational shape, `prompt`/`chosen`/`rejected` as message lists;
- `openai`: OpenAI preference fine-tuning JSONL, `input.messages`, `preferred_output`, `non_preferred_output`;
- `sharegpt-preference`: LLaMA-Factory's, `conversations` [{from, value}] + `chosen`/`rejected` turns (optional `system`);
- `hh-rlhf`: Anthropic hh-rlhf, `chosen`/`rejected` full transcripts; the prompt is their shared prefix up to the
  last "\\n\\nAssistant:".

Invalid rows are dropped and counted by reason; none left is an error. The text is formatted with the
tokenizer's chat template when it has one, else the configured conversation template (ChatML by default,
as the recipe does); the end of an assistant turn comes from the template, never from a constant here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from loraflow.data.formats import _ROLE
from loraflow.data.split import split_validation
from loraflow.data.templates import CONVERSATION, render_conversation
from loraflow.errors import LoraflowError

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"

Turns = list[tuple[str, str]]  # (role: system/user/assistant, text)


@dataclass
class PreferencePairs:
    turns: list[Turns] = field(default_factory=list)  # each pair's prompt conversation, ending with a user turn
    chosen: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)


class _Invalid(Exception):
    """A row that cannot be a preference pair; the message is the reason it is counted under."""


def _text(row: dict, name: str, optional: bool = False) -> str:
    value = row.get(name)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise _Invalid(f"missing or non-string {name}")
    return value


def _transcript_turns(transcript: str) -> Turns:
    """An hh-rlhf transcript ("\\n\\nHuman: …\\n\\nAssistant: …") as turns."""
    turns: Turns = []
    position = transcript.find(HUMAN)
    if position < 0:
        raise _Invalid("not an hh-rlhf transcript (no '\\n\\nHuman:')")
    rest = transcript[position:]
    while rest:
        marker = HUMAN if rest.startswith(HUMAN) else ASSISTANT
        rest = rest[len(marker):]
        following = [i for i in (rest.find(HUMAN), rest.find(ASSISTANT)) if i >= 0]
        end = min(following) if following else len(rest)
        turns.append(("user" if marker == HUMAN else "assistant", rest[:end].strip()))
        rest = rest[end:]
    return turns


def _messages(value, where: str) -> Turns:
    if not isinstance(value, list) or not value:
        raise _Invalid(f"{where} is not a non-empty message list")
    turns = []
    for message in value:
        if not isinstance(message, dict):
            raise _Invalid(f"{where} holds a non-message")
        role_key, text_key = ("role", "content") if "role" in message else ("from", "value")
        role = _ROLE.get(str(message.get(role_key, "")).lower())
        if role is None or not isinstance(message.get(text_key), str):
            raise _Invalid(f"{where} has a message without a known role and string content")
        turns.append((role, message[text_key]))
    return turns


def _answer(value, where: str) -> str:
    """The assistant text of a chosen/rejected value: a string, one message, or a list ending with an assistant message."""
    if isinstance(value, str):
        return value
    turns = _messages([value] if isinstance(value, dict) else value, where)
    if turns[-1][0] != "assistant":
        raise _Invalid(f"{where} does not end with an assistant message")
    return turns[-1][1]


def _pair(row: dict, shape: str) -> tuple[Turns, str, str]:
    if shape == "orca":
        system = _text(row, "system", optional=True)
        return ([("system", system)] if system.strip() else []) + [("user", _text(row, "question"))], _text(row, "chosen"), _text(row, "rejected")
    if shape == "pairs":
        prompt, system = _text(row, "prompt"), _text(row, "system", optional=True)
        if HUMAN in prompt and prompt.rstrip().endswith(ASSISTANT.strip()):
            turns = _transcript_turns(prompt)
            if turns and turns[-1] == ("assistant", ""):
                turns = turns[:-1]
        else:
            turns = [("user", prompt)]
        return ([("system", system)] if system.strip() else []) + turns, _text(row, "chosen").strip(), _text(row, "rejected").strip()
    if shape == "trl":
        return _messages(row.get("prompt"), "prompt"), _answer(row.get("chosen"), "chosen"), _answer(row.get("rejected"), "rejected")
    if shape == "openai":
        messages = row["input"].get("messages") if isinstance(row.get("input"), dict) else None
        return (_messages(messages, "input.messages"), _answer(row.get("preferred_output"), "preferred_output"),
                _answer(row.get("non_preferred_output"), "non_preferred_output"))
    if shape == "sharegpt-preference":
        system = _text(row, "system", optional=True)
        turns = ([("system", system)] if system.strip() else []) + _messages(row.get("conversations"), "conversations")
        return turns, _answer(row.get("chosen"), "chosen"), _answer(row.get("rejected"), "rejected")
    if shape == "hh-rlhf":
        chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
        cut = chosen.rfind(ASSISTANT) + len(ASSISTANT)
        if cut < len(ASSISTANT) or not rejected.startswith(chosen[:cut]):
            raise _Invalid("chosen and rejected do not share a prompt ending with an assistant turn")
        turns = _transcript_turns(chosen[:cut])
        return turns[:-1] if turns and turns[-1] == ("assistant", "") else turns, chosen[cut:].strip(), rejected[cut:].strip()
    from loraflow.data.shapes import SHAPES

    raise LoraflowError(f"unknown preference format {shape!r}; known: {', '.join(s.name for s in SHAPES if s.objective == 'dpo')}")


def to_pairs(uri: str, rows: list[dict], shape: str) -> PreferencePairs:
    """Every valid row as a pair; the others counted under the reason they were dropped."""
    out = PreferencePairs()
    for row in rows:
        try:
            turns, chosen, rejected = _pair(row, shape)
            dialogue = [role for role, _ in turns if role != "system"]
            if not dialogue or not any(text.strip() for role, text in turns if role == "user"):
                raise _Invalid("empty prompt")
            if dialogue[-1] != "user":
                raise _Invalid("the prompt does not end with a user turn")
            if not chosen.strip():
                raise _Invalid("empty chosen")
            if not rejected.strip():
                raise _Invalid("empty rejected")
            if chosen.strip() == rejected.strip():
                raise _Invalid("chosen equals rejected")
        except _Invalid as reason:
            out.dropped[str(reason)] += 1
            continue
        out.turns.append(turns)
        out.chosen.append(chosen)
        out.rejected.append(rejected)
    if not out.turns:
        reasons = ", ".join(f"{count} {reason}" for reason, count in out.dropped.items())
        raise LoraflowError(f"{uri}: none of its {len(rows)} rows is a usable {shape} preference pair ({reasons}); "
                            f"check data.format (detected or set: {shape})")
    return out


def render(turns: Turns, answer: str, template: str, tokenizer) -> tuple[str, str]:
    """(prompt text up to where the answer starts, answer text with the template's end of turn)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": role, "content": text} for role, text in turns]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
        if not full.startswith(prompt):
            raise _Invalid("the tokenizer's chat template renders the prompt differently once answered")
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
        except _Invalid as reason:
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


def prepare_preference_dataset(data, dpo, tokenizer_path: str, out_dir, log=print) -> dict:
    """The preference data stage: train.parquet / val.parquet (prompt_ids, chosen_ids, rejected_ids), tokenizer/,
    stats.json. `data` is the config's DataSettings, `dpo` its DpoSettings."""
    import json
    from pathlib import Path

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from loraflow.data.formats import read_rows
    from loraflow.data.shapes import resolve_data
    from loraflow.data.templates import template_markers_not_in_vocabulary
    from loraflow.data.tokenize import load_tokenizer

    out_dir = Path(out_dir)
    rows = read_rows(data.path)
    if rows.under:
        log(f"{data.path}: {rows.note}")
    data = resolve_data(data, "dpo", rows)  # (a flow's config is resolved already: the same values, checked again)
    shape = data.format
    tokenizer = load_tokenizer(tokenizer_path, data.new_tokens)
    pairs = to_pairs(data.path, rows, shape)
    own_template = bool(getattr(tokenizer, "chat_template", None))
    template = "the tokenizer's chat template" if own_template else data.template
    split_markers = [] if own_template else template_markers_not_in_vocabulary(data.template, tokenizer)
    if split_markers:
        log(f"warning: the {data.template} template's markers {', '.join(split_markers)} are not tokens of this tokenizer "
            f"({type(tokenizer).__name__}): they are trained as plain multi-token text. Use a base whose tokenizer has them "
            "or a chat template of its own.")
    columns, truncations = tokenize_pairs(pairs, data.template, tokenizer, dpo.max_prompt_length, dpo.max_length)
    kept = len(columns["prompt_ids"])
    if kept == 0:
        reasons = ", ".join(f"{count} {reason}" for reason, count in pairs.dropped.items())
        raise LoraflowError(f"{data.path}: no usable pairs ({len(rows)} read; dropped: {reasons}); check dpo.max_length")
    log(f"formatted {kept} of {len(rows)} rows ({shape}) with {template}")
    val_rows, train_rows, val_note = split_validation(np.arange(kept), data.val_set_size, data.seed)
    if val_note:
        log(val_note)
    splits = {"val": val_rows, "train": train_rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, picked in splits.items():
        if len(picked):
            pq.write_table(pa.table({name: pa.array([values[i] for i in picked], pa.list_(pa.int32()))
                                     for name, values in columns.items()}), out_dir / f"{split}.parquet")
    tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(*columns.values())]
    all_ids = [i for values in columns.values() for row in values for i in row]
    stats = {
        "source": data.path,
        "format": shape,
        "rows_read": len(rows),
        "rows_kept": kept,
        "rows_dropped": dict(pairs.dropped),
        "train_rows": int(len(splits["train"])),
        "val_rows": int(len(splits["val"])),
        **({"val_note": val_note} if val_note else {}),
        "truncated_rows": int(truncations.pop("rows", 0)),
        "truncations": dict(truncations),
        "max_prompt_length": dpo.max_prompt_length,
        "max_length": dpo.max_length,
        "token_length_percentiles": {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 95, 99)} | {"max": int(max(lengths))},
        "tokens": int(sum(len(p) * 2 + len(c) + len(r) for p, c, r in zip(*columns.values()))),
        "template": template,
        "pad_token": tokenizer.pad_token,
        "pad_token_id": tokenizer.pad_token_id,
        "max_token_id": max(all_ids),
        "new_token_ids": {token: tokenizer.convert_tokens_to_ids(token) for token in data.new_tokens},
        "tokenizer_class": type(tokenizer).__name__,
        "template_markers_split": split_markers,
    } | ({"rows_under_key": rows.under} if rows.under else {})
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats
