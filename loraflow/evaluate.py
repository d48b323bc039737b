"""The evaluation stage: task metrics and a forgetting check, on the base model (before) and with the run's adapter
(after), one model in memory (the adapter switched off for "before").

- Task metrics (`evaluation.tasks_path`): each prompt answered greedily with the run's template, batched; scored
  against its reference by exact match (after `answer_pattern` extraction) and ROUGE-L. Every prompt's before and
  after answers are kept in outputs.jsonl, and the first few go into the run's summary.
- Forgetting check (`evaluation.general_text_path`): the mean token loss and perplexity on general text.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from loraflow.data.formats import read_rows
from loraflow.data.templates import generation_prompt
from loraflow.data.tokenize import load_tokenizer
from loraflow.errors import LoraflowError
from loraflow.generate import answer
from loraflow.models import native
from loraflow.storage import open_url

GENERAL_TOKENS = 256  # tokens of each general-text row scored (the rest of a long document is left out)
EXAMPLES = 5  # prompts shown before/after in the run's summary


# ---- scoring ------------------------------------------------------------------------------------
def perplexity(loss: float | None) -> float | None:
    """exp of a mean token loss; None for no loss, NaN, or one whose exp overflows (past 709)."""
    return math.exp(loss) if loss is not None and math.isfinite(loss) and loss < 700 else None



def extract_answer(text: str, pattern: str = "") -> str:
    """The part of a text that is the answer: the pattern's first group (else its whole match), or the trimmed text.
    No match gives the empty string, which matches nothing but an empty reference."""
    if not pattern:
        return text.strip()
    found = re.search(pattern, text)
    if found is None:
        return ""
    return (found.group(1) if found.groups() else found.group(0)).strip()


def exact_match(prediction: str, reference: str, pattern: str = "") -> bool:
    return extract_answer(prediction, pattern) == extract_answer(reference, pattern)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on lowercased whitespace tokens: the longest common subsequence against both lengths.

    Written here (a dozen lines of dynamic programming) rather than taken from rouge-score, which would add a
    dependency and NLTK for the same number (its default tokenizer also lowercases and splits on non-alphanumerics;
    that splitting differs from this one on punctuation)."""
    candidate, target = prediction.lower().split(), reference.lower().split()
    if not candidate or not target:
        return float(candidate == target)
    previous = [0] * (len(target) + 1)
    for word in candidate:
        current = [0]
        for j, other in enumerate(target):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate), common / len(target)
    return 2 * precision * recall / (precision + recall)


# ---- inputs -------------------------------------------------------------------------------------
def read_tasks(uri: str, limit: int) -> list[tuple[str, str]]:
    """(prompt, reference answer) pairs: `prompt`/`answer`, or Alpaca's `instruction` (+ `input`) / `output`."""
    pairs = []
    for index, row in enumerate(read_rows(uri)[:limit]):
        prompt = row.get("prompt") or "\n\n".join(part for part in (row.get("instruction"), row.get("input")) if part)
        reference = row.get("answer", row.get("output"))
        if not isinstance(prompt, str) or not prompt or not isinstance(reference, str):
            raise LoraflowError(f"{uri}: row {index} needs a prompt (prompt, or instruction and input) and its reference "
                                f"answer (answer or output) as strings; it has {', '.join(sorted(row)) or 'no fields'}")
        pairs.append((prompt, reference))
    if not pairs:
        raise LoraflowError(f"{uri}: no rows; evaluation.tasks_path needs prompts with reference answers")
    return pairs


def read_general_text(uri: str, limit: int) -> list[str]:
    """Documents: the non-empty lines of a plain-text file, or the `text` of JSON/JSONL/parquet rows."""
    if uri.rsplit("/", 1)[-1].lower().split(".")[-1] in ("txt", "text", "md"):
        with open_url(uri, "r") as stream:
            texts = [line.strip() for line in stream if line.strip()]
    else:
        rows = read_rows(uri)
        texts = [row.get("text") for row in rows]
        if not all(isinstance(text, str) for text in texts):
            raise LoraflowError(f"{uri}: every row needs a `text` string for evaluation.general_text_path (or use a .txt file)")
    if not texts:
        raise LoraflowError(f"{uri}: no text in evaluation.general_text_path")
    return texts[:limit]


# ---- the model ----------------------------------------------------------------------------------
def _mean_token_loss(model, tokenizer, texts: list[str]) -> float:
    import torch

    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=GENERAL_TOKENS)["input_ids"].to(model.device)
        if ids.shape[1] < 2:
            continue
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        total, count = total + float(loss) * (ids.shape[1] - 1), count + ids.shape[1] - 1
    return total / count if count else float("nan")


def evaluate_adapter(settings, base_dir: Path, adapter_dir: Path, data_format: str, template: str, device: str,
                     precision: str, out: Path, trust_remote_code: bool = False, log=print) -> dict:
    """Write outputs.jsonl (every prompt's reference, before and after answers) into out; return the metrics."""
    tokenizer = load_tokenizer(str(adapter_dir))  # the export stage keeps the tokenizer the run trained with
    model = native.with_adapter(native.load_causal_lm(base_dir, device, precision, None, trust_remote_code), adapter_dir, tokenizer).eval()
    metrics: dict = {}
    if settings.tasks_path:
        pairs = read_tasks(settings.tasks_path, settings.max_rows)
        prompts = [generation_prompt(data_format, template, prompt) for prompt, _ in pairs]
        with model.disable_adapter():
            before = answer(model, tokenizer, prompts, settings.max_new_tokens)
        after = answer(model, tokenizer, prompts, settings.max_new_tokens)
        references = [reference for _, reference in pairs]
        for name, answers in (("before", before), ("after", after)):
            metrics[f"exact_match_{name}"] = sum(exact_match(a, r, settings.answer_pattern) for a, r in zip(answers, references)) / len(pairs)
            metrics[f"rouge_l_{name}"] = sum(rouge_l(a, r) for a, r in zip(answers, references)) / len(pairs)
        metrics["task_rows"] = len(pairs)
        # The first few side by side in the run's summary (shortened: a record stays small); all in outputs.jsonl.
        metrics["examples"] = [{"prompt": prompt[:300], "reference": reference[:300], "before": was[:300], "after": now[:300]}
                               for (prompt, reference), was, now in list(zip(pairs, before, after))[:EXAMPLES]]
        with (out / "outputs.jsonl").open("w") as stream:
            for (prompt, reference), was, now in zip(pairs, before, after):
                stream.write(json.dumps({"prompt": prompt, "reference": reference, "before": was, "after": now}) + "\n")
        log(f"task metrics on {len(pairs)} prompts: exact match {metrics['exact_match_before']:.3f} → {metrics['exact_match_after']:.3f}, "
            f"ROUGE-L {metrics['rouge_l_before']:.3f} → {metrics['rouge_l_after']:.3f}")
    if settings.general_text_path:
        texts = read_general_text(settings.general_text_path, settings.max_rows)
        with model.disable_adapter():
            metrics["general_loss_before"] = _mean_token_loss(model, tokenizer, texts)
        metrics["general_loss_after"] = _mean_token_loss(model, tokenizer, texts)
        for name in ("before", "after"):
            loss = metrics[f"general_loss_{name}"]
            metrics[f"general_perplexity_{name}"] = perplexity(loss)
        metrics["general_rows"] = len(texts)
        log(f"forgetting check on {len(texts)} general-text rows: loss {metrics['general_loss_before']:.4f} → "
            f"{metrics['general_loss_after']:.4f}")
    return metrics
