"""How each preference shape's row becomes a pair: (prompt turns, chosen text, rejected text).

One reader per registered preference shape (loraflow.data.shapes names them and tells them apart):
- `orca_pair`: `system`, `question`, `chosen`, `rejected` strings (Intel/orca_dpo_pairs, the ipex-llm DPO recipe's data);
- `prompt_pair`: `prompt`, `chosen`, `rejected` strings, optional `system` (a `prompt` that is an hh-rlhf transcript,
  "\\n\\nHuman: …\\n\\nAssistant:", is split into its turns);
- `trl_pair`: TRL's conversational shape, `prompt`/`chosen`/`rejected` as message lists;
- `openai_pair`: OpenAI preference fine-tuning JSONL, `input.messages`, `preferred_output`, `non_preferred_output`;
- `sharegpt_pair`: LLaMA-Factory's, `conversations` [{from, value}] + `chosen`/`rejected` turns (optional `system`);
- `transcript_pair`: Anthropic hh-rlhf, `chosen`/`rejected` full transcripts; the prompt is their shared prefix up to
  the last "\\n\\nAssistant:".

A row that cannot be a pair raises `Invalid`, whose message is the reason it is counted under.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from loraflow.data.formats import ROLES
from loraflow.errors import LoraflowError

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"

Turns = list[tuple[str, str]]  # (role: system/user/assistant, text)
Pair = tuple[Turns, str, str]  # (prompt turns, chosen, rejected)


class Invalid(Exception):
    """A row that cannot be a preference pair; the message is the reason it is counted under."""


@dataclass
class PreferencePairs:
    turns: list[Turns] = field(default_factory=list)  # each pair's prompt conversation, ending with a user turn
    chosen: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)


def read_pairs(uri: str, rows: list[dict], shape: str, pair: Callable[[dict], Pair]) -> PreferencePairs:
    """Every valid row as a pair (`pair`: the shape's reader); the others counted under the reason they were dropped."""
    out = PreferencePairs()
    for row in rows:
        try:
            turns, chosen, rejected = pair(row)
            dialogue = [role for role, _ in turns if role != "system"]
            if not dialogue or not any(text.strip() for role, text in turns if role == "user"):
                raise Invalid("empty prompt")
            if dialogue[-1] != "user":
                raise Invalid("the prompt does not end with a user turn")
            if not chosen.strip():
                raise Invalid("empty chosen")
            if not rejected.strip():
                raise Invalid("empty rejected")
            if chosen.strip() == rejected.strip():
                raise Invalid("chosen equals rejected")
        except Invalid as reason:
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


def _text(row: dict, name: str, optional: bool = False) -> str:
    value = row.get(name)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise Invalid(f"missing or non-string {name}")
    return value


def _system(row: dict) -> Turns:
    system = _text(row, "system", optional=True)
    return [("system", system)] if system.strip() else []


def _transcript_turns(transcript: str) -> Turns:
    """An hh-rlhf transcript ("\\n\\nHuman: …\\n\\nAssistant: …") as turns."""
    turns: Turns = []
    position = transcript.find(HUMAN)
    if position < 0:
        raise Invalid("not an hh-rlhf transcript (no '\\n\\nHuman:')")
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
        raise Invalid(f"{where} is not a non-empty message list")
    turns = []
    for message in value:
        if not isinstance(message, dict):
            raise Invalid(f"{where} holds a non-message")
        role_key, text_key = ("role", "content") if "role" in message else ("from", "value")
        role = ROLES.get(str(message.get(role_key, "")).lower())
        if role is None or not isinstance(message.get(text_key), str):
            raise Invalid(f"{where} has a message without a known role and string content")
        turns.append((role, message[text_key]))
    return turns


def _answer(value, where: str) -> str:
    """The assistant text of a chosen/rejected value: a string, one message, or a list ending with an assistant message."""
    if isinstance(value, str):
        return value
    turns = _messages([value] if isinstance(value, dict) else value, where)
    if turns[-1][0] != "assistant":
        raise Invalid(f"{where} does not end with an assistant message")
    return turns[-1][1]


def orca_pair(row: dict) -> Pair:
    return _system(row) + [("user", _text(row, "question"))], _text(row, "chosen"), _text(row, "rejected")


def prompt_pair(row: dict) -> Pair:
    prompt = _text(row, "prompt")
    if HUMAN in prompt and prompt.rstrip().endswith(ASSISTANT.strip()):
        turns = _transcript_turns(prompt)
        if turns and turns[-1] == ("assistant", ""):
            turns = turns[:-1]
    else:
        turns = [("user", prompt)]
    return _system(row) + turns, _text(row, "chosen").strip(), _text(row, "rejected").strip()


def trl_pair(row: dict) -> Pair:
    return _messages(row.get("prompt"), "prompt"), _answer(row.get("chosen"), "chosen"), _answer(row.get("rejected"), "rejected")


def openai_pair(row: dict) -> Pair:
    messages = row["input"].get("messages") if isinstance(row.get("input"), dict) else None
    return (_messages(messages, "input.messages"), _answer(row.get("preferred_output"), "preferred_output"),
            _answer(row.get("non_preferred_output"), "non_preferred_output"))


def sharegpt_pair(row: dict) -> Pair:
    turns = _system(row) + _messages(row.get("conversations"), "conversations")
    return turns, _answer(row.get("chosen"), "chosen"), _answer(row.get("rejected"), "rejected")


def transcript_pair(row: dict) -> Pair:
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    cut = chosen.rfind(ASSISTANT) + len(ASSISTANT)
    if cut < len(ASSISTANT) or not rejected.startswith(chosen[:cut]):
        raise Invalid("chosen and rejected do not share a prompt ending with an assistant turn")
    turns = _transcript_turns(chosen[:cut])
    return turns[:-1] if turns and turns[-1] == ("assistant", "") else turns, chosen[cut:].strip(), rejected[cut:].strip()
