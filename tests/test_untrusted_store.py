"""The artifact store is shared and untrusted: nothing read from it may run code.

A writer of the store can put any file under `<store>/prefect-results/`; Prefect would decode it with
whatever serializer the file names (pickle included). These tests plant such files where the next
fine-tune looks for its cached results and check that nothing runs and the stage is recomputed.
"""

import json
import logging
import os
from pathlib import Path

import pytest
from prefect import flow

from loraflow import stages
from tasks.common import stage_options
from tasks.data import prepare_dataset
from tasks.env import inspect_sources
from tasks.results import RefusedResult, check_result_file
from tasks.runs import task_states
from test_sft_pipeline import sft_config


class TouchOnUnpickle:
    """Unpickling this creates `marker`: the proof that a pickle from the store was executed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@flow
def data_stage(config):
    """The SFT flow's data stage, with its real cache options (the results in the store)."""
    return prepare_dataset.with_options(**stage_options(config.storage))(config, inspect_sources(config))


def _run(config):
    state = data_stage(config, return_state=True)
    assert state.is_completed(), state.message
    return task_states(state.state_details.flow_run_id)["dataset"]


def test_a_pickled_result_planted_in_the_store_is_refused_and_recomputed(prefect_server, tiny_model, tmp_path, caplog):
    from prefect.results import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    config = sft_config(tiny_model, tmp_path / "store").for_run()
    key = stages.dataset_key(config, stages.inspect_sources(config))
    planted = tmp_path / "store" / "prefect-results" / f"dataset-{key}"
    planted.parent.mkdir(parents=True)
    marker = tmp_path / "pwned"
    record = ResultRecord(metadata=ResultRecordMetadata(storage_key=str(planted), serializer=PickleSerializer()),
                          result=TouchOnUnpickle(str(marker)))
    planted.write_bytes(record.serialize())

    with caplog.at_level(logging.WARNING, logger="loraflow.results"):
        assert _run(config) == "Completed"  # recomputed, not "Cached" from the planted file
    assert not marker.exists(), "a pickle planted in the store was executed"
    assert f"refused Prefect result {planted.name}: it names serializer 'pickle' with settings other than Prefect's plain JSON" in caplog.text
    rewritten = json.loads(planted.read_bytes())
    assert rewritten["metadata"]["serializer"]["type"] == "json"  # the stage's fresh result replaced it
    assert _run(config) == "Cached"  # and a plain JSON result is a cache hit as before


@pytest.mark.parametrize("change, reason", [
    (lambda r: r["metadata"]["serializer"].update(jsonlib="pickle"), "names serializer 'json' with settings other than"),
    (lambda r: r["metadata"]["serializer"].update(object_decoder="os.system"), "names serializer 'json' with settings other than"),
    (lambda r: r.update(result=json.dumps({"__class__": "subprocess.Popen", "data": ["touch", "/tmp/x"]})), "names types other than StageRecord (subprocess.Popen)"),
    (lambda r: r.update(result=json.dumps({"a": [{"__exc_type__": "SystemExit", "message": "x"}]})), "names types other than StageRecord (SystemExit)"),
    (lambda r: r.pop("metadata"), "is not a JSON result record (KeyError)"),
])
def test_json_results_that_would_import_or_call_anything_but_a_stage_record_are_refused(change, reason):
    safe = {"metadata": {"storage_key": "k", "expiration": None, "prefect_version": "3.8.8", "storage_block_id": None,
                         "serializer": {"type": "json", "jsonlib": "json", "dumps_kwargs": {}, "loads_kwargs": {},
                                        "object_encoder": "prefect.serializers.prefect_json_object_encoder",
                                        "object_decoder": "prefect.serializers.prefect_json_object_decoder"}},
            "result": json.dumps({"__class__": "loraflow.storage.StageRecord", "data": {"stage": "dataset", "key": "k"}})}
    assert check_result_file("k", json.dumps(safe).encode()) == json.dumps(safe).encode()
    change(safe)
    with pytest.raises(RefusedResult, match=reason.replace("(", r"\(").replace(")", r"\)")):
        check_result_file("k", json.dumps(safe).encode())
    with pytest.raises(RefusedResult, match="is not a JSON result record"):
        check_result_file("k", b"\x80\x04pickle bytes")


def test_a_pickle_planted_in_a_checkpoint_is_never_loaded(tiny_model, tmp_path):
    """A checkpoint in the store whose RNG state is a pickle that runs code: the trainer refuses that
    checkpoint (naming the file), trains from the start instead, and nothing runs."""
    import torch

    from loraflow.launch import Topology, build_command, run_streaming

    config = sft_config(tiny_model, tmp_path / "store").for_run()
    config = config.model_copy(update={"train": config.train.model_copy(update={"max_steps": 2, "save_steps": 2, "eval_steps": 2})})
    store, key, run, spec_uri = stages.prepare_training(config, log=lambda _: None)
    marker = tmp_path / "pwned"
    planted = tmp_path / "planted"
    planted.mkdir()
    torch.save({"python": TouchOnUnpickle(str(marker))}, planted / "rng_state.pth")
    (planted / "adapter_model.safetensors").write_bytes(b"")
    store.commit(planted, f"{run}/checkpoints/checkpoint-1", {"step": 1})

    lines = []
    assert run_streaming(build_command(Topology(), spec_uri), lines.append, timeout=300, forkable=True) == 0, "\n".join(lines)[-3000:]
    output = "\n".join(lines)
    assert not marker.exists(), "a pickle planted in a checkpoint was executed"
    assert f"not resuming from {run}/checkpoints/checkpoint-1: it holds files that are not plain tensor data" in output
    assert "rng_state.pth: Weights only load failed" in output and "resuming from" not in output.replace("not resuming from", "")
    record = stages.trained_record(store, key, run, reused=False)
    assert record.metrics["global_step"] == 2 and record.metrics["resumed_from"] is None
    # The trainer's own checkpoints are plain tensor data (no training_args.bin pickle is committed) and resumable.
    from loraflow.train import refused_pickles

    saved = store.local_copy(f"{run}/checkpoints/checkpoint-2")
    assert refused_pickles(saved) == [] and not (saved / "training_args.bin").exists()


def test_trust_remote_code_comes_from_the_flow_never_from_the_spec_in_the_store(tmp_path, monkeypatch, capsys):
    from loraflow.config import TrainSettings
    import loraflow.train as trainer
    from loraflow.launch import Topology, build_command

    from loraflow.spec import RunSpec

    valid = RunSpec(store=str(tmp_path), run_uri=f"{tmp_path}/runs/r", dataset_uri="d", base_uri="b", base_in_store=False,
                    quantized=False, lora_uri="l", train=TrainSettings()).model_dump(mode="json")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(valid))
    seen = []
    monkeypatch.setattr(trainer, "train", lambda spec, trust_remote_code=False: seen.append(trust_remote_code))
    assert trainer.main([str(spec)]) == 0 and trainer.main([str(spec), "--trust-remote-code"]) == 0
    assert seen == [False, True]
    # What a writer of the store could plant: a spec with the switch in it is not a spec the trainer reads.
    planted = tmp_path / "planted.json"
    planted.write_text(json.dumps({**valid, "trust_remote_code": True}))
    assert trainer.main([str(planted)]) == trainer.USER_ERROR_EXIT and seen == [False, True]
    assert build_command(Topology(), "/s.json", python="/py").argv == ["/py", "-m", "loraflow.train", "/s.json"]
    assert build_command(Topology(), "/s.json", python="/py", trust_remote_code=True).argv[-1] == "--trust-remote-code"
    assert build_command(Topology("deepspeed", 2), "/s.json", trust_remote_code=True).argv[-3:] == ["loraflow.train", "/s.json", "--trust-remote-code"]


def test_a_committed_folder_is_never_rewritten_and_a_damaged_one_is_refused(tmp_path):
    from loraflow.errors import LoraflowError
    from loraflow.storage import ArtifactStore

    store = ArtifactStore(str(tmp_path / "store"))
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, text in ((first, "built first"), (second, "built again, differently")):
        folder.mkdir()
        (folder / "train.parquet").write_text(text)
    uri = store.uri("dataset", "k")
    committed = store.commit(first, uri, {"key": "k"})
    # A second writer of the same key (two fine-tunes that raced) leaves the committed folder as it is.
    assert store.commit(second, uri, {"key": "k"}) == committed
    assert (tmp_path / "store/dataset/k/train.parquet").read_text() == "built first"
    assert store.verify(uri, hashes=True) == committed and store.local_copy(uri, verify=True) == tmp_path / "store/dataset/k"

    (tmp_path / "store/dataset/k/train.parquet").write_text("built firs")  # truncated
    with pytest.raises(LoraflowError, match=r"dataset/k/train.parquet: 10 bytes, the manifest says 11 \(truncated or rewritten\)"):
        store.local_copy(uri, verify=True)
    (tmp_path / "store/dataset/k/train.parquet").write_text("BUILT FIRST")  # same size, other bytes
    with pytest.raises(LoraflowError, match=r"dataset/k/train.parquet: its sha256 differs from the manifest's"):
        store.local_copy(uri, verify=True)
    assert store.local_copy(uri) == tmp_path / "store/dataset/k"  # reads that do not train check nothing more


def test_importing_the_training_libraries_looks_up_no_outside_host():
    """bitsandbytes asked the Hugging Face hub for CPU kernels (code to run) on import: a lookup of huggingface.co
    from every loraflow process, the CLI's, the flows', the trainer's."""
    import subprocess
    import sys

    probe = ("import socket\nseen = []\nreal = socket.getaddrinfo\n"
             "def spy(host, *a, **k):\n    seen.append(host)\n    return real(host, *a, **k)\n"
             "socket.getaddrinfo = spy\nimport loraflow.train, loraflow.models.native, bitsandbytes, peft, trl\n"
             "print(sorted({h for h in seen if h not in ('127.0.0.1', 'localhost', '::1')}))\n")
    # (as a user runs it: the suite's HF_HUB_OFFLINE would hide the lookup)
    env = {name: value for name, value in os.environ.items() if not name.startswith("HF_")}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr[-2000:]
