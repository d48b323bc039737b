"""What the store holds (`loraflow du`) and what can go (`loraflow gc`, a dry run unless told to apply).

Store layout: shared stage outputs (`dataset/`, `base/`, `lora/`, `reference/`: one folder per content key),
`runs/<run>/` (spec, checkpoints, adapter, merged model, metrics, summary), `prefect-results/` (Prefect's
cache records, JSON), `leases/` (who is building what now), `train-records/` and `watch/` (small JSON).

gc removes only:
- leftovers: a stage or run folder without a manifest (an interrupted write), untouched for `grace`
  hours and not being built now (no live lease for it);
- superseded checkpoints: every `checkpoint-N` of a run whose final adapter is committed, else all but
  that run's two newest (a resume needs the newest whose files all load safely);
- with `older_than` days: runs with no write for that long, then shared stage outputs that no
  remaining run's spec uses and that are that old themselves;
- cache records in `prefect-results/` whose output is no longer committed.
Never a committed output that a protected URI (a deployment's default parameters) points to, nor the newest run
a deployment's default config made (its name, on its data: see DefaultConfig) with what it used, nor anything of a
run whose training holds a live lease. Each kept item's note says which of these it is.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from loraflow.lease import StoreLease
from loraflow.registry import ADAPTER, MERGED, RUNS_FOLDER, SHARED_FOLDERS, TRAIN
from loraflow.storage import MANIFEST, ArtifactStore

RUN_OUTPUTS = (ADAPTER.folder, MERGED.folder, "metrics")


def cached_output(content: bytes) -> str | None:
    """The output folder a Prefect cache record (a persisted StageRecord result, JSON) points to; None if it names none."""
    try:
        data = json.loads(json.loads(content)["result"])["data"]
        output = data["uri"]
        if (data.get("metrics") or {}).get("in_store") is False:  # an unquantized base: the model's own folder
            return None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return output if isinstance(output, str) and output else None


@dataclass(frozen=True)
class DefaultConfig:
    """A deployment's default fine-tune config, as gc sees it: the runs it makes (`<name>-<key>`, or a sweep's
    `<name>-v<N>-<key>`) on the data it names (data.path: absolute, or a URL)."""

    deployment: str
    name: str
    data: str
    sweep: bool = False

    def makes(self, run_folder_name: str) -> bool:
        name = run_folder_name.rsplit("-", 1)[0]
        if self.sweep:  # a sweep's runs are its variants only: a plain run of the same name is another deployment's
            return re.fullmatch(re.escape(self.name) + r"-v\d+", name) is not None
        return name == self.name


@dataclass
class Removable:
    uri: str
    size: int
    reason: str


def _mtime(info: dict) -> float:
    for field in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(field)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return time.time()  # unknown: treat as new, so never removed for its age


@dataclass
class Folder:
    size: int = 0
    newest: float = 0.0
    committed: bool = False


class StoreIndex:
    """One listing of the whole store (a single paginated walk on S3), grouped into the folders gc reasons about."""

    def __init__(self, store: ArtifactStore):
        self.store = store
        store.fs.invalidate_cache(store.root)
        files = store.fs.find(store.root, detail=True)
        self.files = {path[len(store.root) + 1:]: info for path, info in files.items() if info.get("type") != "directory"}

    def folder(self, prefix: str) -> Folder:
        found = Folder()
        for relative, info in self.files.items():
            if relative.startswith(prefix + "/"):
                found.size += int(info.get("size") or 0)
                found.newest = max(found.newest, _mtime(info))
                found.committed |= relative == f"{prefix}/{MANIFEST}"
        return found

    def children(self, prefix: str) -> list[str]:
        """The immediate sub-folders of prefix that hold files (relative paths)."""
        depth = prefix.count("/") + 2 if prefix else 1
        return sorted({"/".join(relative.split("/")[:depth]) for relative in self.files
                       if relative.startswith(prefix + "/" if prefix else "") and relative.count("/") >= depth})

    def live_leases(self) -> set[str]:
        names = {relative.split("/")[1] for relative in self.files if relative.startswith("leases/")}
        live = set()
        for name in names:
            generations = StoreLease(self.store, name)._generations()
            if generations and StoreLease._alive(generations[-1][1]):
                live.add(name)
        return live


def usage(store: ArtifactStore) -> tuple[list[tuple[str, int, int, int]], list[tuple[str, int, int, float]]]:
    """([(part, bytes, files, committed folders)], [(run, bytes, checkpoint bytes, last write)])."""
    index = StoreIndex(store)
    parts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for relative, info in index.files.items():
        part = relative.split("/", 1)[0] if "/" in relative else "(top level)"
        parts[part][0] += int(info.get("size") or 0)
        parts[part][1] += 1
        parts[part][2] += relative.endswith("/" + MANIFEST)
    runs = []
    for run in index.children(RUNS_FOLDER):
        whole, checkpoints = index.folder(run), index.folder(f"{run}/checkpoints")
        runs.append((run.split("/", 1)[1], whole.size, checkpoints.size, whole.newest))
    return sorted(((k, *v) for k, v in parts.items()), key=lambda row: -row[1]), sorted(runs, key=lambda row: -row[1])


def _age(seconds: float) -> str:
    return f"{seconds / 86400:.0f} days" if seconds >= 2 * 86400 else f"{seconds / 3600:.1f} hours"


def _data_source(store: ArtifactStore, run: str) -> str | None:
    """The data file a run trained on (its dataset stage's recorded source), None where the store does not say."""
    try:
        dataset = json.loads(store.fs.cat_file(f"{store.root}/{run}/spec.json"))["dataset_uri"]
        return json.loads(store.fs.cat_file(store.path(f"{dataset}/stats.json")))["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _newest_runs_of(store: ArtifactStore, index: StoreIndex, defaults: list[DefaultConfig]) -> dict[str, str]:
    """{run URI: why it stays} for the newest run each default config made: one of its names, on its data. A run of
    the same name on other data is not what the deployment would reuse, and a sweep's variants are `<name>-v<N>`."""
    made: dict[str, set[DefaultConfig]] = defaultdict(set)
    for run in index.children(RUNS_FOLDER):
        if candidates := [default for default in defaults if default.makes(run.split("/", 1)[1])]:
            source = _data_source(store, run)
            made[run] = {default for default in candidates if source == default.data}
    kept: dict[str, str] = {}
    for group in {(default.name, default.data, default.sweep) for default in defaults}:
        makers = [default for default in defaults if (default.name, default.data, default.sweep) == group]
        runs = [run for run, by in made.items() if by & set(makers)]
        if runs:
            name, data, sweep = group
            owners = sorted({default.deployment for default in makers})
            kept[store.uri(max(runs, key=lambda run: index.folder(run).newest))] = (
                f"the newest run of the default config of deployment{'s' if len(owners) > 1 else ''} {', '.join(owners)} "
                f"({name}{'-v<N>' if sweep else ''} on {data})")
    return kept


def plan(store: ArtifactStore, older_than_days: float | None = None, grace_hours: float = 6.0,
         protected: dict[str, str] | None = None, now: float | None = None,
         defaults: list[DefaultConfig] | None = None) -> tuple[list[Removable], list[str]]:
    """(what gc would remove, notes on what it kept and why).

    protected: URIs in the store → why they stay. defaults: deployments' default configs: the newest run each made
    (its name, and trained on its data) stays, and with it the data, base and LoRA init it used (what a run of that
    deployment reuses).
    """
    index = StoreIndex(store)
    now = now or time.time()
    protected = dict(protected or {})
    protected.update(_newest_runs_of(store, index, defaults or []))
    live = index.live_leases()
    removable: list[Removable] = []
    notes: list[str] = []

    def shields(relative: str) -> str | None:
        uri = store.uri(relative)
        for target, why in protected.items():
            if target.rstrip("/") == uri or target.startswith(uri + "/") or uri.startswith(target.rstrip("/") + "/"):
                return why
        return None

    def remove(relative: str, reason: str, folder: Folder) -> None:
        if (why := shields(relative)) is not None:
            notes.append(f"kept {store.uri(relative)}: {why}")
            return
        removable.append(Removable(store.uri(relative), folder.size, reason))

    def leftover(relative: str, lease: str | None) -> None:
        folder = index.folder(relative)
        if folder.committed or (lease and lease in live):
            return
        if now - folder.newest < grace_hours * 3600:
            notes.append(f"kept {store.uri(relative)}: uncommitted but written {(now - folder.newest) / 3600:.1f} h ago "
                         f"(under the {grace_hours:g} h grace: it may still be in progress)")
            return
        remove(relative, "uncommitted leftover of an interrupted write", folder)

    for stage in SHARED_FOLDERS:
        for relative in index.children(stage):
            leftover(relative, f"{stage}-{relative.rsplit('/', 1)[-1]}")

    kept_runs = []
    for run in index.children(RUNS_FOLDER):
        name = run.split("/", 1)[1]
        if any(lease.startswith("train-" + name.rsplit("-", 1)[-1]) for lease in live):
            notes.append(f"kept {store.uri(run)}: its training is running now")
            kept_runs.append(run)
            continue
        folder = index.folder(run)
        if older_than_days is not None and now - folder.newest > older_than_days * 86400:
            if (why := shields(run)) is None:
                removable.append(Removable(store.uri(run), folder.size, f"run not written or used for {_age(now - folder.newest)}"))
                continue
            notes.append(f"kept {store.uri(run)}: {why}")
        kept_runs.append(run)
        present = index.children(run)
        for output in RUN_OUTPUTS:
            if f"{run}/{output}" in present:
                leftover(f"{run}/{output}", None)
        checkpoints = index.children(f"{run}/checkpoints")
        committed = {c: index.folder(c) for c in checkpoints}
        for checkpoint in checkpoints:
            if not committed[checkpoint].committed:
                leftover(checkpoint, None)
        numbered = sorted((c for c in checkpoints if c.rsplit("/", 1)[-1].startswith("checkpoint-") and committed[c].committed),
                          key=lambda c: int(c.rsplit("-", 1)[-1]))
        final_committed = committed.get(f"{run}/{TRAIN.folder}", Folder()).committed
        superseded = numbered if final_committed else numbered[:-2]
        for checkpoint in superseded:
            why = "the run's final adapter is committed" if final_committed else "two newer checkpoints of the run are committed"
            remove(checkpoint, f"superseded checkpoint ({why})", committed[checkpoint])

    # Shared stage outputs: removable with the age limit only, and only when no remaining run's spec uses them.
    if older_than_days is not None:
        in_use: set[str] = set()
        for run in kept_runs:
            if f"{run}/spec.json" in index.files:
                spec = json.loads(store.fs.cat_file(f"{store.root}/{run}/spec.json"))
                in_use |= {spec.get(k, "") for k in ("dataset_uri", "base_uri", "lora_uri", "reference_uri")}
        for stage in SHARED_FOLDERS:
            for relative in index.children(stage):
                folder = index.folder(relative)
                if not folder.committed or now - folder.newest <= older_than_days * 86400:
                    continue
                if store.uri(relative) in in_use:
                    notes.append(f"kept {store.uri(relative)}: a kept run uses it")
                    continue
                remove(relative, f"no kept run uses it; last written or used {_age(now - folder.newest)} ago", folder)

    # Prefect cache records whose output is gone (or is about to be): they would only cause a rebuild.
    going = [r.uri for r in removable]
    for relative, info in index.files.items():
        if not relative.startswith("prefect-results/"):
            continue
        output = cached_output(store.fs.cat_file(f"{store.root}/{relative}"))
        if output and (any(output == uri or output.startswith(uri + "/") for uri in going) or not store.is_committed(output)):
            removable.append(Removable(store.uri(relative), int(info.get("size") or 0), f"cache record of {output}, which is gone"))
    return removable, notes


def apply(store: ArtifactStore, removable: list[Removable]) -> int:
    """Remove what plan() listed; returns the bytes freed."""
    freed = 0
    for item in removable:
        path = store.path(item.uri)
        if store.fs.exists(path):
            store.fs.rm(path, recursive=store.fs.isdir(path))
            freed += item.size
    return freed
