"""Preference tuning (`objective: dpo`): TRL's DPOTrainer on pre-tokenized pairs (prompt_ids/chosen_ids/rejected_ids from
the preference data stage).

Config: DpoFinetuneConfig (the SFT fields with the DPO recipe's defaults, and the `dpo` section: DpoSettings). Data:
the preference shapes of loraflow.data.shapes. Flow `loraflow-dpo` (flows/dpo.py), deployments `dpo-<pool>`. Its own
stage: `reference` (the reference model's log-probs, computed once and cached), unless `dpo.reference` is
adapter-disabled (the policy's own base with the adapter disabled, during training: one base copy in memory) or
separate (a second copy of the base). Its summary adds the reward numbers of the first and last steps.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from loraflow import adapters
from loraflow.adapters import DpoLoraAdapter
from loraflow.config import (
    DataSettings, DpoAdapterSettings, FinetuneConfig, PreferenceFormat, TemplateName, TrainSettings, _same_field, _Section,
)
from loraflow.data.shapes import format_help
from loraflow.objectives.common import Objective, longest
from loraflow.registry import REFERENCE


# ---- its config section ---------------------------------------------------------------------------------------------
class DpoSettings(_Section):
    """Preference tuning (objective dpo): TRL's DPOTrainer with the ipex-llm DPO recipe's defaults."""

    beta: float = Field(0.1, title="Beta", gt=0, description="How far the policy may move from the reference (DPO's β).")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
                       "apo_zero", "apo_down", "discopop", "sigmoid_norm"] = Field(
        "sigmoid", title="Loss", description="sigmoid: the DPO paper's loss. ipo, hinge, robust, … : TRL's other pairwise losses.")
    max_prompt_length: int = Field(1024, title="Max prompt length (tokens)", ge=8,
                                   description="Longer prompts keep their end (the turn nearest the answer).")
    max_length: int = Field(1536, title="Max length (tokens)", ge=16, description="Prompt plus answer; longer answers are cut at the end.")
    reference: Literal["precomputed", "adapter-disabled", "separate"] = Field(
        "precomputed", title="Reference model",
        description="precomputed: the reference log-probs are a cached stage (reference) and training runs no reference "
        "pass. adapter-disabled: the policy's own base with the adapter switched off, during training (one base copy). "
        "separate: a second NF4 copy of the base, as the recipe does (twice the memory; for comparison).")

    start_from: str = Field(
        "", title="Start from an SFT run",
        description="An SFT run in the same store (its run id, e.g. demo-17182e7ab5d2, or its adapter folder's URI): the "
        "policy starts from that adapter and the reference is the base with it. Empty: a fresh LoRA adapter.")

    @model_validator(mode="after")
    def _lengths(self) -> DpoSettings:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length {self.max_prompt_length} leaves no room for an answer within max_length {self.max_length}")
        return self




class DpoDataSettings(DataSettings):
    """The preference pairs and how they become tokens (the DPO recipe's defaults)."""

    objective: ClassVar[str] = "dpo"  # (data.format names a preference shape: the validator asks the shape registry)
    format: PreferenceFormat = Field("auto", title="Row format", description=format_help("dpo"))
    template: TemplateName = _same_field(DataSettings, "template", "chatml")
    val_set_size: int = _same_field(DataSettings, "val_set_size", 0)


class DpoTrainSettings(TrainSettings):
    """The optimisation and where it runs (the ipex-llm DPO recipe and TRL's: lr 5e-5, micro batch 4 x
    accumulation 4, 200 steps, linear schedule with 10% warmup, max_grad_norm 1.0)."""

    learning_rate: float = _same_field(TrainSettings, "learning_rate", 5e-5)
    batch_size: int = _same_field(TrainSettings, "batch_size", 16)
    micro_batch_size: int = _same_field(TrainSettings, "micro_batch_size", 4)
    max_steps: int = _same_field(TrainSettings, "max_steps", 200)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = _same_field(TrainSettings, "lr_scheduler", "linear")
    warmup: float = _same_field(TrainSettings, "warmup", 0.1)
    max_grad_norm: float = _same_field(TrainSettings, "max_grad_norm", 1.0)
    packing: bool = Field(False, title="Packing (padding-free)",
                          description="Not for DPO: TRL's DPOTrainer pads its pairs (its padding_free is off in TRL 1.16).")


class DpoFinetuneConfig(FinetuneConfig):
    """One DPO preference tune: model, preference data, adapter, the DPO section, training, merge, store.

    The same fields as an SFT config with the DPO recipe's defaults, so the DPO deployment's form shows them."""

    objective: Literal["dpo"] = Field("dpo", title="Objective", description="dpo: preference tuning on chosen/rejected pairs.")
    data: DpoDataSettings = Field(title="Data")
    # (not _same_field: that would carry the SFT adapter union's validators onto the DPO one)
    lora: DpoAdapterSettings = Field(DpoLoraAdapter(), title=FinetuneConfig.model_fields["lora"].title,
                                     description=f"The adapter DPO trains on the base: {adapters.titles(adapters.for_objective('dpo'))}, "
                                     "each with its own fields (TRL's DPOTrainer trains weights: no virtual tokens).")
    train: DpoTrainSettings = _same_field(FinetuneConfig, "train", DpoTrainSettings())
    dpo: DpoSettings = Field(DpoSettings(), title="DPO")

    @property
    def starts_from_an_adapter(self) -> bool:
        return bool(self.dpo.start_from)

    @property
    def precomputes_reference(self) -> bool:
        return self.dpo.reference == "precomputed"

    @model_validator(mode="after")
    def _supported_dpo_combination(self) -> DpoFinetuneConfig:
        if self.train.packing:
            raise ValueError("train.packing is for SFT: TRL's DPOTrainer pads its pairs (its padding_free is off in TRL 1.16); "
                             "remove it or set it to false")
        if self.dpo.start_from and self.lora != DpoLoraAdapter():
            raise ValueError("lora: with dpo.start_from, training continues that adapter with its own settings; remove the "
                             "lora section (or dpo.start_from, to train a fresh adapter with these)")
        if self.dpo.start_from and self.dpo.reference == "separate":
            raise ValueError("dpo.reference separate loads the base alone as the reference; with dpo.start_from the reference "
                             "is base + that adapter: use precomputed (the default) or adapter-disabled")
        return self


# ---- its trainer ----------------------------------------------------------------------------------------------------
# Reference forward passes this process ran (each over one batch): 0 when training reads precomputed log-probs.
REFERENCE_FORWARDS = 0

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


# ---- the objective --------------------------------------------------------------------------------------------------
class Dpo(Objective):
    name = "dpo"
    config = DpoFinetuneConfig
    flow = "loraflow-dpo"
    entrypoint = "flows.dpo:dpo"
    deployment = "dpo"
    stages = (REFERENCE,)
    reports_perplexity = False  # its eval loss is the preference loss, not a token loss
    # Trains on the pairs its steps reach (loraflow.data.split.training_subset): its reference stage computes only those.
    trains_on_rows_used = True
    # TRL's rewards at the last logged training step (the policy's log-ratio against the reference, times beta).
    compare_columns = (("reward margin (last step)", "final_reward_margins", 4),
                       ("reward accuracy (last step)", "final_reward_accuracies", 4))

    packed = False  # TRL pads the pairs
    padded_because = ""

    @classmethod
    def runs_stage(cls, stage, config: DpoFinetuneConfig) -> bool:
        return stage is not REFERENCE or config.precomputes_reference

    @classmethod
    def dataset_fields(cls, config: DpoFinetuneConfig) -> dict:
        # The same file as preference pairs: another output, cut to the DPO lengths.
        return {"objective": "dpo", **config.dpo.model_dump(include={"max_prompt_length", "max_length"})}

    @classmethod
    def training_fields(cls, config: DpoFinetuneConfig) -> dict:
        # (the lengths are in the dataset's key)
        return {"objective": "dpo", "dpo": config.dpo.model_dump(exclude={"max_prompt_length", "max_length"})}

    @classmethod
    def spec_fields(cls, config: DpoFinetuneConfig) -> dict:
        return {"dpo": config.dpo}

    @classmethod
    def prepare_dataset(cls, config: DpoFinetuneConfig, tokenizer_path: str, out_dir: Path, log) -> dict:
        # (numpy, pyarrow, tokenizers: ~0.3 s that loading a config need not pay)
        from loraflow.data.preference import prepare_preference_dataset

        return prepare_preference_dataset(config.data, config.dpo, tokenizer_path, out_dir, log)

    @classmethod
    def summary_lines(cls, train: dict) -> list[str]:
        """How the rewards moved (first → last logged training step), and the reference passes training ran."""
        if "final_reward_margins" not in train:
            return []
        return [f"DPO rewards: margin {train['first_reward_margins']:.3f} → {train['final_reward_margins']:.3f}, "
                f"accuracy {train['first_reward_accuracies']:.2f} → {train['final_reward_accuracies']:.2f} "
                f"(first → last step); reference forward passes during training: {train.get('reference_forwards')}"]

    def __init__(self, spec):
        super().__init__(spec)
        self.dpo = spec.dpo

    def tokens_per_example(self, train_set) -> int:
        """For the memory plan: a pair's chosen and rejected sequences (prompt + answer), at the longest pair's lengths."""
        return 2 * max(longest(train_set, "prompt_ids", "chosen_ids"), longest(train_set, "prompt_ids", "rejected_ids"))

    def arguments(self, common: dict, precompute: bool | None = None):
        from trl import DPOConfig

        precompute = bool(self.spec.reference_uri) if precompute is None else precompute
        return DPOConfig(**common, beta=self.dpo.beta, loss_type=[self.dpo.loss_type], max_length=self.dpo.max_length,
                         precompute_ref_log_probs=precompute, remove_unused_columns=False)

    def trainer(self, run, model, args, train_set, val_set, tokenizer, callbacks):
        # (imports torch and transformers: not at module level, which loading a config reaches)
        from loraflow.models import native

        ref_model = None  # the policy with its adapter disabled (TRL's PEFT reference), unless:
        if self.dpo.reference == "separate":
            # the recipe's second, frozen copy of the base (twice the memory)

            ref_model = native.load_causal_lm(run.base_dir(), run.device, run.precision, None, run.trust_remote_code).eval()
            native.keep_4bit_training_kernels(ref_model)
            if self.dpo.start_from:  # the reference is the base with the SFT adapter training starts from
                ref_model = native.with_adapter(ref_model, run.starting_adapter_dir(), tokenizer).eval()
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
