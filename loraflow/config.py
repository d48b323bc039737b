"""FinetuneConfig: everything one fine-tune needs, validated before any heavy work.

The same pydantic model is the SFT flow's parameter, so Prefect renders its UI form from these
fields (sections, descriptions, enums as dropdowns). Defaults follow the seeds' recipes
(alpaca-lora / ipex-llm QLoRA): lr 3e-5, max_grad_norm 0.3, micro batch 2, batch 128, cosine,
bf16 where supported, adamw_torch, cutoff 256, LoRA r8/alpha16/dropout 0.05.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from loraflow import adapters, paths
from loraflow.backends import BACKEND_NAMES, backend
from loraflow.data.shapes import format_help, format_problem, shape_named, template_help, template_problem
from loraflow.data.shapes import names as shape_names
from loraflow.data.templates import ALPACA_TEMPLATES, CONVERSATION_TEMPLATES
from loraflow.errors import LoraflowError

# The form's choices of data.format and data.template, read from the registries (a shape or template registered there
# is offered here): SftFormat for objective sft, PreferenceFormat for dpo.
SftFormat = Literal[("auto", *shape_names("sft"))]
PreferenceFormat = Literal[("auto", *shape_names("dpo"))]
TemplateName = Literal[("auto", *ALPACA_TEMPLATES, *CONVERSATION_TEMPLATES)]


class _Section(BaseModel):
    # validate_default: a default like `num_epochs = 3` must become the same 3.0 that a file's
    # "num_epochs: 3" becomes, or equal configs would hash to different cache keys.
    model_config = ConfigDict(extra="forbid", validate_default=True)


def _same_field(section: type[BaseModel], name: str, default: Any) -> Any:
    """The parent's field (title, description, bounds) with another default: the DPO recipe's, which the UI form shows."""
    return FieldInfo.merge_field_infos(section.model_fields[name], default=default)


class ModelSettings(_Section):
    """The base model and how it is loaded for training."""

    base: str = Field(
        title="Base model",
        description="Base model: a local directory with config.json and weights, or a hub id "
        "(resolved through the local Hugging Face cache when offline)."
    )
    quantization: Literal["nf4", "none"] = Field(
        "nf4", title="Quantization",
        description="nf4: QLoRA, the base loaded in 4-bit NormalFloat with bitsandbytes and cached "
        "pre-quantized in the store. none: plain LoRA on a bf16/fp32 base.",
    )
    double_quant: bool = Field(True, title="Double quantization", description="Quantize the 4-bit scales too (QLoRA paper; saves ~0.4 bit/param). "
                               "Native backend only: ipex-llm's low-bit formats have no double quantization.")
    trust_remote_code: bool = Field(False, title="Trust remote code", description="Allow model code shipped with the checkpoint to run.")
    backend: Literal[BACKEND_NAMES] = Field(  # (loraflow.backends: the registry)
        BACKEND_NAMES[0], title="Backend",
        description="native: transformers + bitsandbytes + PEFT (XPU, CUDA, CPU). ipex-llm: Intel's ipex-llm 2.2 low-bit "
        "base (NF4 on an Intel GPU, sym_int4 on a CPU) and QLoRA layers, run in its own environment "
        "(infra/envs/ipex-llm; SFT with LoRA only).",
    )


class DataSettings(_Section):
    """The training data and how it becomes tokens."""

    path: str = Field(title="Dataset file", description="Dataset file (.json, .jsonl or .parquet): a local path or any fsspec URL (s3://…).")
    # The SFT form offers SFT's formats only; DpoDataSettings offers the preference formats.
    format: SftFormat = Field(
        "auto", title="Row format",
        description=format_help("sft") + " Preference pairs (chosen/rejected) are for objective dpo.",
    )
    template: TemplateName = Field("auto", title="Prompt template", description=template_help("sft"))
    cutoff_len: int = Field(256, title="Cutoff length (tokens)", ge=8, description="Maximum tokens per example; longer ones are truncated.")
    new_tokens: list[str] = Field(
        [], title="New special tokens",
        description="Tokens to add to the tokenizer, e.g. the chatml markers ['<|im_start|>', '<|im_end|>'] for a base that "
        "lacks them: each becomes one token, the model's embeddings and output head grow to match, and both are trained "
        "with the adapter (saved in it: a larger adapter). Needs lora.method "
        + " or ".join(entry.name for entry in adapters.METHODS if entry.trains_new_tokens) + ".")
    train_on_inputs: Literal["auto", "yes", "no"] = Field(
        "auto", title="Loss on the prompt too",
        description="yes: compute loss on the prompt as well as the answer. auto: the recipe default, yes for "
        "alpaca (alpaca-lora), no for conversations (FastChat: assistant turns only).",
    )
    add_eos: bool = Field(True, title="Append EOS", description="Append the EOS token when the example fits in cutoff_len.")
    val_set_size: int = Field(2000, title="Validation rows", ge=0, description="Rows held out for evaluation (seeded split); 0 for none.")
    seed: int = Field(42, title="Split seed", description="Seed of the train/validation split.")

    # The objective whose shapes data.format names (DpoDataSettings: dpo).
    objective: ClassVar[str] = "sft"

    @field_validator("format", mode="before")
    @classmethod
    def _objective_format(cls, value):
        if isinstance(value, str) and (problem := format_problem(cls.objective, value)):
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _template_matches_format(self) -> DataSettings:
        if problem := template_problem(self.format, self.template):
            raise ValueError(problem)
        return self

    @field_validator("train_on_inputs", mode="before")
    @classmethod
    def _yes_no(cls, value):
        # YAML's `train_on_inputs: true` (and the unset null of older configs) read as the form's choices.
        return {True: "yes", False: "no", None: "auto"}.get(value, value) if isinstance(value, (bool, type(None))) else value

    @property
    def effective_train_on_inputs(self) -> bool:
        """(of a resolved format: loraflow.data.shapes.resolve_data has replaced auto by the file's shape)"""
        if self.train_on_inputs != "auto":
            return self.train_on_inputs == "yes"
        if self.format == "auto":
            raise LoraflowError("internal: train_on_inputs auto asked before the data's shape was detected")
        return shape_named(self.format).train_on_inputs


# The adapter methods are registered parts (loraflow/adapters/: one module each); the `lora` section's type, its
# form's order and which methods each objective trains come from that registry.
ADAPTER_METHODS = adapters.NAMES
AdapterSettings = adapters.settings_union("sft")
DpoAdapterSettings = adapters.settings_union("dpo")


def adapter_settings(tree: dict) -> adapters.MethodSettings:
    """A stored config's lora section as its method's settings (a record's config, read back)."""
    return TypeAdapter(AdapterSettings).validate_python(tree)


class TrainSettings(_Section):
    """The optimisation and where it runs."""

    learning_rate: float = Field(3e-5, title="Learning rate", gt=0, description="Peak learning rate.")
    batch_size: int = Field(128, title="Batch size (global)", ge=1, description="Global batch size; gradient accumulation makes up the rest.")
    micro_batch_size: int = Field(
        0, title="Micro batch size", ge=0, description="Examples per device per forward pass (gradient accumulation makes up "
        "the batch). 0: auto, the most that fit the memory free on the training device.")
    num_epochs: float = Field(3, title="Epochs", gt=0, description="Passes over the training split.")
    max_steps: int = Field(-1, title="Max steps", description="Stop after this many optimizer steps (-1: run num_epochs).")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", title="Learning-rate schedule", description="Learning-rate schedule."
    )
    warmup: float = Field(0.03, title="Warmup", ge=0, description="Warmup: a fraction of the steps if < 1, else a step count.")
    max_grad_norm: float = Field(0.3, title="Max gradient norm", gt=0, description="Gradient clipping norm (QLoRA recipe).")
    weight_decay: float = Field(0.0, title="Weight decay", ge=0, description="AdamW weight decay.")
    optim: Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_8bit", "sgd"] = Field(
        "adamw_torch", title="Optimizer", description="Optimizer."
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", title="Precision", description="auto: bf16 where the device computes it fast (XPU, CUDA with bf16, a CPU with "
        "AVX512-BF16 or AMX), else fp32."
    )
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        "auto", title="Gradient checkpointing",
        description="Recompute activations in the backward pass: less memory, about a third more compute. auto: on only "
        "when a micro batch's activations would not fit in the memory free after loading the model (YAML true/false: on/off).")
    packing: bool = Field(
        True, title="Packing (padding-free)",
        description="SFT: pack each micro batch's examples into as few rows as fit (no attention across examples), "
        "instead of padding them to the longest. Same loss and gradients, fewer tokens computed.")
    compile: bool = Field(False, title="torch.compile", description="Compile the model (torch.compile) before training. "
                          "Off by default: on the CPU, with NF4 and LoRA, compiling cost more than it saved (bench/train.py).")
    sampling: Literal["random", "group_by_length"] = Field(
        "random", title="Example order",
        description="random: shuffled each epoch. group_by_length: shuffled, but each micro batch takes examples of "
        "similar length (less padding without packing; steps then see a length-biased mix).")
    logging_steps: int = Field(1, title="Log every (steps)", ge=1, description="Log metrics every N optimizer steps.")
    eval_steps: int = Field(100, title="Evaluate every (steps)", ge=1, description="Evaluate every N steps when there is a validation split.")
    save_steps: int = Field(100, title="Checkpoint every (steps)", ge=1, description="Checkpoint (and sync to the store) every N steps.")
    early_stopping_patience: int = Field(
        0, title="Early stopping patience", ge=0,
        description="Stop when the eval loss has not improved for this many evaluations in a row (0: off). When on, the "
        "adapter exported is the best evaluated step's, by eval loss. Needs a validation split and save_steps a multiple "
        "of eval_steps.")
    report_to: list[Literal["tensorboard", "mlflow"]] = Field(
        [], title="Experiment trackers",
        description="Also log to: tensorboard (event files in the run's metrics folder in the store), mlflow (the "
        "tracking server in MLFLOW_TRACKING_URI; experiment MLFLOW_EXPERIMENT_NAME, else the config's name). Optional "
        "packages: pip install 'loraflow[tracking]'. Not part of what training computes: changing it retrains nothing.")
    seed: int = Field(42, title="Training seed", description="Training seed (LoRA init, data order, dropout).")
    device: Literal["auto", "xpu", "cuda", "cpu"] = Field("auto", title="Device", description="Device to train on.")
    launcher: Literal["local", "torchrun", "deepspeed", "mpirun"] = Field(
        "local", title="Launcher", description="How the training process is started."
    )
    nproc_per_node: int = Field(1, title="Processes per host", ge=1, description="Training processes per host (one per GPU or XPU card).")
    hosts: list[str] = Field(
        [], title="Hosts", description="Several hosts: their names (or addresses), the first being the one the training "
        "flow runs on and the rendezvous point. Empty: this host only."
    )
    master_port: int = Field(
        0, title="Rendezvous port", ge=0, le=65535,
        description="Rendezvous port. 0: a free port on one host, 29500 across several hosts.",
    )
    mpi: Literal["auto", "openmpi", "intel"] = Field(
        "auto", title="MPI flavour", description="mpirun flavour (its flags differ): auto asks `mpirun --version`."
    )
    # A plain number, not Literal[0, 2, 3]: the Prefect UI renders an integer enum as a blank dropdown.
    deepspeed_zero: int = Field(0, title="DeepSpeed ZeRO stage", ge=0, le=3, description="DeepSpeed ZeRO stage: 2 or 3 (0: DeepSpeed not used).")
    deepspeed_offload_optimizer: bool = Field(
        False, title="Offload optimizer to CPU", description="ZeRO-2/3: keep optimizer state in host memory (DeepSpeedCPUAdam), as ipex-llm's 70B recipe does."
    )
    retries: int = Field(1, title="Retries", ge=0, description="Retries of the train task after a failure; each resumes from the newest committed checkpoint.")
    timeout_s: float = Field(0, title="Timeout (seconds)", ge=0, description="Kill the whole training process group after this many seconds (0: no limit).")
    pool: str = Field(
        "", title="Work pool", description="Prefect work pool that runs training (e.g. xpu); empty: run in this flow's process."
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _tracker_list(cls, value):
        # YAML's `report_to: tensorboard` (one tracker) and transformers' "none" read as lists.
        if isinstance(value, str):
            return [] if value in ("", "none") else [value]
        return value

    @field_validator("report_to")
    @classmethod
    def _each_once(cls, value):
        return list(dict.fromkeys(value))

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _on_off(cls, value):
        # YAML's `gradient_checkpointing: true` (configs written before auto) read as the form's choices.
        if isinstance(value, bool):
            return "on" if value else "off"
        if value not in ("auto", "on", "off"):
            raise ValueError("must be auto, on or off (true and false also read as on and off)")
        return value

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainSettings:
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}"
            )
        if self.deepspeed_zero not in (0, 2, 3):
            raise ValueError(f"deepspeed_zero must be 0 (off), 2 or 3, not {self.deepspeed_zero}")
        if self.deepspeed_zero and self.launcher != "deepspeed":
            raise ValueError(f"deepspeed_zero={self.deepspeed_zero} needs launcher: deepspeed (got {self.launcher!r})")
        if self.deepspeed_offload_optimizer and not self.deepspeed_zero:
            raise ValueError("deepspeed_offload_optimizer needs deepspeed_zero: 2 or 3")
        if self.early_stopping_patience and self.save_steps % self.eval_steps:
            raise ValueError(f"early_stopping_patience needs save_steps ({self.save_steps}) to be a multiple of eval_steps "
                             f"({self.eval_steps}): the best evaluated step must have a checkpoint to export")
        if self.hosts and self.launcher == "local":
            raise ValueError(f"hosts {self.hosts} need a multi-process launcher (torchrun, deepspeed or mpirun), not local")
        if len(set(self.hosts)) != len(self.hosts):
            raise ValueError(f"hosts lists a host twice: {self.hosts}; use nproc_per_node for several processes per host")
        return self


class MergeSettings(_Section):
    """Merging the adapter into a full-precision copy of the base."""

    enabled: bool = Field(True, title="Merge after export", description="Write a merged model after export.")
    dtype: Literal["auto", "bf16", "fp32"] = Field("auto", title="Merged dtype", description="auto: bf16 on XPU/CUDA, fp32 on CPU.")
    check_rows: int = Field(4, title="Rows checked", ge=1, description="Validation rows whose logits must match before and after merging.")


class EvaluationSettings(_Section):
    """Evidence beyond the eval loss, measured on the base model (before) and with the trained adapter (after), in the
    evaluation stage after export. Its own cached stage: changing these settings re-evaluates, never retrains."""

    tasks_path: str = Field(
        "", title="Task prompts file", description="JSON/JSONL rows with a prompt (prompt, or instruction + input) and its "
        "reference answer (answer or output): each prompt is answered greedily with the run's template, and scored by exact "
        "match and ROUGE-L. Empty: no task metrics.")
    answer_pattern: str = Field(
        "", title="Answer pattern", description="A regular expression that extracts the answer from a generated text and from "
        "the reference before exact match (its first group, else the whole match), e.g. '####\\s*(-?[\\d,.]+)'. "
        "Empty: the whole text, trimmed.")
    max_new_tokens: int = Field(64, title="Max new tokens", ge=1, description="Tokens generated per prompt.")
    max_rows: int = Field(64, title="Rows", ge=1, description="At most this many prompts (and general-text rows) are used.")
    general_text_path: str = Field(
        "", title="General text (forgetting check)", description="Plain text (a document a line) or JSON/JSONL rows with "
        "`text`, e.g. a C4 sample: its loss and perplexity before and after training show how far general ability moved. "
        "Empty: no forgetting check.")

    @field_validator("answer_pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        if value:
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(f"not a valid regular expression ({error})") from None
        return value

    @property
    def enabled(self) -> bool:
        return bool(self.tasks_path or self.general_text_path)


class FinetuneConfig(_Section):
    """One supervised (Q)LoRA fine-tune: model, data, adapter, training, merge, and the artifact store.

    A DPO config (DpoFinetuneConfig) is this with `objective: dpo`, a `dpo` section and the DPO recipe's defaults;
    build_config picks the class from `objective`. The SFT form therefore shows no DPO section."""

    name: str = Field("loraflow", title="Run name", pattern=r"^[a-z0-9][a-z0-9-]*$", description="Run name prefix (lowercase, digits, dashes).")
    objective: Literal["sft"] = Field(
        "sft", title="Objective", description="sft: supervised fine-tuning on instructions or conversations (a config with "
        "objective: dpo is a DPO preference tune on chosen/rejected pairs: the loraflow-dpo flow).")
    storage: str = Field("./loraflow-store", title="Artifact store", description="Artifact store: a local path or any fsspec URL (s3://bucket/prefix).")
    model: ModelSettings = Field(title="Model")
    data: DataSettings = Field(title="Data")
    lora: AdapterSettings = Field(adapters.LoraAdapter(), title="Adapter", description="The adapter PEFT trains on the base: "
                                  f"{adapters.titles(adapters.for_objective('sft'))}, each with its own fields.")
    train: TrainSettings = Field(TrainSettings(), title="Train")
    merge: MergeSettings = Field(MergeSettings(), title="Merge")
    evaluation: EvaluationSettings = Field(EvaluationSettings(), title="Evaluation")

    # What DpoFinetuneConfig answers from its dpo section; an SFT run does neither.
    @property
    def starts_from_an_adapter(self) -> bool:
        return False

    @property
    def precomputes_reference(self) -> bool:
        return False

    @model_validator(mode="before")
    @classmethod
    def _dpo_section_needs_dpo(cls, tree: Any) -> Any:
        if cls is FinetuneConfig and isinstance(tree, dict) and "dpo" in tree:
            raise ValueError("the dpo section is for preference tuning: set objective: dpo (or remove the dpo section)")
        return tree

    def for_run(self, dataset: str | None = None) -> FinetuneConfig:
        """This config as a flow runs it: `dataset` (when given) as data.path, and local paths absolute,
        so every URI a record or artifact carries still leads to its file from another folder."""
        config = self if not dataset else self.model_copy(update={"data": self.data.model_copy(update={"path": dataset})})
        return paths.resolve_config_paths(config, Path.cwd())

    @model_validator(mode="after")
    def _supported_combination(self) -> FinetuneConfig:
        if self.model.quantization == "nf4" and self.train.deepspeed_zero == 3:
            raise ValueError(
                "DeepSpeed ZeRO-3 cannot shard a 4-bit bitsandbytes base (its packed NF4 weights are not "
                "partitionable parameters). Use deepspeed_zero: 2 with quantization: nf4, or "
                "quantization: none with ZeRO-3."
            )
        if self.train.early_stopping_patience and not self.data.val_set_size:
            raise ValueError("train.early_stopping_patience watches the eval loss: set data.val_set_size (a validation split), "
                             "or train.early_stopping_patience: 0")
        if self.model.quantization == "nf4" and self.train.precision == "fp16":
            raise ValueError("precision fp16 with an NF4 base is unstable in the QLoRA recipe; use bf16 or fp32")
        if self.data.new_tokens and not (method := adapters.method(self.lora.method)).trains_new_tokens:
            able = [entry.name for entry in adapters.METHODS if entry.trains_new_tokens and self.objective in entry.objectives]
            raise ValueError(f"data.new_tokens trains the embeddings of the new tokens with the adapter, which "
                             f"{method.name} cannot (it trains {method.trains} only): choose lora.method {', '.join(able[:-1])} or "
                             f"{able[-1]}, or remove data.new_tokens")
        if refused := backend(self.model.backend).refusals(self):
            raise ValueError(f"model.backend {self.model.backend} does not support what this config asks for:"
                             + "".join(f"\n    - {problem}" for problem in refused))
        return self
