"""The run spec: what the train stage writes to `runs/<run>/spec.json` and `python -m loraflow.train` reads.

Typed, so a spec from another loraflow version fails on read with the field that is wrong, not deep in
training. It carries no setting that lets code run (`trust_remote_code` comes on the trainer's command
line from the flow's parameters): the spec is a file in the shared store.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from loraflow import adapters
from loraflow.backends import BACKEND_NAMES
from loraflow.config import TrainSettings
from loraflow.errors import LoraflowError
from loraflow.objectives import OBJECTIVES, DpoSettings


class RunSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    objective: Literal[tuple(OBJECTIVES)] = "sft"  # (a registered objective: loraflow.objectives)
    store: str
    run_uri: str
    dataset_uri: str
    base_uri: str
    base_in_store: bool
    quantized: bool
    backend: Literal[BACKEND_NAMES] = BACKEND_NAMES[0]  # model.backend: which library loads the base and its adapter
    lora_uri: str  # the adapter training starts from: a fresh LoRA init, or (DPO) an SFT run's adapter
    adapter_method: Literal[adapters.NAMES] = "lora"  # (the registered methods: loraflow.adapters)
    train: TrainSettings  # device and precision resolved on the host that checked the environment
    dpo: DpoSettings | None = None
    precision_reason: str = ""  # why train.precision is what it is (the env stage's choice on auto)
    reference_uri: str = ""  # DPO: the reference stage's output; empty: the reference runs during training
    ddp_backend: str | None = None
    deepspeed_config: dict | None = None

    @classmethod
    def parse(cls, text: str, where: str) -> RunSpec:
        try:
            return cls.model_validate_json(text)
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
            raise LoraflowError(f"{where}: not a run spec this loraflow can train ({problems})") from None
