"""Every accepted preference shape becomes the same prompt/chosen/rejected text; invalid rows are counted by reason."""

import gzip
import json
from types import SimpleNamespace

import pytest

from loraflow.data.preference import render, to_pairs
from loraflow.data.shapes import detect_shape
from loraflow.errors import LoraflowError

NO_TEMPLATE = SimpleNamespace(chat_template=None, eos_token="</s>")
SYSTEM = "You are terse."
CHATML_PROMPT = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"

SHAPES = {
    "orca": {"system": SYSTEM, "question": "What is 2+2?", "chosen": "4", "rejected": "5"},
    "pairs": {"system": SYSTEM, "prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    "trl": {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 2+2?"}],
            "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]},
    "openai": {"input": {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 2+2?"}]},
               "preferred_output": [{"role": "assistant", "content": "4"}],
               "non_preferred_output": [{"role": "assistant", "content": "5"}]},
    "sharegpt-preference": {"system": SYSTEM, "conversations": [{"from": "human", "value": "What is 2+2?"}],
                            "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}},
}


@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape_is_detected_and_formats_to_the_same_chatml_text(shape):
    row = SHAPES[shape]
    assert detect_shape("d.jsonl", [row]).name == shape
    pairs = to_pairs("d.jsonl", [row], shape)
    prompt, chosen = render(pairs.turns[0], pairs.chosen[0], "chatml", NO_TEMPLATE)
    again, rejected = render(pairs.turns[0], pairs.rejected[0], "chatml", NO_TEMPLATE)
    assert (prompt, chosen, rejected) == (CHATML_PROMPT, "4<|im_end|>", "5<|im_end|>")  # the turn end is the template's
    assert again == prompt


def test_hh_rlhf_transcripts_split_at_the_last_assistant_turn(shared_data):
    with gzip.open(shared_data / "hh_rlhf_harmless_base_test.jsonl.gz", "rt") as stream:
        rows = [json.loads(line) for _, line in zip(range(50), stream)]
    assert detect_shape("d.jsonl", [rows[0]]).name == "hh-rlhf"
    pairs = to_pairs("hh.jsonl.gz", rows, "hh-rlhf")
    assert len(pairs.turns) + sum(pairs.dropped.values()) == 50
    first = pairs.turns[0]
    assert first[0] == ("user", "what are some pranks with a pen i can do?") and first[-1][0] == "user"
    roles = [role for role, _ in first]
    assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"] and len(roles) >= 3
    assert rows[0]["chosen"].endswith(pairs.chosen[0]) and rows[0]["rejected"].endswith(pairs.rejected[0])
    prompt, _ = render(first, pairs.chosen[0], "chatml", NO_TEMPLATE)
    assert prompt.count("<|im_start|>user\n") == roles.count("user") and prompt.endswith("<|im_start|>assistant\n")

    # The derived file (prompt = the transcript up to the last "Assistant:") gives the same pairs through `pairs`.
    derived = [json.loads(line) for _, line in zip(range(50), (shared_data / "hh_rlhf_harmless_base_test_1k.jsonl").open())]
    assert detect_shape("d.jsonl", [derived[0]]).name == "pairs"
    again = to_pairs("hh_1k.jsonl", derived, "pairs")
    assert again.turns[0] == first and again.chosen[0] == pairs.chosen[0]


def test_orca_dpo_pairs_rows(shared_data):
    rows = [json.loads(line) for line in (shared_data / "orca_dpo_pairs.jsonl").open()]
    assert detect_shape("d.jsonl", [rows[0]]).name == "orca"
    pairs = to_pairs("orca.jsonl", rows, "orca")
    assert len(pairs.turns) + sum(pairs.dropped.values()) == len(rows) == 284
    assert pairs.turns[0][0] == ("system", rows[0]["system"]) and pairs.turns[0][1] == ("user", rows[0]["question"])


def test_vicuna_template_ends_the_answer_with_eos_and_a_tokenizer_template_wins():
    pairs = to_pairs("d.jsonl", [SHAPES["pairs"]], "pairs")
    prompt, chosen = render(pairs.turns[0], "4", "vicuna_v1.1", NO_TEMPLATE)
    assert prompt == f"{SYSTEM} USER: What is 2+2? ASSISTANT:" and chosen == " 4</s>"

    class Templated:
        chat_template = "mine"
        eos_token = "</s>"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt=False):
            text = "".join(f"[{m['role']}]{m['content']}[end]" for m in messages)
            return text + ("[assistant]" if add_generation_prompt else "")

    prompt, chosen = render(pairs.turns[0], "4", "chatml", Templated())
    assert prompt == f"[system]{SYSTEM}[end][user]What is 2+2?[end][assistant]" and chosen == "4[end]"


INVALID = [
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "empty prompt"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "empty chosen"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "empty rejected"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen equals rejected"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "missing or non-string chosen"),
    ({"prompt": "q", "rejected": "b"}, "missing or non-string chosen"),
]


def test_invalid_rows_are_dropped_with_counts_and_none_left_is_an_error():
    valid = {"prompt": "q", "chosen": "a", "rejected": "b"}
    pairs = to_pairs("d.jsonl", [valid] + [row for row, _ in INVALID], "pairs")
    assert len(pairs.turns) == 1
    assert dict(pairs.dropped) == {"empty prompt": 1, "empty chosen": 1, "empty rejected": 1, "chosen equals rejected": 1,
                                   "missing or non-string chosen": 2}
    with pytest.raises(LoraflowError, match=r"d\.jsonl: none of its 6 rows is a usable pairs preference pair \(1 empty prompt, "):
        to_pairs("d.jsonl", [row for row, _ in INVALID], "pairs")
    assert detect_shape("d.jsonl", [{"instruction": "x", "output": "y"}]).objective == "sft"
