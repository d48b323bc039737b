"""What differs between training objectives: their data, collator and trainer class. Everything else (model
setup, resume, checkpoint commits, metrics, ranks) is the shared path in loraflow/train.py.

- `sft`: transformers' Trainer on the data stage's input_ids/labels (labels already masked).
- `dpo`: TRL's DPOTrainer on pre-tokenized pairs (prompt_ids/chosen_ids/rejected_ids from the preference data
  stage). The reference is the policy's own base with the adapter disabled (one base copy in memory), or the
  log-probs precomputed by the reference stage, in which case training runs no reference forward pass at all.
"""

from __future__ import annotations

import os
from pathlib import Path

from loraflow.config import PROMPT_METHODS
from loraflow.models import native

# Reference forward passes this process ran (each over one batch): 0 when training reads precomputed log-probs.
REFERENCE_FORWARDS = 0


def load_split(dataset_dir: Path, split: str, extra_columns: Path | None = None, only=None):
    """A split of a data stage's output as a datasets.Dataset (None if the stage wrote no such split), cut to the row
    indices `only` when given, with the columns of a second parquet of the same rows beside it (the precomputed
    reference log-probs)."""
    from datasets import Dataset, concatenate_datasets

    path = dataset_dir / f"{split}.parquet"
    if not path.exists():
        return None
    rows = Dataset.from_parquet(str(path))
    if only is not None:
        rows = rows.select(only)
    if extra_columns is not None and (extra_columns / f"{split}.parquet").exists():
        extra = Dataset.from_parquet(str(extra_columns / f"{split}.parquet"))
        if len(extra) != len(rows):
            from loraflow.errors import LoraflowError

            raise LoraflowError(f"{extra_columns}/{split}.parquet has {len(extra)} rows for {len(rows)} pairs; delete it to rebuild it")
        rows = concatenate_datasets([rows, extra], axis=1)
    return rows


def _longest(dataset, *columns: str) -> int:
    """The most tokens any row has in `columns` together (pyarrow's list lengths: no row is decoded)."""
    import pyarrow.compute as pc

    table = dataset.data.table if hasattr(dataset.data, "table") else dataset.data
    lengths = [pc.list_value_length(table.column(column)) for column in columns]
    total = lengths[0]
    for more in lengths[1:]:
        total = pc.add(total, more)
    return int(pc.max(total).as_py() or 0)


def arguments_for(cls, fields: dict):
    """cls(**fields) with the TrainingArguments of the installed transformers. The ipex-llm backend's environment has
    transformers 4.36, which names some fields otherwise and lacks others: what it lacks is left out and said."""
    import dataclasses
    import transformers

    known = {field.name for field in dataclasses.fields(cls)}
    if "eval_strategy" not in known:  # (renamed in transformers 4.41)
        fields = {("evaluation_strategy" if name == "eval_strategy" else name): value for name, value in fields.items()}
    if "train_sampling_strategy" not in known and "train_sampling_strategy" in fields:  # (before: a flag)
        fields["group_by_length"] = fields.pop("train_sampling_strategy") == "group_by_length"
    lacking = {name: value for name, value in fields.items() if name not in known}
    if (wanted := [name for name, value in lacking.items() if value]) and os.environ.get("RANK", "0") == "0":  # (said once)
        print(f"transformers {transformers.__version__} has no {', '.join(sorted(wanted))}: "
              f"{'the starting model is not evaluated (no baseline eval loss); ' if 'eval_on_start' in wanted else ''}"
              "training goes on without it", flush=True)
    return cls(**{name: value for name, value in fields.items() if name in known})


class Sft:
    name = "sft"
    reports_perplexity = True  # exp(eval loss): the mean token loss on the validation split
    trains_on_rows_used = False  # the trainer's own sampler picks the rows (nothing is precomputed per row)

    def __init__(self, spec):
        self.spec = spec
        self.padded_because = self._why_not_packed(spec) if spec.train.packing else ""
        self.packed = spec.train.packing and not self.padded_because
        self.row_tokens = 0

    @staticmethod
    def _why_not_packed(spec) -> str:
        if spec.adapter_method in PROMPT_METHODS:
            # Their virtual tokens would come before the first of a packed row's examples only.
            return f"{spec.adapter_method.replace('-', ' ')} puts its virtual tokens before every row"
        if spec.backend == "ipex-llm":
            # Packed rows rely on transformers 5 building a mask that keeps a row's examples apart.
            return "the ipex-llm backend's transformers 4.36 cannot keep packed examples apart"
        return ""

    def tokens_per_example(self, train_set) -> int:
        """For the memory plan: the longest row (a padded micro batch is as wide; packed rows are no wider)."""
        self.row_tokens = _longest(train_set, "input_ids")
        return self.row_tokens

    def arguments(self, common: dict):
        from transformers import TrainingArguments

        return arguments_for(TrainingArguments, {**common, "include_num_input_tokens_seen": "non_padding"})

    def trainer(self, run, model, args, train_set, val_set, tokenizer, callbacks):
        import inspect

        from transformers import DataCollatorForSeq2Seq, Trainer

        if self.packed:  # the same examples per micro batch, in fewer rows (loraflow/data/packing.py)
            from loraflow.data.packing import PackedCollator

            collator = PackedCollator(tokenizer.pad_token_id, row_tokens=self.row_tokens or _longest(train_set, "input_ids"))
        else:
            collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
        # (transformers before 4.46, in the ipex-llm backend's environment, calls the tokenizer `tokenizer`)
        tokenizer_name = "processing_class" if "processing_class" in inspect.signature(Trainer.__init__).parameters else "tokenizer"
        return Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=val_set, callbacks=callbacks,
                       data_collator=collator, **{tokenizer_name: tokenizer})

    def tokens_seen(self, trainer) -> int:
        return trainer.state.num_input_tokens_seen

    def summary(self, logged: list[dict]) -> dict:
        return {}


# Where the reference stage's progress lines go (set by loraflow.train.compute_reference_logps to the stage's log).
REFERENCE_PROGRESS_LOG = print


class ReferenceProgress:
    """'reference log-probs: 40 of 80 train pairs (12 s)' about every tenth of the pass and at its end."""

    def __init__(self, name: str, pairs: int, batch_size: int, log):
        import time

        self.name, self.pairs, self.batch_size, self.log = name, pairs, batch_size, log
        self.done, self.started, self.clock = 0, time.monotonic(), time.monotonic

    def batch_done(self) -> None:
        before = self.done
        self.done = min(self.pairs, self.done + self.batch_size)
        if self.done == self.pairs or 10 * self.done // self.pairs > 10 * before // self.pairs:
            self.log(f"reference log-probs: {self.done} of {self.pairs} {self.name} pairs ({self.clock() - self.started:.0f} s)")


def _dpo_trainer_class():
    from trl import DPOTrainer

    class LoraflowDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer, given what loraflow's stages already made: tokenized pairs (the preference data stage
        truncates prompts and answers to the run's lengths, so TRL's own tokenization is skipped) and, when the
        reference stage ran, the reference log-probs as columns (TRL would otherwise recompute them)."""

        def __init__(self, *args, **kwargs):
            import torch

            super().__init__(*args, **kwargs)
            # TRL (1.16) casts a quantized model's trainable parameters to bf16 (the QLoRA paper's choice), whatever the
            # run's precision, and the optimizer then updates them there: a step smaller than bf16's spacing at the
            # weight's value is lost. IA3's scales (near 1, spacing 1/128) did not move at all at the DPO recipe's
            # learning rate, and most LoRA A entries stayed unchanged at 5e-5. The adapter trains in fp32, as in SFT
            # (autocast still computes in bf16 where the run's precision is bf16).
            for parameter in self.model.parameters():
                if parameter.requires_grad and parameter.dtype != torch.float32:
                    parameter.data = parameter.data.float()

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" in dataset.column_names:
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            if "ref_chosen_logps" in dataset.column_names:
                return dataset
            # Progress goes to the stage's log (the Prefect run's), not tqdm's bar on the worker's stderr.
            self._reference_progress = ReferenceProgress(name, len(dataset), batch_size, REFERENCE_PROGRESS_LOG)
            previous = os.environ.get("TQDM_DISABLE")
            os.environ["TQDM_DISABLE"] = "1"
            try:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            finally:
                os.environ.pop("TQDM_DISABLE") if previous is None else os.environ.__setitem__("TQDM_DISABLE", previous)
                self._reference_progress = None

        def compute_ref_log_probs(self, *args, **kwargs):
            global REFERENCE_FORWARDS
            REFERENCE_FORWARDS += 1
            result = super().compute_ref_log_probs(*args, **kwargs)
            if getattr(self, "_reference_progress", None) is not None:
                self._reference_progress.batch_done()
            return result

        def _compute_loss(self, model, inputs, *args, **kwargs):
            if not self.precompute_ref_logps:
                global REFERENCE_FORWARDS
                REFERENCE_FORWARDS += 1  # the adapter-disabled (or separate) reference runs inside this loss
            return super()._compute_loss(model, inputs, *args, **kwargs)

    return LoraflowDPOTrainer


class Dpo:
    name = "dpo"
    reports_perplexity = False  # its eval loss is the preference loss, not a token loss
    # Trains on the pairs its steps reach (loraflow.data.split.training_subset): its reference stage computes only those.
    trains_on_rows_used = True

    packed = False  # TRL pads the pairs
    padded_because = ""

    def __init__(self, spec):
        self.spec = spec
        self.dpo = spec.dpo

    def tokens_per_example(self, train_set) -> int:
        """For the memory plan: a pair's chosen and rejected sequences (prompt + answer), at the longest pair's lengths."""
        return 2 * max(_longest(train_set, "prompt_ids", "chosen_ids"), _longest(train_set, "prompt_ids", "rejected_ids"))

    def arguments(self, common: dict, precompute: bool | None = None):
        from trl import DPOConfig

        precompute = bool(self.spec.reference_uri) if precompute is None else precompute
        return DPOConfig(**common, beta=self.dpo.beta, loss_type=[self.dpo.loss_type], max_length=self.dpo.max_length,
                         precompute_ref_log_probs=precompute, remove_unused_columns=False)

    def trainer(self, run, model, args, train_set, val_set, tokenizer, callbacks):
        ref_model = None  # the policy with its adapter disabled (TRL's PEFT reference), unless:
        if self.dpo.reference == "separate":
            # the recipe's second, frozen copy of the base (twice the memory)

            ref_model = native.load_causal_lm(run.base_dir(), run.device, run.precision, None, run.trust_remote_code).eval()
            native.keep_4bit_training_kernels(ref_model)
            if self.dpo.start_from:  # the reference is the base with the SFT adapter training starts from
                from loraflow.train import starting_adapter_dir

                ref_model = native.with_adapter(ref_model, starting_adapter_dir(run), tokenizer).eval()
            else:
                native.fit_vocabulary(ref_model, tokenizer)  # (rows of new tokens: the policy's are trained, these unused)
        return _dpo_trainer_class()(model=model, ref_model=ref_model, args=args, train_dataset=train_set,
                                    eval_dataset=val_set, processing_class=tokenizer, callbacks=callbacks)

    def tokens_seen(self, trainer) -> int:
        """Tokens of chosen and rejected sequences this run has trained on (TRL counts them as num_tokens)."""
        counted = [row["num_tokens"] for row in trainer.state.log_history if "num_tokens" in row]
        return int(counted[-1]) if counted else 0

    def summary(self, logged: list[dict]) -> dict:
        """The reward numbers of the first and last logged training steps (TRL logs them per step), and how many
        reference forward passes this process ran (0 with precomputed reference log-probs)."""
        steps = [row for row in logged if "rewards/margins" in row and "eval_loss" not in row]
        found = {"reference_forwards": REFERENCE_FORWARDS}
        for name in ("margins", "accuracies", "chosen", "rejected"):
            if steps:
                found[f"first_reward_{name}"] = steps[0][f"rewards/{name}"]
                found[f"final_reward_{name}"] = steps[-1][f"rewards/{name}"]
        return found


OBJECTIVES = {"sft": Sft, "dpo": Dpo}
