"""`loraflow gc` and `loraflow du` on a store laid out as fine-tunes leave it: what goes, what stays, and why."""

import json
import os
import time
from pathlib import Path

import pytest

from loraflow.cli import main
from loraflow.gc import plan
from loraflow.lease import StoreLease
from loraflow.storage import ArtifactStore

DAY = 86400


def _commit(store: ArtifactStore, relative: str, size: int = 1000, age_days: float = 0.0) -> str:
    folder = Path(store.root, ".build", relative.replace("/", "_"))
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(os.urandom(size))
    uri = store.uri(relative)
    store.commit(folder, uri, {"stage": relative.split("/")[0]})
    _age(Path(store.path(uri)), age_days)
    return uri


def _age(path: Path, days: float) -> None:
    stamp = time.time() - days * DAY
    for file in [path, *path.rglob("*")]:
        os.utime(file, (stamp, stamp))


def _run(store: ArtifactStore, name: str, dataset: str, base: str, lora: str, checkpoints: list[int], final: bool, age_days: float) -> str:
    for step in checkpoints:
        _commit(store, f"runs/{name}/checkpoints/checkpoint-{step}")
    if final:
        _commit(store, f"runs/{name}/checkpoints/final")
    store.write_json(store.uri("runs", name, "spec.json"), {"dataset_uri": dataset, "base_uri": base, "lora_uri": lora})
    _age(Path(store.path(store.uri("runs", name))), age_days)
    return store.uri("runs", name)


@pytest.fixture
def store(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    shared = {name: _commit(store, f"{name}/{name[:4]}old", age_days=40) for name in ("dataset", "base", "lora")}
    recent_data = _commit(store, "dataset/recentdata", age_days=40)  # old itself, but a recent run uses it
    store.old = _run(store, "old-aaaaaaaaaaaa", shared["dataset"], shared["base"], shared["lora"], [2, 4], True, 40)
    store.recent = _run(store, "recent-bbbbbbbbbbbb", recent_data, shared["base"], shared["lora"], [2, 4, 6, 8], False, 1)
    store.shared, store.recent_data = shared, recent_data
    # A write that died an hour ago (within the grace) and one that died two days ago.
    for name, age in (("dataset/fresh-leftover", 1 / 24), ("base/stale-leftover", 2)):
        Path(store.path(store.uri(name))).mkdir(parents=True)
        Path(store.path(store.uri(name)), "model.safetensors").write_bytes(b"partial")
        _age(Path(store.path(store.uri(name))), age)
    import shutil
    shutil.rmtree(Path(store.root, ".build"))
    return store


def test_a_dry_run_lists_leftovers_and_superseded_checkpoints_and_keeps_what_a_resume_needs(store):
    removable, notes = plan(store)
    reasons = {item.uri.removeprefix(store.url + "/"): item.reason for item in removable}
    assert reasons == {
        "base/stale-leftover": "uncommitted leftover of an interrupted write",
        "runs/old-aaaaaaaaaaaa/checkpoints/checkpoint-2": "superseded checkpoint (the run's final adapter is committed)",
        "runs/old-aaaaaaaaaaaa/checkpoints/checkpoint-4": "superseded checkpoint (the run's final adapter is committed)",
        # the unfinished run keeps its two newest checkpoints (6, 8) for a resume
        "runs/recent-bbbbbbbbbbbb/checkpoints/checkpoint-2": "superseded checkpoint (two newer checkpoints of the run are committed)",
        "runs/recent-bbbbbbbbbbbb/checkpoints/checkpoint-4": "superseded checkpoint (two newer checkpoints of the run are committed)",
    }
    assert any("fresh-leftover" in note and "grace" in note for note in notes)


def test_old_runs_go_with_the_stage_outputs_only_they_used_but_never_what_a_deployment_or_kept_run_uses(store):
    protected = {store.shared["dataset"]: "deployment sft-xpu's default parameters use it"}
    removable, notes = plan(store, older_than_days=30, protected=protected)
    going = {item.uri for item in removable}
    assert store.old in going  # and with it its checkpoints, adapter and spec
    assert store.recent not in going and store.recent_data not in going  # the recent run's dataset
    assert store.shared["base"] not in going and store.shared["lora"] not in going  # the recent run's base and init
    assert store.shared["dataset"] not in going  # only the old run used it, but a deployment names it
    assert f"kept {store.shared['dataset']}: deployment sft-xpu's default parameters use it" in notes
    assert f"kept {store.recent_data}: a kept run uses it" in notes


def test_a_run_training_now_is_left_alone(store):
    lease = StoreLease(store, "train-bbbbbbbbbbbb0000")
    assert lease.try_acquire() is None
    try:
        removable, notes = plan(store, older_than_days=0.5)
    finally:
        lease.release()
    assert not [item for item in removable if item.uri.startswith(store.recent)]
    assert f"kept {store.recent}: its training is running now" in notes


def test_gc_removes_only_with_apply_and_the_cache_record_of_a_removed_output_becomes_a_miss(store, capsys):
    from tasks.results import RefusedResult, SAFE_SERIALIZER, check_result_file

    record = json.dumps({"metadata": {"serializer": SAFE_SERIALIZER}, "result": json.dumps(
        {"__class__": "loraflow.storage.StageRecord", "data": {"stage": "dataset", "key": "k", "uri": store.shared["dataset"]}})}).encode()
    assert check_result_file("dataset-k", record) == record  # its output is committed: a cache hit, which marks it used
    _age(Path(store.path(store.shared["dataset"])), 40)  # (as if that hit was 40 days ago)
    results = Path(store.path(store.uri("prefect-results")))
    results.mkdir()
    (results / "dataset-k").write_bytes(record)

    assert main(["gc", "--storage", store.url, "--older-than", "30"]) == 0
    dry = capsys.readouterr().out
    assert "would remove (a dry run: add --apply to remove)" in dry and f"{store.old} — run not written or used for 40 days" in dry
    assert Path(store.path(store.old)).exists()

    assert main(["gc", "--storage", store.url, "--older-than", "30", "--apply"]) == 0
    applied = capsys.readouterr().out
    assert "freed" in applied and not Path(store.path(store.old)).exists()
    assert not Path(store.path(store.shared["dataset"])).exists() and Path(store.path(store.recent)).exists()
    assert not (results / "dataset-k").exists()
    with pytest.raises(RefusedResult):  # a record left elsewhere (another store's copy, a race) is a miss, not a dangling hit
        check_result_file("dataset-k", record)
    for uri in (store.recent, store.recent_data, store.shared["base"]):
        for manifest in Path(store.path(uri)).rglob("manifest.json"):
            store.verify(str(manifest.parent), hashes=True)


def test_du_shows_each_part_and_the_largest_runs(store, capsys):
    assert main(["du", "--storage", store.url]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"{store.url}: ") and " files" in out.splitlines()[0]
    for part in ("runs", "dataset", "base", "lora"):
        assert any(line.split()[:1] == [part] for line in out.splitlines()), out
    assert "recent-bbbbbbbbbbbb" in out and "old-aaaaaaaaaaaa" in out


def _trained_on(store: ArtifactStore, run_uri: str, source: str) -> None:
    """Give a run's dataset the stats the data stage writes (its source file)."""
    dataset = json.loads(Path(store.path(run_uri), "spec.json").read_text())["dataset_uri"]
    Path(store.path(dataset), "stats.json").write_text(json.dumps({"source": source}))


def test_a_deployments_config_keeps_its_newest_run_and_a_reused_output_counts_as_recent(store):
    from loraflow.gc import DefaultConfig

    _trained_on(store, store.old, "/data/old.json")
    removable, notes = plan(store, older_than_days=30, defaults=[DefaultConfig("sft-xpu", "old", "/data/old.json")])
    going = {item.uri for item in removable}
    assert store.old not in going and store.shared["dataset"] not in going  # what sft-xpu's defaults reuse
    assert f"kept {store.old}: the newest run of the default config of deployment sft-xpu (old on /data/old.json)" in notes

    store.mark_used(store.shared["dataset"])  # a fine-tune just reused it (a cache hit or a committed output)
    going = {item.uri for item in plan(store, older_than_days=30)[0]}
    assert store.old in going and store.shared["dataset"] not in going
    store.verify(store.shared["dataset"], hashes=True)  # the mark is beside the content, not part of it


def test_gc_keeps_a_run_for_a_deployments_default_config_only_when_that_config_made_it(tmp_path, capsys):
    """`loraflow gc` with the deployments of deployments/prefect.yaml (sft-xpu, sweep-xpu, … default to config `demo` on
    the sample data). A newer `demo` run on other data is not what those deployments reuse; the run on their data is,
    and the reason names the deployments whose default it is (a sweep's runs are `demo-v<N>`, not `demo`)."""
    from loraflow.cli import DEPLOYMENTS_YAML

    sample = str(DEPLOYMENTS_YAML.parents[1] / "loraflow/data/sample/alpaca_gpt4_sample.json")
    store = ArtifactStore(str(tmp_path / "store"))
    runs = {}
    for name, source, age in (("demo-aaaaaaaaaaaa", sample, 50), ("demo-bbbbbbbbbbbb", "/uploads/other.json", 40),
                              ("demo-v2-cccccccccccc", sample, 45), ("demo-v1-dddddddddddd", "/uploads/other.json", 35)):
        data = _commit(store, f"dataset/{name}", age_days=age)
        runs[name] = _run(store, name, data, "", "", [2], True, age)
        _trained_on(store, runs[name], source)
        _age(Path(store.path(data)), age)
        _age(Path(store.path(runs[name])), age)
    assert main(["gc", "--storage", store.url, "--older-than", "30"]) == 0
    out = capsys.readouterr().out
    kept = dict(line.strip().removeprefix("kept ").split(": ", 1) for line in out.splitlines() if line.strip().startswith("kept "))
    assert kept[runs["demo-aaaaaaaaaaaa"]].startswith("the newest run of the default config of deployments "), out
    owners = kept[runs["demo-aaaaaaaaaaaa"]].split("deployments ", 1)[1].split(" (", 1)[0].split(", ")
    assert "sft-xpu" in owners and "sweep-xpu" not in owners, out
    assert kept[runs["demo-aaaaaaaaaaaa"]].endswith(f"(demo on {sample})")
    assert kept[runs["demo-v2-cccccccccccc"]] == f"the newest run of the default config of deployment sweep-xpu (demo-v<N> on {sample})"
    for other in ("demo-bbbbbbbbbbbb", "demo-v1-dddddddddddd"):  # newer, but on other data: removed as old
        assert runs[other] not in kept and f"{runs[other]} — run not written or used for" in out, out


def test_a_cache_record_pointing_outside_its_store_is_refused(store, tmp_path):
    from tasks.results import RefusedResult, SAFE_SERIALIZER, check_result_file

    elsewhere = ArtifactStore(str(tmp_path / "original"))
    original = _commit(elsewhere, "dataset/abc")
    record = json.dumps({"metadata": {"serializer": SAFE_SERIALIZER}, "result": json.dumps(
        {"__class__": "loraflow.storage.StageRecord", "data": {"stage": "dataset", "key": "k", "uri": original}})}).encode()
    assert check_result_file("dataset-k", record, elsewhere.url) == record
    with pytest.raises(RefusedResult, match="outside this store"):  # the copy's records name the original store
        check_result_file("dataset-k", record, store.url)
    # An unquantized base's record names the model's own folder (not a store output): read, not refused (a trial saw
    # "refused Prefect result base-…: it points to …/models/tiny-llama, outside this store" on every rerun)
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    base = json.dumps({"metadata": {"serializer": SAFE_SERIALIZER}, "result": json.dumps(
        {"__class__": "loraflow.storage.StageRecord",
         "data": {"stage": "base", "key": "k", "uri": str(model), "metrics": {"quantization": "none", "in_store": False}}})}).encode()
    assert check_result_file("base-k", base, store.url) == base


def test_a_sweeps_default_config_makes_only_its_variants_runs():
    """A new-user trial: gc kept a plain `loraflow demo` run "as the newest run of the default config of deployment
    sweep-xpu (demo-v<N> …)": a sweep's runs are its variants, `<name>-v<N>-<key>`."""
    from loraflow.gc import DefaultConfig

    sweep = DefaultConfig("sweep-xpu", "demo", "/data/sample.json", sweep=True)
    single = DefaultConfig("sft-xpu", "demo", "/data/sample.json")
    assert sweep.makes("demo-v3-17182e7ab5d2") and not sweep.makes("demo-a1bbeb8080a6")
    assert single.makes("demo-a1bbeb8080a6") and not single.makes("demo-v3-17182e7ab5d2")
