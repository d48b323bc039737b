"""Prompt templates.

Alpaca-style templates are the JSON files of alpaca-lora (copied byte-for-byte, see SOURCE.md) and are
filled with `str.format`, as alpaca-lora's Prompter does, so prompts are byte-identical to the seeds'.
Conversation templates render turns into (text, trained) segments so the loss mask follows the roles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

from loraflow.config import ALPACA_TEMPLATES, CONVERSATION_TEMPLATES
from loraflow.errors import LoraflowError

# FastChat's vicuna_v1.1 conversation (fastchat/conversation.py): system, then "USER: …" and
# "ASSISTANT: …" joined by " " after user turns and by the EOS token after assistant turns.
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class AlpacaTemplate:
    name: str
    prompt_input: str
    prompt_no_input: str
    response_split: str

    def prompt(self, instruction: str, input: str = "") -> str:
        if input:
            return self.prompt_input.format(instruction=instruction, input=input)
        return self.prompt_no_input.format(instruction=instruction)


@cache
def alpaca_template(name: str) -> AlpacaTemplate:
    if name not in ALPACA_TEMPLATES:
        raise LoraflowError(f"unknown alpaca template {name!r}; available: {', '.join(ALPACA_TEMPLATES)}")
    raw = json.loads(resources.files("loraflow.data").joinpath("templates", f"{name}.json").read_text("utf-8"))
    return AlpacaTemplate(name, raw["prompt_input"], raw["prompt_no_input"], raw["response_split"])


Segment = tuple[str, bool]  # (text, whether the loss is computed on it)


def render_conversation(template: str, turns: list[tuple[str, str]], eos_token: str) -> list[Segment]:
    """Turns [(role, text)] with roles system/user/assistant to segments; assistant text is trained."""
    system = next((text for role, text in turns if role == "system"), None)
    dialogue = [(role, text) for role, text in turns if role != "system"]
    segments: list[Segment] = []
    if template == "vicuna_v1.1":
        segments.append(((system if system is not None else VICUNA_SYSTEM) + " ", False))
        for role, text in dialogue:
            if role == "user":
                segments.append((f"USER: {text} ", False))
            else:
                segments.append(("ASSISTANT:", False))
                segments.append((f" {text}{eos_token}", True))
    elif template == "chatml":
        if system is not None:
            segments.append((f"<|im_start|>system\n{system}<|im_end|>\n", False))
        for role, text in dialogue:
            if role == "user":
                segments.append((f"<|im_start|>user\n{text}<|im_end|>\n", False))
            else:
                segments.append(("<|im_start|>assistant\n", False))
                segments.append((f"{text}<|im_end|>", True))
                segments.append(("\n", False))
        if segments and segments[-1] == ("\n", False):
            segments.pop()
    else:
        raise LoraflowError(
            f"unknown conversation template {template!r}; available: {', '.join(CONVERSATION_TEMPLATES)}"
        )
    return segments
