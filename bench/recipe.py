"""The reference recipe loraflow replaces, re-implemented faithfully: ipex-llm's QLoRA Alpaca fine-tune
(alpaca_qlora_finetuning.py, itself alpaca-lora's finetune.py on a 4-bit base), on the CPU.

    .venv/bin/python bench/recipe.py MODEL_DIR TRAIN.json VAL.json OUT.json --steps 30 [--batch 16 --micro 2 ...]

What it does, as the recipe does: per-example tokenization through `datasets.map` (alpaca-lora's
generate_and_tokenize_prompt, shared with bench/tokenize.py), an NF4 base (no double quantization, bf16 compute),
`prepare_model_for_kbit_training` without gradient checkpointing, LoRA on every linear projection,
transformers' Trainer with micro batch 2 and gradient accumulation, `DataCollatorForSeq2Seq(pad_to_multiple_of=8)`,
bf16, adamw_torch, a cosine schedule without warmup, gradients clipped at 0.3, `use_cache` off. Writes the figures bench/train.py compares: non-pad tokens/s of the training
loop, its wall time, peak RSS (and RSS after imports), final eval loss.
"""

from __future__ import annotations

import sys

# This folder holds a tokenize.py that would shadow the standard library's while it is on sys.path.
_HERE = __file__.rsplit("/", 1)[0]
sys.path[:] = [p for p in sys.path if p not in ("", _HERE)]

import argparse
import importlib.util
import json
import resource
import tempfile
import time


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("model", "train", "val", "out"):
        parser.add_argument(name)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--train-on-inputs", action="store_true")
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments)

    spec = importlib.util.spec_from_file_location("bench_tokenize", f"{_HERE}/tokenize.py")
    bench_tokenize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_tokenize)
    imports_rss = _rss_mb()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"  # as the recipe
    train_rows = json.loads(open(args.train).read())
    val_rows = json.loads(open(args.val).read())
    train_set = bench_tokenize.recipe(train_rows, tokenizer, args.cutoff, args.train_on_inputs)
    val_set = bench_tokenize.recipe(val_rows, tokenizer, args.cutoff, args.train_on_inputs)

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quantization, dtype=torch.bfloat16,
                                                 device_map={"": "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                      if module.__class__.__name__ == "Linear4bit"})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=targets, bias="none",
                                             task_type="CAUSAL_LM"))
    with tempfile.TemporaryDirectory() as output:
        trainer = Trainer(
            model=model, train_dataset=train_set, eval_dataset=val_set,
            args=TrainingArguments(
                output_dir=output, per_device_train_batch_size=args.micro, per_device_eval_batch_size=args.micro,
                gradient_accumulation_steps=args.batch // args.micro, max_steps=args.steps, learning_rate=args.lr,
                max_grad_norm=0.3, bf16=True, optim="adamw_torch", lr_scheduler_type="cosine", logging_steps=10,
                eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, seed=42,
                data_seed=42, include_num_input_tokens_seen="non_padding", gradient_checkpointing=False,
            ),
            data_collator=DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True),
        )
        model.config.use_cache = False
        started = time.time()
        trainer.train()
        elapsed = time.time() - started
        eval_loss = trainer.evaluate()["eval_loss"]
    result = {"tokens_per_s": trainer.state.num_input_tokens_seen / elapsed, "train_runtime_s": elapsed,
              "tokens_seen": trainer.state.num_input_tokens_seen, "peak_rss_mb": _rss_mb(), "imports_rss_mb": imports_rss,
              "eval_loss": eval_loss, "train_rows": len(train_set), "val_rows": len(val_set),
              "val_input_ids": list(val_set["input_ids"])}
    with open(args.out, "w") as out:
        json.dump(result, out)


if __name__ == "__main__":
    main()
