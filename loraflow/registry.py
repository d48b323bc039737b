"""The pipeline's stages, each named by one word: the key of its record in a flow's result, its Prefect task's
name and its folder in the store are all that word (the trained adapter's folder is the exception: a run
folder holds its checkpoints, adapter and merged model together).

Everything that names a stage reads it here: the stage logic (keys, output URIs), the tasks, the flows'
records, the report's stage table, `loraflow du`/`gc`.

Each stage declares the records it reads (`Stage.inputs`, by stage name). Records travel as one mapping, a flow's
`Records` (stage name → StageRecord): a flow, a task, the pool job's parameters (JSON) and the stage logic hand on that
mapping, and a stage takes its inputs from it with `Stage.inputs_from`, which says which record is missing or unknown.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

from loraflow.errors import LoraflowError
from loraflow.storage import StageRecord, sha256_hex

# A flow's records so far, by stage name (the key of each record in a flow's result).
Records = dict[str, StageRecord]


def library_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """The installed versions of `names` in this process's environment (None: not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@dataclass(frozen=True)
class Stage:
    name: str
    # Bump when the stage's output changes for the same inputs: its content keys change, so nothing old is reused.
    version: int
    # Where its output lives: `<store>/<folder>/<key>/` for a shared stage (any run may reuse it), `<run>/<folder>/`
    # for a run's own; empty for a check that writes nothing.
    folder: str = ""
    shared: bool = False
    # What it does, for the task's description and `loraflow du`.
    summary: str = ""
    # The libraries whose versions decide its bytes (token ids, the NF4 layout, an adapter's initialisation, the
    # arithmetic): their versions are part of its key, so an upgrade rebuilds it instead of reusing an output the new
    # versions would not make. The key is computed where the stage builds (a pool's training: on the worker).
    libraries: tuple[str, ...] = ()
    # The stages whose records it reads (their names); `optional` ones only when the flow made them (DPO's reference).
    inputs: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()

    def inputs_from(self, records: Records) -> Records:
        """Its input records out of a flow's records: exactly the ones it declares (a required one missing, or a record
        under a name that is no stage, is an error naming it)."""
        if unknown := sorted(set(records) - set(BY_NAME)):
            raise LoraflowError(f"the {self.name} stage was given records of {', '.join(unknown)}, which are no stage "
                                f"(stages: {', '.join(BY_NAME)})")
        if missing := [name for name in self.inputs if name not in records]:
            raise LoraflowError(f"the {self.name} stage needs the records of {', '.join(missing)} (it reads "
                                f"{', '.join(self.inputs)}), given {', '.join(records) or 'none'}")
        return {name: records[name] for name in (*self.inputs, *self.optional) if name in records}

    @property
    def task(self) -> str:
        return self.name

    def key(self, *parts) -> str:
        """The content key: this stage's name and version, then what it reads (upstream keys, config fields)."""
        if self.libraries:  # (a stage without libraries keeps the key it always had)
            parts = (*parts, library_versions(self.libraries))
        return sha256_hex(self.name, self.version, *parts)

    def cache_key(self, key: str) -> str:
        """The Prefect cache key for a content key (prefixed, so two stages never share one)."""
        return f"{self.name}-{key}"

    def uri(self, store, key: str) -> str:
        """A shared stage's output folder for a content key."""
        assert self.shared, self.name
        return store.uri(self.folder, key[:16])


ENV = Stage("env", 1, summary="device, precision, memory, library versions, store reachable")
SOURCES = Stage("sources", 1, summary="content hashes of the dataset, the base model's weights and its tokenizer")
DATASET = Stage("dataset", 3, "dataset", shared=True, inputs=("sources",),  # 2: keyed on the tokenizer as built; 3: folder datasets/ renamed
                summary="formatted with the template, tokenized, labels masked, split: parquet + stats",
                libraries=("tokenizers", "transformers"))
BASE = Stage("base", 2, "base", shared=True, inputs=("env", "sources"), summary="the base model quantized to NF4 once, for every fine-tune of it",
             libraries=("torch", "transformers", "bitsandbytes"))
LORA = Stage("lora", 2, "lora", shared=True, inputs=("env", "sources", "base"),
             summary="the adapter training starts from: a fresh LoRA init, or with dpo.start_from an SFT run's adapter",
             libraries=("torch", "peft"))
REFERENCE = Stage("reference", 2, "reference", shared=True, inputs=("env", "dataset", "base", "lora"),
                  summary="DPO: the frozen reference's log-probs of the chosen and rejected answers training reaches",
                  libraries=("torch", "transformers", "bitsandbytes", "peft", "trl"))
TRAIN = Stage("train", 1, "checkpoints/final", inputs=("env", "dataset", "base", "lora"), optional=("reference",),
              summary="the training process; checkpoints and the trained adapter in runs/<run>/",
              libraries=("torch", "transformers", "bitsandbytes", "peft", "trl", "accelerate"))
ADAPTER = Stage("adapter", 1, "adapter", inputs=("dataset", "train"), summary="the exported adapter: safetensors, config, tokenizer, resolved config")
MERGED = Stage("merged", 1, "merged", inputs=("env", "sources", "dataset", "adapter"), summary="the adapter merged into a full-precision base, checked against base + adapter")
EVALUATION = Stage("evaluation", 1, "evaluation", inputs=("env", "base", "adapter"), summary="task metrics (exact match, ROUGE-L) and a forgetting check, "
                   "base model vs the trained adapter; in runs/<run>/evaluation/<key>/")
REPORT = Stage("report", 1, inputs=("train",), summary="summary, metrics table and curves as Prefect artifacts")

STAGES = (ENV, SOURCES, DATASET, BASE, LORA, REFERENCE, TRAIN, ADAPTER, MERGED, EVALUATION, REPORT)
BY_NAME = {stage.name: stage for stage in STAGES}
SHARED_FOLDERS = tuple(stage.folder for stage in STAGES if stage.shared)
RUNS_FOLDER = "runs"
