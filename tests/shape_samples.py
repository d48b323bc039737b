"""A small file of every data shape loraflow knows, made from real rows (loraflow/data/sample: Alpaca-GPT4 rows for
the SFT shapes, Intel/orca_dpo_pairs rows for the preference shapes), each rewritten into that shape's fields.

Keyed by file stem; each names the registered shape it must be detected as. A shape registered in
loraflow.data.shapes without a writer here fails test_data_shapes (so every test generated from this covers it).
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "loraflow" / "data" / "sample"
SYSTEM = "Be brief."


def _alpaca(count: int) -> list[dict]:
    return json.loads((SAMPLE / "alpaca_gpt4_sample.json").read_text())[:count]


def _orca(count: int) -> list[dict]:
    return [json.loads(line) for line in (SAMPLE / "orca_dpo_pairs_sample.jsonl").read_text().splitlines()[:count]]


def _question(row: dict) -> str:
    return row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")


def _messages(row: dict, system: bool) -> list[dict]:
    turns = [{"role": "user", "content": _question(row)}, {"role": "assistant", "content": row["output"]}]
    return ([{"role": "system", "content": SYSTEM}] if system else []) + turns


def sft_rows(count: int) -> dict[str, tuple[str, list[dict]]]:
    rows = _alpaca(count)
    return {
        "alpaca": ("alpaca", rows),
        "sharegpt": ("sharegpt", [{"conversations": [{"from": "human", "value": _question(row)}, {"from": "gpt", "value": row["output"]}]}
                                  for row in rows]),
        "messages-with-system": ("messages", [{"messages": _messages(row, system=True)} for row in rows]),
        "messages": ("messages", [{"messages": _messages(row, system=False)} for row in rows]),
    }


def preference_rows(count: int) -> dict[str, tuple[str, list[dict]]]:
    rows = _orca(count)

    def assistant(text: str) -> dict:
        return {"role": "assistant", "content": text}

    def prompt(row: dict) -> list[dict]:
        return [{"role": "system", "content": row["system"]}, {"role": "user", "content": row["question"]}]

    return {
        "orca": ("orca", rows),
        "pairs": ("pairs", [{"system": row["system"], "prompt": row["question"], "chosen": row["chosen"], "rejected": row["rejected"]}
                            for row in rows]),
        "trl": ("trl", [{"prompt": prompt(row), "chosen": [assistant(row["chosen"])], "rejected": [assistant(row["rejected"])]}
                        for row in rows]),
        "openai": ("openai", [{"input": {"messages": prompt(row)}, "preferred_output": [assistant(row["chosen"])],
                               "non_preferred_output": [assistant(row["rejected"])]} for row in rows]),
        "sharegpt-preference": ("sharegpt-preference", [
            {"system": row["system"], "conversations": [{"from": "human", "value": row["question"]}],
             "chosen": {"from": "gpt", "value": row["chosen"]}, "rejected": {"from": "gpt", "value": row["rejected"]}} for row in rows]),
        "hh-rlhf": ("hh-rlhf", [{"chosen": f"\n\nHuman: {row['question']}\n\nAssistant: {row['chosen']}",
                                 "rejected": f"\n\nHuman: {row['question']}\n\nAssistant: {row['rejected']}"} for row in rows]),
    }


def every_shape(count: int) -> dict[str, tuple[str, list[dict]]]:
    """{file stem: (shape name, rows)}: at least one file of every registered shape."""
    return sft_rows(count) | preference_rows(count)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path
