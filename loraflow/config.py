"""FinetuneConfig: everything one fine-tune needs, validated before any heavy work.

The same pydantic model is the SFT flow's parameter, so Prefect renders its UI form from these
fields (sections, descriptions, enums as dropdowns). Defaults follow the seeds' recipes
(alpaca-lora / ipex-llm QLoRA): lr 3e-5, max_grad_norm 0.3, micro batch 2, batch 128, cosine,
bf16 where supported, adamw_torch, cutoff 256, LoRA r8/alpha16/dropout 0.05.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from loraflow import paths
from loraflow.errors import LoraflowError

ALPACA_TEMPLATES = ("alpaca", "alpaca_legacy", "alpaca_short", "vigogne")
CONVERSATION_TEMPLATES = ("vicuna_v1.1", "chatml")
CONVERSATION_FORMATS = ("sharegpt", "messages")
PREFERENCE_FORMATS = ("auto", "orca", "pairs", "trl", "openai", "sharegpt-preference", "hh-rlhf")

TemplateName = Literal["auto", "alpaca", "alpaca_legacy", "alpaca_short", "vigogne", "vicuna_v1.1", "chatml"]


def template_problem(data_format: str, template: str) -> str | None:
    """Why a template cannot format rows of this format, or None. With either auto, it is decided once the file's shape
    is known (loraflow.data.shapes.resolve_data asks this again with the resolved values)."""
    if "auto" in (data_format, template):
        return None
    if data_format in PREFERENCE_FORMATS:
        if template not in CONVERSATION_TEMPLATES:
            return (f"format {data_format!r} is for preference pairs (objective dpo), which use a conversation template "
                    f"({', '.join(CONVERSATION_TEMPLATES)}; chatml by default), not {template!r}; for SFT use format alpaca, "
                    "sharegpt or messages")
        return None
    if data_format in CONVERSATION_FORMATS and template not in CONVERSATION_TEMPLATES:
        return f"template {template!r} formats alpaca rows, but format is {data_format!r}; use one of {', '.join(CONVERSATION_TEMPLATES)} (or auto)"
    if data_format not in CONVERSATION_FORMATS and template not in ALPACA_TEMPLATES:
        return f"template {template!r} formats conversations, but format is 'alpaca'; use one of {', '.join(ALPACA_TEMPLATES)} (or auto)"
    return None


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
    backend: Literal["native", "ipex-llm"] = Field(
        "native", title="Backend",
        description="native: transformers + bitsandbytes + PEFT (XPU, CUDA, CPU). ipex-llm: Intel's ipex-llm 2.2 low-bit "
        "base (NF4 on an Intel GPU, sym_int4 on a CPU) and QLoRA layers, run in its own environment "
        "(infra/envs/ipex-llm; SFT with LoRA only).",
    )


class DataSettings(_Section):
    """The training data and how it becomes tokens."""

    path: str = Field(title="Dataset file", description="Dataset file (.json, .jsonl or .parquet): a local path or any fsspec URL (s3://…).")
    # The SFT form offers SFT's formats only; DpoDataSettings offers the preference formats.
    # (the names are loraflow.data.shapes' SFT shapes; a test holds them equal: config must not import the data package)
    format: Literal["auto", "alpaca", "sharegpt", "messages"] = Field(
        "auto", title="Row format",
        description="auto (detected from the file's first row), alpaca (instruction/input/output), sharegpt "
        "(conversations[{from, value}]), messages (messages[{role, content}]). Preference pairs (chosen/rejected) are for "
        "objective dpo.",
    )
    template: TemplateName = Field(
        "auto", title="Prompt template",
        description="Prompt template. auto: alpaca for alpaca rows (alpaca-lora's), chatml for conversations. alpaca, "
        "alpaca_legacy, alpaca_short, vigogne for alpaca rows (byte-identical to alpaca-lora's); vicuna_v1.1 or chatml for "
        "conversations.",
    )
    cutoff_len: int = Field(256, title="Cutoff length (tokens)", ge=8, description="Maximum tokens per example; longer ones are truncated.")
    new_tokens: list[str] = Field(
        [], title="New special tokens",
        description="Tokens to add to the tokenizer, e.g. the chatml markers ['<|im_start|>', '<|im_end|>'] for a base that "
        "lacks them: each becomes one token, the model's embeddings and output head grow to match, and both are trained "
        "with the adapter (saved in it: a larger adapter). Needs lora.method lora or ia3.")
    train_on_inputs: Literal["auto", "yes", "no"] = Field(
        "auto", title="Loss on the prompt too",
        description="yes: compute loss on the prompt as well as the answer. auto: the recipe default, yes for "
        "alpaca (alpaca-lora), no for conversations (FastChat: assistant turns only).",
    )
    add_eos: bool = Field(True, title="Append EOS", description="Append the EOS token when the example fits in cutoff_len.")
    val_set_size: int = Field(2000, title="Validation rows", ge=0, description="Rows held out for evaluation (seeded split); 0 for none.")
    seed: int = Field(42, title="Split seed", description="Seed of the train/validation split.")

    @field_validator("format", mode="before")
    @classmethod
    def _sft_format(cls, value):
        if value in PREFERENCE_FORMATS and value != "auto":
            raise ValueError(f"{value!r} is for preference pairs (objective dpo); set objective: dpo to train on "
                             "chosen/rejected pairs, or use an SFT format (alpaca, sharegpt, messages)")
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
        return self.format == "alpaca"


ADAPTER_METHODS = ("lora", "ia3", "prompt-tuning", "prefix-tuning")
PROMPT_METHODS = ("prompt-tuning", "prefix-tuning")  # virtual tokens, not weights: nothing to merge, no packing


def _module_list(value, keywords: tuple[str, ...]):
    # `--set lora.target=q_proj`: one module name, the same as a list of one; `q_proj,v_proj` (no module name has a
    # comma) the same as [q_proj, v_proj].
    return [name.strip() for name in value.split(",") if name.strip()] if isinstance(value, str) and value not in keywords else value


def _choice_or_module_names(schema: dict) -> None:
    """A `choice | list of module names` field's form: its two tabs titled for what they are (Prefect labels untitled
    options by type: "str", "list"), and a single choice as a one-item dropdown (a const shows as "cannot be changed")."""
    for option in schema.get("anyOf", []):
        if option.get("type") == "array":
            option["title"] = "module names"
        else:
            option["title"] = "choice"
            if "const" in option:
                option["enum"] = [option.pop("const")]


def _non_empty(value):
    if isinstance(value, list) and not value:
        raise ValueError("an explicit list must name at least one module")
    choices = [name for name in value if name in ("all-linear", "attention-qv", "auto")] if isinstance(value, list) else []
    if choices:
        raise ValueError(f"{choices[0]} is a choice of its own, not a module name: give it alone, or list module names only")
    return value


class _Adapter(_Section):
    """What every adapter method answers: its name in the summary, and whether it merges into the base."""

    mergeable: ClassVar[bool] = True

    method: str  # (each method's own Literal; declared here so that it comes first in every method's form)

    def describe(self, targets: str) -> str:
        raise NotImplementedError


class LoraAdapter(_Adapter):
    """LoRA: trained low-rank updates of the target layers (with DoRA and rsLoRA as switches)."""

    model_config = ConfigDict(title="LoRA")

    method: Literal["lora"] = Field("lora", title="Method", description="lora: low-rank updates of the target layers.")
    r: int = Field(8, title="Rank (r)", ge=1, description="LoRA rank.")
    alpha: int = Field(16, title="Alpha", ge=1, description="LoRA alpha (scaling = alpha / r).")
    # 0, not the alpaca-lora/QLoRA recipes' 0.05 (torchtune's LoRA recipes use 0 too): on a CPU, drawing the dropout
    # mask of every LoRA input took a quarter of each training step (bench/train.py), for a regularisation short
    # fine-tunes rarely need.
    dropout: float = Field(0.0, title="Dropout", ge=0, lt=1, description="Dropout on the LoRA input (0: none; 0.05 is the "
                           "QLoRA recipe's, which costs a quarter of a CPU training step).")
    target: Literal["all-linear", "attention-qv"] | list[str] = Field(
        "all-linear", title="Target modules", json_schema_extra=_choice_or_module_names,
        description="all-linear: every linear projection except the output head (QLoRA paper, ipex-llm). attention-qv: the "
        "query and value projections (alpaca-lora, FastChat). Or an explicit list of module names.",
    )
    use_dora: bool = Field(False, title="DoRA", description="Weight-decomposed LoRA: a trained magnitude per output beside "
                           "the low-rank direction (DoRA paper); more accurate at low ranks, slower steps.")
    use_rslora: bool = Field(False, title="rsLoRA", description="Scale updates by alpha/sqrt(r) instead of alpha/r, so that "
                             "high ranks keep learning (rsLoRA paper).")
    init: Literal["default", "gaussian"] = Field(
        "default", title="Initialisation",
        description="default: A random (Kaiming), B zero, so training starts from the base itself. gaussian: A drawn from "
        "a Gaussian scaled by the rank. (PiSSA and OLoRA rewrite the base weights and need a full-precision base; PEFT's "
        "LoftQ for a 4-bit base runs on XPU or CUDA only: not offered yet.)")

    _target_list = field_validator("target", mode="before")(lambda value: _module_list(value, ("all-linear", "attention-qv")))
    _target_named = field_validator("target")(_non_empty)

    def describe(self, targets: str) -> str:
        """The adapter in a few words, as the logs and the summary name it: `DoRA r8/alpha16 on q_proj, v_proj`."""
        extras = [word for word, on in (("rsLoRA scaling", self.use_rslora), (f"{self.init} init", self.init != "default"),
                                        (f"dropout {self.dropout}", self.dropout)) if on]
        return f"{'DoRA' if self.use_dora else 'LoRA'} r{self.r}/alpha{self.alpha}" + (f" ({', '.join(extras)})" if extras else "") + f" on {targets}"


class Ia3Adapter(_Adapter):
    """IA3: learned rescaling of attention keys/values and of the feed-forward block's input (far fewer parameters)."""

    model_config = ConfigDict(title="IA3")

    method: Literal["ia3"] = Field("ia3", title="Method", description="ia3: learned rescaling vectors (IA3 paper).")
    target: Literal["all-linear"] | list[str] = Field(
        "all-linear", title="Target modules", json_schema_extra=_choice_or_module_names,
        description="all-linear: PEFT's modules for the architecture (attention keys and values, the feed-forward down "
        "projection). Or an explicit list of module names.")
    feedforward: Literal["auto"] | list[str] = Field(
        "auto", title="Feed-forward modules", json_schema_extra=_choice_or_module_names,
        description="Which targets are feed-forward layers, whose input is rescaled (the others' output is). auto: PEFT's for "
        "the architecture, or among an explicit target list the down projections (down_proj, fc2, c_proj, w2, "
        "dense_4h_to_h, fc_out). Or a list, each one of the targets.")

    @field_validator("target", mode="before")
    @classmethod
    def _target_list(cls, value):
        if value in ("attention-qv", "auto"):
            raise ValueError(f"{value} is not a choice of IA3's target: use all-linear (PEFT's modules for the architecture: "
                             "attention keys and values, the feed-forward down projection) or list the modules")
        return _module_list(value, ("all-linear",))

    _target_named = field_validator("target")(_non_empty)
    _feedforward_list = field_validator("feedforward", mode="before")(lambda value: _module_list(value, ("auto",)))
    _feedforward_named = field_validator("feedforward")(_non_empty)

    @model_validator(mode="after")
    def _feedforward_among_targets(self) -> Ia3Adapter:
        if isinstance(self.feedforward, list) and isinstance(self.target, list) and set(self.feedforward) - set(self.target):
            outside = sorted(set(self.feedforward) - set(self.target))
            raise ValueError(f"feedforward names {', '.join(outside)}, which target does not: PEFT rescales feed-forward "
                             f"modules among the targets; add {'it' if len(outside) == 1 else 'them'} to target or remove "
                             f"{'it' if len(outside) == 1 else 'them'} from feedforward")
        return self

    def describe(self, targets: str) -> str:
        return f"IA3 on {targets}"


class _VirtualTokens(_Adapter):
    mergeable: ClassVar[bool] = False  # virtual tokens, not weights: nothing to merge

    num_virtual_tokens: int = Field(20, title="Virtual tokens", ge=1, le=512, description="Trained virtual tokens put before "
                                    "every input (SFT only, trained without packing, not merged).")

    def describe(self, targets: str) -> str:
        return f"{self.method.replace('-', ' ')} with {self.num_virtual_tokens} virtual tokens"


class PromptTuningAdapter(_VirtualTokens):
    """Prompt tuning: trained input embeddings of virtual tokens put before every input."""

    model_config = ConfigDict(title="Prompt tuning")

    method: Literal["prompt-tuning"] = Field("prompt-tuning", title="Method",
                                             description="prompt-tuning: num_virtual_tokens trained input embeddings.")
    prompt_init_text: str = Field(
        "", title="Initial prompt text",
        description="Start the virtual tokens from this text's token embeddings (e.g. 'Answer the question helpfully:'); "
        "empty: random. The text is tokenized with the run's tokenizer and repeated to num_virtual_tokens.")

    def describe(self, targets: str) -> str:
        initial = f", started from the text {self.prompt_init_text!r}" if self.prompt_init_text else ""
        return super().describe(targets) + initial


class PrefixTuningAdapter(_VirtualTokens):
    """Prefix tuning: trained keys and values of virtual tokens in every layer."""

    model_config = ConfigDict(title="Prefix tuning")

    method: Literal["prefix-tuning"] = Field("prefix-tuning", title="Method",
                                             description="prefix-tuning: trained keys and values in every layer.")


class DpoLoraAdapter(LoraAdapter):
    """LoRA (the DPO recipe's r16/alpha16 on every linear projection)."""

    model_config = ConfigDict(title="LoRA")

    r: int = _same_field(LoraAdapter, "r", 16)
    alpha: int = _same_field(LoraAdapter, "alpha", 16)


def _tag(adapter: type[_Adapter]) -> str:
    return adapter.model_fields["method"].default


def _method_of(value) -> str:
    # A config written by hand often leaves the method out: LoRA, as before the other methods existed.
    return value.get("method", "lora") if isinstance(value, dict) else getattr(value, "method", "lora")


def _one_of_methods(*methods: type[_Adapter], refused: str = ""):
    """The `lora` section's type: one of `methods`, chosen by its `method` (LoRA when absent), each with its own fields.

    The UI form then shows one tab per method with only that method's fields. Its JSON schema is an anyOf, not the
    oneOf (with a discriminator) pydantic writes for a tagged union: Prefect's form renders a oneOf as raw JSON, and the
    server's check refuses a value without `method` that two options accept. Both Prefect forms (the UI's v1 and v2)
    show a value in the tab with the most field names in common with it, the first on a tie: so no method's fields may
    all be fields of a method before it (IA3's feedforward; prefix before prompt tuning), or the form shows its value
    in the other's tab (tests/test_adapter_methods.py checks the order)."""
    by_method = {_tag(method): method for method in methods}

    def fields_of_the_method(value):
        """A field of another method is a mistake worth saying (a DoRA run that is plain IA3) unless it holds that method's
        default: a config dumped from one method and switched to another (a sweep over lora.method) carries them."""
        if isinstance(value, str):
            raise ValueError(f"the lora section is a mapping of settings: for the method write lora: {{method: {value}}} "
                             f"(or --set lora.method={value})")
        if not isinstance(value, dict):
            return value
        method = _method_of(value)
        chosen = by_method.get(method) if isinstance(method, str) else None
        if chosen is None:
            import difflib

            lowered = str(method).lower().replace("_", "-")
            close = difflib.get_close_matches(lowered, list(by_method), n=1, cutoff=0.5)
            hint = ("; QLoRA is lora with model.quantization nf4 (the default)" if lowered == "qlora"
                    else f"; did you mean {close[0]}?" if close else "")
            raise ValueError(f"method {method!r} is not one of {', '.join(by_method)}" + (f" ({refused})" if refused else "") + hint)
        kept, wrong = {}, []
        for name, given in value.items():
            # The methods whose field it is, as this objective defines them (DPO's LoRA defaults to r16), and the
            # methods it lacks too: their setting is named as theirs.
            owners = [by_method.get(_tag(other), other) for other in _METHOD_SETTINGS if name in other.model_fields and _tag(other) != method]
            if name in chosen.model_fields or not owners:
                kept[name] = given  # (an unknown name is left to extra="forbid")
            elif all(given != owner.model_fields[name].default for owner in owners):
                wrong.append((name, owners[0]))
        if wrong:
            raise ValueError(_not_this_methods_fields(wrong, method, "method" in value, offered=tuple(by_method), refused=refused))
        return kept

    choice = Union[tuple(Annotated[adapter, Tag(method)] for method, adapter in by_method.items())]  # noqa: UP007 (built at runtime)
    return Annotated[choice, Discriminator(_method_of), BeforeValidator(fields_of_the_method), Field(json_schema_extra=_as_any_of)]


def _not_this_methods_fields(wrong: list[tuple[str, type[_Adapter]]], method: str, method_given: bool, offered: tuple[str, ...],
                             refused: str) -> str:
    """What to do about fields (name, a method it belongs to) set for a method they do not apply to."""
    names = [name for name, _ in wrong]
    it = "it" if len(names) == 1 else "them"
    owners: dict[str, list[str]] = {}  # the methods a field belongs to -> those fields
    for name in names:
        owners.setdefault(" or ".join(_tag(owner) for owner in _METHOD_SETTINGS if name in owner.model_fields), []).append(name)
    if not any(tag in offered for methods in owners for tag in methods.split(" or ")):
        return (f"{', '.join(names)} {'is a setting' if len(names) == 1 else 'are settings'} of {' and '.join(owners).replace(' or ', ' and ')}, not "
                f"offered here ({refused}): remove {it}")
    defaults = " ".join(f"--set lora.{name}={_yaml_scalar(owner.model_fields[name].default)}" for name, owner in wrong)
    assumed = "" if method_given else " (lora.method is not set: LoRA)"
    choose = next(iter(owners)) if len(owners) == 1 else ", ".join(f"{methods} for {', '.join(fields)}" for methods, fields in owners.items())
    return (f"{', '.join(names)} do{'es' if len(names) == 1 else ''} not apply to method {method}{assumed}: remove {it} "
            f"(or set the default{'' if len(names) == 1 else 's'}: {defaults}), or choose the method {choose}")


def _yaml_scalar(value) -> str:
    """A default as it is written after --set (false, '', 8): YAML, not Python."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def _as_any_of(schema: dict) -> None:
    schema["anyOf"] = schema.pop("oneOf")
    schema.pop("discriminator", None)


_METHOD_SETTINGS = (LoraAdapter, Ia3Adapter, PrefixTuningAdapter, PromptTuningAdapter)
AdapterSettings = _one_of_methods(*_METHOD_SETTINGS)
DpoAdapterSettings = _one_of_methods(DpoLoraAdapter, Ia3Adapter, refused="prompt and prefix tuning are SFT only: TRL's "
                                     "DPOTrainer trains LoRA or IA3 adapters")


def adapter_settings(tree: dict) -> LoraAdapter | Ia3Adapter | PromptTuningAdapter | PrefixTuningAdapter:
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
    lora: AdapterSettings = Field(LoraAdapter(), title="Adapter", description="The adapter PEFT trains on the base: LoRA "
                                  "(with DoRA and rsLoRA), IA3, prompt tuning or prefix tuning, each with its own fields.")
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
        if self.data.new_tokens and self.lora.method in PROMPT_METHODS:
            raise ValueError(f"data.new_tokens trains the embeddings of the new tokens with the adapter, which "
                             f"{self.lora.method} cannot (it trains virtual tokens only): choose lora.method lora or ia3, "
                             "or remove data.new_tokens")
        if self.model.backend == "ipex-llm":
            _ipex_llm_supports(self)
        return self


def _ipex_llm_supports(config: FinetuneConfig) -> None:
    """model.backend ipex-llm trains what ipex-llm 2.2's QLoRA and the libraries of its environment can: an SFT LoRA on its
    low-bit base, without the features that need the main environment's newer libraries."""
    lora, train = config.lora, config.train
    variant = lora if isinstance(lora, LoraAdapter) else LoraAdapter()  # (the other methods are refused below)
    unsupported = [  # (the setting as it is, what to do instead)
        (config.objective != "sft", f"objective {config.objective} (TRL's DPOTrainer is in the main environment)", "use model.backend: native"),
        (config.model.quantization != "nf4", "model.quantization none (the backend trains its own low-bit base)", "use model.quantization: nf4"),
        (lora.method != "lora", f"lora.method {lora.method} (ipex-llm's QLoRA layers are LoRA's)", "use lora.method: lora"),
        (variant.use_dora, "lora.use_dora", "set it to false"),
        (variant.use_rslora, "lora.use_rslora", "set it to false"),
        (variant.init != "default", f"lora.init {variant.init}", "use lora.init: default"),
        (bool(config.data.new_tokens), "data.new_tokens", "remove them"),
        (train.launcher == "deepspeed" or bool(train.deepspeed_zero), "DeepSpeed (train.launcher, train.deepspeed_zero)",
         "use train.launcher: local, torchrun or mpirun"),
        (bool(train.report_to), "train.report_to (the trackers are not in its environment)", "set train.report_to: []"),
        (train.compile, "train.compile (torch 2.1's compiler fails on its low-bit layers)", "set train.compile: false"),
        (config.evaluation.enabled, "the evaluation stage (it loads the low-bit base in the main environment)",
         "clear evaluation.tasks_path and evaluation.general_text_path"),
    ]
    problems = [f"{what}: {fix}" for wrong, what, fix in unsupported if wrong]
    if problems:
        raise ValueError("model.backend ipex-llm does not support what this config asks for:" + "".join(f"\n    - {problem}" for problem in problems))


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise LoraflowError(f"--set {dotted}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`key.sub=value` strings to (key, YAML-parsed value) pairs."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise LoraflowError(f"--set {item!r}: expected key=value, e.g. --set train.learning_rate=1e-4")
        key, raw = item.split("=", 1)
        try:
            parsed.append((key.strip(), yaml.safe_load(raw) if raw else ""))
        except yaml.YAMLError as error:
            problem = str(getattr(error, "problem", None) or error).strip()
            raise LoraflowError(f"--set {item!r}: the value is not valid YAML ({problem}); e.g. --set lora.target=[q_proj,v_proj], "
                                "and quote values with special characters") from None
    return parsed


# Names other fine-tuning tools (PEFT, LLaMA-Factory, axolotl) give these settings, mapped to loraflow's.
OTHER_TOOLS_NAMES = {"lora_r": "r", "rank": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
                     "target_modules": "target", "lora_target": "target", "lora_target_modules": "target",
                     "feedforward_modules": "feedforward", "lr": "learning_rate", "epochs": "num_epochs",
                     "num_train_epochs": "num_epochs", "per_device_train_batch_size": "micro_batch_size",
                     "gradient_accumulation_steps": "batch_size", "sequence_len": "cutoff_len", "max_seq_length": "cutoff_len",
                     "base_model": "base", "model_name_or_path": "base", "datasets": "path", "dataset": "path"}


def _did_you_mean(loc: list) -> str:
    """For a name the section does not have: the name loraflow gives it, or a close one (difflib: spelling slips)."""
    import difflib

    section = {"model": ModelSettings, "data": DpoDataSettings, "train": TrainSettings, "merge": MergeSettings,
               "evaluation": EvaluationSettings, "dpo": DpoSettings}.get(str(loc[0]) if len(loc) > 1 else "", FinetuneConfig)
    known = ({name for adapter in _METHOD_SETTINGS for name in adapter.model_fields} if len(loc) > 1 and loc[0] == "lora"
             else set(section.model_fields) | ({"dpo"} if len(loc) == 1 else set()))
    name, prefix = str(loc[-1]), ".".join(str(part) for part in loc[:-1])
    suggestion = OTHER_TOOLS_NAMES.get(name) if OTHER_TOOLS_NAMES.get(name) in known else None
    suggestion = suggestion or next(iter(difflib.get_close_matches(name, sorted(known), n=1)), None)
    return f"; did you mean {prefix + '.' if prefix else ''}{suggestion}?" if suggestion else ""


def format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for problem in error.errors():
        # (the lora section's loc names the method's tag too: lora.ia3.target is lora.target in the config)
        loc = [part for index, part in enumerate(problem["loc"]) if not (index and problem["loc"][index - 1] == "lora" and part in ADAPTER_METHODS)]
        where = ".".join(str(p) for p in loc)
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden" and loc:
            message += _did_you_mean(loc)
        given = problem.get("input")
        shown = "" if isinstance(given, dict) or given is None else f" (got {given!r})"
        # (a check across sections names its fields in the message)
        lines.append(f"  {where}: {message}{shown}" if where else f"  {message}{shown}")
    return "\n".join(lines)


class DpoDataSettings(DataSettings):
    """The preference pairs and how they become tokens (the DPO recipe's defaults)."""

    format: Literal["auto", "orca", "pairs", "trl", "openai", "sharegpt-preference", "hh-rlhf"] = Field(
        "auto", title="Row format",
        description="auto (detected from the first row), orca (system/question/chosen/rejected), pairs "
        "(prompt/chosen/rejected), trl (message lists), openai (input.messages/preferred_output/non_preferred_output), "
        "sharegpt-preference (conversations + chosen/rejected turns), hh-rlhf (chosen/rejected transcripts).")

    @field_validator("format", mode="before")
    @classmethod
    def _sft_format(cls, value):  # (overrides DataSettings': here the preference formats are the valid ones)
        if value not in PREFERENCE_FORMATS:
            raise ValueError(f"objective dpo trains on preference pairs, but data.format is {value!r}; use auto (detected "
                             f"from the first row) or one of {', '.join(PREFERENCE_FORMATS[1:])}")
        return value
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
                                     description="The adapter DPO trains on the base: LoRA (with DoRA and rsLoRA) or IA3, each "
                                     "with its own fields (TRL's DPOTrainer trains weights: no prompt or prefix tuning).")
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


# A flow parameter that takes either objective's config (the training job on a pool, merge), told apart by
# `objective`. Not a discriminated union: its JSON schema would be a oneOf that a config without `objective` (an
# SFT one, as written by hand) matches twice, which the server refuses; as a plain union such a config is SFT's.
AnyFinetuneConfig = FinetuneConfig | DpoFinetuneConfig


def config_class(tree: dict) -> type[FinetuneConfig]:
    return DpoFinetuneConfig if isinstance(tree, dict) and tree.get("objective") == "dpo" else FinetuneConfig


def build_config(tree: dict, overrides: list[str] = (), source: str = "config",
                 parsed_overrides: list[tuple[str, Any]] = ()) -> FinetuneConfig:
    """A validated config; `objective: dpo` gets the DPO recipe's defaults where it is silent."""
    tree = dict(tree)
    for key, value in [*parse_overrides(list(overrides)), *parsed_overrides]:
        set_dotted(tree, key, value)
    try:
        return config_class(tree).model_validate(tree)
    except ValidationError as error:
        raise LoraflowError(format_validation_error(error, source)) from None


def load_config(path: str | Path, overrides: list[str] = ()) -> FinetuneConfig:
    """Read a YAML config, apply `--set` overrides, validate. A relative path in the YAML resolves against the YAML's
    folder, one in an override against where the command runs (loraflow.paths)."""
    path = Path(path)
    if not path.is_file():
        raise LoraflowError(f"{path}: config file not found")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise LoraflowError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(tree, dict):
        raise LoraflowError(f"{path}: expected a mapping of sections (model, data, lora, train, …)")
    tree = paths.resolve_tree_paths(tree, path.parent)
    typed_here = [(key, paths.resolve_override(key, value, Path.cwd())) for key, value in parse_overrides(list(overrides))]
    config = build_config(tree, source=str(path), parsed_overrides=typed_here)
    return paths.resolve_config_paths(config, path.parent)  # the defaults the YAML left out (storage: ./loraflow-store)
