"""What this CPU can do at all on a model: forward and backward passes alone on full rows, no optimizer, no Trainer.

    .venv/bin/python bench/ceiling.py MODEL_DIR [--rows 6 --width 256 --steps 4]

The same NF4 base (bf16 compute), LoRA r8 on every linear layer without dropout, bf16 autocast, no gradient
checkpointing, as loraflow's defaults train; random token ids, every token trained. Prints tokens/s of the passes
(after one warm-up pass): no training loop, however lean, runs faster, so it bounds what any recipe reaches here.
bench/train.py prints it beside the recipe's figure.
"""

from __future__ import annotations

import sys

# bench/tokenize.py would shadow the standard library's `tokenize` while this folder is on sys.path.
_HERE = __file__.rsplit("/", 1)[0]
sys.path[:] = [p for p in sys.path if p not in ("", _HERE)]

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--rows", type=int, default=6)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quantization, dtype=torch.bfloat16,
                                                 device_map={"": "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (args.rows, args.width))

    def passes() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()

    passes()
    started = time.time()
    for _ in range(args.steps):
        passes()
    elapsed = time.time() - started
    print(json.dumps({"tokens_per_s": args.rows * args.width * args.steps / elapsed, "rows": args.rows, "width": args.width}))


if __name__ == "__main__":
    main()
