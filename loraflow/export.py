"""Export: the trained adapter as a self-contained folder that `PeftModel.from_pretrained` loads on the
original base: adapter weights (safetensors), adapter_config.json pointing at the original base (not
the store's quantized copy), the tokenizer the data was tokenized with, and the resolved config.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from loraflow.errors import LoraflowError

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def export_adapter(trained_dir: Path, tokenizer_dir: Path, base: str, resolved_config: dict, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        if not (trained_dir / name).is_file():
            raise LoraflowError(f"{trained_dir}: the trained adapter has no {name}; the train stage did not finish")
        shutil.copyfile(trained_dir / name, out_dir / name)
    adapter_config = json.loads((out_dir / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = base
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    for file in tokenizer_dir.iterdir():
        if file.is_file():
            shutil.copyfile(file, out_dir / file.name)
    (out_dir / "loraflow_config.json").write_text(json.dumps(resolved_config, indent=2))
    summary = trained_dir / "train_summary.json"
    if summary.exists():
        shutil.copyfile(summary, out_dir / "train_summary.json")
    return {"adapter_bytes": (out_dir / "adapter_model.safetensors").stat().st_size, "base_model": base}
