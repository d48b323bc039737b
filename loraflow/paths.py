"""Where a config's paths point: a value in a YAML file is relative to that file, a value typed on the command line
(`--set`) or in a form is relative to where the command runs, and local inputs are checked to exist before anything
(a store folder, a Prefect block, a lease) is created for the run.

One list of path fields (`PATH_FIELDS`) is read by every place that resolves or checks them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow.errors import LoraflowError

if TYPE_CHECKING:
    from loraflow.config import FinetuneConfig

# Dotted config fields that hold a local path or a URL. `storage` is always a path or URL; the others may also be a
# hub id ("org/model") or empty.
STORE_FIELD = "storage"
INPUT_FIELDS = ("model.base", "data.path", "evaluation.tasks_path", "evaluation.general_text_path")
PATH_FIELDS = (STORE_FIELD, *INPUT_FIELDS)


def is_url(value: str) -> bool:
    return "://" in value


def resolve_path(value: str, folder: Path, always: bool = False) -> str:
    """`value` made absolute against `folder` when it is a local relative path. A hub id like "org/model" also
    looks relative: unless `always` (the store), only what exists under `folder` or starts with ./ or ../ (or ~)
    is rewritten, so hub ids pass through untouched."""
    if not value or is_url(value):
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    candidate = folder / path
    if always or candidate.exists() or value.startswith(("./", "../")):
        return str(candidate.resolve())
    return value


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _put(tree: dict, dotted: str, value: Any) -> None:
    *sections, name = dotted.split(".")
    node = tree
    for part in sections:
        node = node[part]
    node[name] = value


def resolve_tree_paths(tree: dict, folder: Path) -> dict:
    """The path fields present in a raw config mapping (a YAML file's, before validation), resolved against
    `folder`; values that are not strings are left for validation to refuse."""
    for dotted in PATH_FIELDS:
        value = _get(tree, dotted)
        if isinstance(value, str):
            _put(tree, dotted, resolve_path(value, folder, always=dotted == STORE_FIELD))
    return tree


def resolve_override(key: str, value: Any, folder: Path) -> Any:
    """A `--set key=value` path value, resolved against `folder` (where the command runs)."""
    if key in PATH_FIELDS and isinstance(value, str):
        return resolve_path(value, folder, always=key == STORE_FIELD)
    return value


def resolve_config_paths(config: FinetuneConfig, folder: Path) -> FinetuneConfig:
    """The config's relative paths (defaults included) made absolute against `folder`."""
    tree = config.model_dump()
    resolve_tree_paths(tree, folder)
    updates = {}
    for dotted in PATH_FIELDS:
        section, _, name = dotted.partition(".")
        if not name:
            updates[section] = tree[section]
        else:
            current = updates.get(section, getattr(config, section))
            updates[section] = current.model_copy(update={name: _get(tree, dotted)})
    return config.model_copy(update=updates)


def missing_local_inputs(config: FinetuneConfig) -> list[str]:
    """What the config names as a local input that is not there: said before a run creates anything."""
    problems = []
    base = config.model.base
    # (a hub id is not a local input; resolve_model_path tells the two apart the same way)
    if not is_url(base) and (base.startswith(("/", "./", "../", "~")) or base.count("/") > 1) and not Path(base).expanduser().exists():
        problems.append(f"model.base {base}: model folder not found")
    for dotted in INPUT_FIELDS[1:]:
        value = _get(config.model_dump(), dotted)
        if value and not is_url(value) and not Path(value).expanduser().exists():
            problems.append(f"{dotted} {value}: file not found")
    return problems


COMMAND_LINE_HINT = "a path on the command line is relative to where the command runs, one in a YAML file to that file's folder"
FLOW_HINT = "a path in a flow's parameters is read on the host the flow runs on; give it absolute, or as an fsspec URL"


def check_local_inputs(config: FinetuneConfig, hint: str = COMMAND_LINE_HINT) -> None:
    if problems := missing_local_inputs(config):
        raise LoraflowError("; ".join(problems) + f" ({hint})")
