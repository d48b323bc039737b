"""Supervised fine-tuning (`objective: sft`): transformers' Trainer on the data stage's input_ids/labels (labels already
masked), padded per micro batch or packed (loraflow/data/packing.py).

Config: loraflow.config.FinetuneConfig (no section of its own). Data: the SFT shapes of loraflow.data.shapes
(instructions, conversations). Flow `loraflow-sft` (flows/sft.py), deployments `sft-<pool>`. No stage of its own.
"""

from __future__ import annotations

from pathlib import Path

from loraflow import adapters
from loraflow.backends import backend
from loraflow.config import FinetuneConfig
from loraflow.objectives.common import Objective, arguments_for, longest


class Sft(Objective):
    name = "sft"
    config = FinetuneConfig
    flow = "loraflow-sft"
    entrypoint = "flows.sft:sft"
    deployment = "sft"
    reports_perplexity = True  # exp(eval loss): the mean token loss on the validation split
    trains_on_rows_used = False  # the trainer's own sampler picks the rows (nothing is precomputed per row)

    @classmethod
    def prepare_dataset(cls, config: FinetuneConfig, tokenizer_path: str, out_dir: Path, log) -> dict:
        from loraflow.data.sft import prepare_dataset  # (numpy, pyarrow, tokenizers: ~0.3 s that loading a config need not pay)

        return prepare_dataset(config.data, tokenizer_path, out_dir, log)

    def __init__(self, spec):
        super().__init__(spec)
        self.padded_because = self._why_not_packed(spec) if spec.train.packing else ""
        self.packed = spec.train.packing and not self.padded_because
        self.row_tokens = 0

    @staticmethod
    def _why_not_packed(spec) -> str:
        if not (method := adapters.method(spec.adapter_method)).packs:  # (prompt and prefix tuning: virtual tokens)
            return f"{method.words} {method.unpacked_because}"
        return backend(spec.backend).packing_refusal  # ("" where the backend packs)

    def tokens_per_example(self, train_set) -> int:
        """For the memory plan: the longest row (a padded micro batch is as wide; packed rows are no wider)."""
        self.row_tokens = longest(train_set, "input_ids")
        return self.row_tokens

    def arguments(self, common: dict):
        from transformers import TrainingArguments

        return arguments_for(TrainingArguments, {**common, "include_num_input_tokens_seen": "non_padding"})

    def trainer(self, run, model, args, train_set, val_set, tokenizer, callbacks):
        import inspect

        from transformers import DataCollatorForSeq2Seq, Trainer

        if self.packed:  # the same examples per micro batch, in fewer rows (loraflow/data/packing.py)
            from loraflow.data.packing import PackedCollator  # (imports torch, which loading a config must not)

            collator = PackedCollator(tokenizer.pad_token_id, row_tokens=self.row_tokens or longest(train_set, "input_ids"))
        else:
            collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
        # (transformers before 4.46, in the ipex-llm backend's environment, calls the tokenizer `tokenizer`)
        tokenizer_name = "processing_class" if "processing_class" in inspect.signature(Trainer.__init__).parameters else "tokenizer"
        return Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=val_set, callbacks=callbacks,
                       data_collator=collator, **{tokenizer_name: tokenizer})

    def tokens_seen(self, trainer) -> int:
        return trainer.state.num_input_tokens_seen
