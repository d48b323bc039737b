"""What every objective shares: the `Objective` interface the registry holds, and the trainer helpers (reading a data
stage's split, the longest row, TrainingArguments across transformers versions)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from loraflow.config import FinetuneConfig
from loraflow.data.shapes import SHAPES, Shape
from loraflow.errors import LoraflowError
from loraflow.registry import Stage


class Objective:
    """One training objective: a subclass per objective module, registered in loraflow.objectives.OBJECTIVES.

    The class answers what the pipeline needs before training (its config class, flow, deployment, data shapes, the
    extra stages it runs, what its keys read); an instance, made from a run spec, is its part of the trainer."""

    name: ClassVar[str]
    config: ClassVar[type[FinetuneConfig]]  # its config class: the form of its flow and deployment
    flow: ClassVar[str]  # its Prefect flow's name (users and `loraflow runs` find its runs by it)
    entrypoint: ClassVar[str]  # where that flow is defined (module:function under flows/; deployments name it)
    deployment: ClassVar[str]  # its deployments' <what>: `<what>-<pool>` in prefect.yaml, `<what>-local` when served
    # Stages it runs between the lora init and training (loraflow.registry names; DPO: the reference log-probs).
    stages: ClassVar[tuple[Stage, ...]] = ()
    reports_perplexity: ClassVar[bool] = True
    trains_on_rows_used: ClassVar[bool] = False
    # What `loraflow compare` shows of its runs' training summaries: (label, summary field, decimals).
    compare_columns: ClassVar[tuple[tuple[str, str, int], ...]] = ()

    @classmethod
    def shapes(cls) -> tuple[Shape, ...]:
        """The data shapes it trains on (loraflow.data.shapes' registry: each shape names its objective)."""
        return tuple(shape for shape in SHAPES if shape.objective == cls.name)

    @classmethod
    def runs_stage(cls, stage: Stage, config: FinetuneConfig) -> bool:
        """Whether this config runs one of its `stages` (all of them, unless an objective says otherwise)."""
        return True

    @classmethod
    def dataset_fields(cls, config: FinetuneConfig) -> dict:
        """What its dataset stage's key reads beyond the data section (an SFT key reads nothing more)."""
        return {}

    @classmethod
    def training_fields(cls, config: FinetuneConfig) -> dict:
        """What its training computes from beyond the train section (loraflow.stages.training_fields)."""
        return {}

    @classmethod
    def spec_fields(cls, config: FinetuneConfig) -> dict:
        """Its fields of the run spec (loraflow.spec.RunSpec) beyond the shared ones."""
        return {}

    @classmethod
    def prepare_dataset(cls, config: FinetuneConfig, tokenizer_path: str, out_dir: Path, log) -> dict:
        """Its data stage: the rows of config.data as the examples it trains on, in out_dir (train/val parquet, stats)."""
        raise NotImplementedError

    @classmethod
    def summary_lines(cls, train: dict) -> list[str]:
        """Lines of the run's summary (report, `loraflow runs`) from its training summary's metrics."""
        return []

    # ---- its part of the trainer (loraflow.train), made from a run spec ----
    packed = False
    padded_because = ""

    def __init__(self, spec):
        self.spec = spec

    def summary(self, logged: list[dict]) -> dict:
        """Numbers its training summary adds (from the logged rows)."""
        return {}


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
            raise LoraflowError(f"{extra_columns}/{split}.parquet has {len(extra)} rows for {len(rows)} pairs; delete it to rebuild it")
        rows = concatenate_datasets([rows, extra], axis=1)
    return rows


def longest(dataset, *columns: str) -> int:
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
