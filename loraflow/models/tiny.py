"""A small Llama-architecture model that loraflow builds itself: random weights, a byte-level BPE
tokenizer trained on local text. It stands in for a hub model where no hub is reachable, and goes
through exactly the same `from_pretrained` path as a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch


def build_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    # Like Llama: BOS prepended, EOS left to the data pipeline.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def build_tiny_llama(
    out_dir: str | Path,
    texts: list[str],
    vocab_size: int = 2048,
    hidden_size: int = 128,
    layers: int = 2,
    heads: int = 4,
    initializer_range: float = 0.1,
    seed: int = 0,
    intermediate_size: int | None = None,
) -> Path:
    """Write a tokenizer + randomly initialised LlamaForCausalLM to out_dir (about 3 MB)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(texts, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        # With the usual 0.02 and a small hidden size, a frozen lm_head can only produce logits of
        # magnitude ~1, so an adapter on the linear layers cannot move the loss far from uniform.
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def sample_texts(rows: list[dict]) -> list[str]:
    """Tokenizer training text from alpaca rows."""
    return [" ".join(str(row.get(k, "")) for k in ("instruction", "input", "output")) for row in rows]
