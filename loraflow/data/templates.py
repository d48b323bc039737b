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

from loraflow.errors import LoraflowError

# The alpaca-style templates, each a JSON file under templates/ (the order is the form's).
ALPACA_TEMPLATES = ("alpaca", "alpaca_legacy", "alpaca_short", "vigogne")

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


@dataclass(frozen=True)
class ConversationTemplate:
    """How turns are written; each field is formatted with the turn's text (and {eos})."""

    system: str
    default_system: str | None
    user: str
    assistant_prefix: str
    assistant: str  # the trained part
    between_turns: str = ""


CONVERSATION = {
    # FastChat's vicuna_v1.1 (fastchat/conversation.py, SeparatorStyle.ADD_COLON_TWO): system, then
    # "USER: …" and "ASSISTANT: …" joined by " " after user turns and by EOS after assistant turns.
    "vicuna_v1.1": ConversationTemplate(
        system="{text} ", default_system=VICUNA_SYSTEM, user="USER: {text} ",
        assistant_prefix="ASSISTANT:", assistant=" {text}{eos}",
    ),
    "chatml": ConversationTemplate(
        system="<|im_start|>system\n{text}<|im_end|>\n", default_system=None, user="<|im_start|>user\n{text}<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n", assistant="{text}<|im_end|>", between_turns="\n",
    ),
}
CONVERSATION_TEMPLATES = tuple(CONVERSATION)


def render_conversation(template: str, turns: list[tuple[str, str]], eos_token: str) -> list[Segment]:
    """Turns [(role, text)] with roles system/user/assistant to segments; assistant text is trained."""
    if template not in CONVERSATION:
        raise LoraflowError(
            f"unknown conversation template {template!r}; available: {', '.join(CONVERSATION_TEMPLATES)}"
        )
    style = CONVERSATION[template]
    system = next((text for role, text in turns if role == "system"), style.default_system)
    dialogue = [(role, text) for role, text in turns if role != "system"]
    segments: list[Segment] = [] if system is None else [(style.system.format(text=system), False)]
    for position, (role, text) in enumerate(dialogue):
        if role == "user":
            segments.append((style.user.format(text=text), False))
            continue
        segments.append((style.assistant_prefix, False))
        segments.append((style.assistant.format(text=text, eos=eos_token), True))
        if style.between_turns and position < len(dialogue) - 1:
            segments.append((style.between_turns, False))
    return segments


# The markers a conversation template writes around turns; a tokenizer that lacks them as single
# tokens splits them into pieces the model must learn as text.
TEMPLATE_MARKERS = {"chatml": ("<|im_start|>", "<|im_end|>"), "vicuna_v1.1": ()}


def template_markers_not_in_vocabulary(template: str, tokenizer) -> list[str]:
    vocabulary = tokenizer.get_vocab()
    return [marker for marker in TEMPLATE_MARKERS.get(template, ()) if marker not in vocabulary]


def generation_prompt(data_format: str, template: str, text: str) -> str:
    """The prompt a fine-tuned model expects for one user message: the template up to where the answer starts."""
    if template in ALPACA_TEMPLATES:
        return alpaca_template(template).prompt(text)
    segments = render_conversation(template, [("user", text)], eos_token="")
    return "".join(segment for segment, _ in segments) + CONVERSATION[template].assistant_prefix
