"""Evidence that a fine-tune helped: the baseline before training, and early stopping that keeps the best step."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from loraflow import stages
from loraflow.config_loader import build_config
from loraflow.launch import Topology, build_command, run_streaming

pytestmark = pytest.mark.slow

SAMPLE = str(Path(__file__).parents[1] / "loraflow/data/sample/alpaca_gpt4_sample.json")


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _config(tiny_model, store: Path, **train):
    return build_config({
        "name": "eval", "storage": str(store), "model": {"base": str(tiny_model)},
        "data": {"path": SAMPLE, "val_set_size": 16, "cutoff_len": 128},
        "train": {"batch_size": 16, "micro_batch_size": 8, "gradient_checkpointing": "off", "retries": 0, **train},
    })


def _train(config, env: dict | None = None, exit_code: int = 0) -> tuple[dict | None, list, str]:
    """(summary, metrics rows, run URI) of a training run started as a flow starts it (its own process); for a run
    expected to fail, (None, its output lines, run URI)."""
    store, key, run, spec_uri = stages.prepare_training(config, log=lambda _: None)
    lines: list[str] = []
    command = build_command(Topology(), spec_uri)
    command.env.update(env or {})
    assert run_streaming(command, lines.append, timeout=300, forkable=True) == exit_code, "\n".join(lines[-40:])
    if exit_code:
        return None, lines, run
    metrics = [json.loads(line) for line in Path(run, "metrics", "metrics.jsonl").read_text().splitlines()]
    return stages.trained_record(store, key, run, reused=False).metrics, metrics, run


# A learning rate far too high with a constant schedule: on the built model in bf16 the eval loss goes 8.33 (before),
# 7.05, 7.34, 7.05 (the best, step 3), 7.31, 7.15: two evaluations without improvement after step 3 (in fp32, below,
# the best is step 1, by 0.002). The tests that take precision auto run under both answers (the cpu_bf16 fixture).
RISING = dict(learning_rate=0.05, lr_scheduler="constant", warmup=0, max_steps=30, eval_steps=1, save_steps=1,
              early_stopping_patience=2)
# The same in fp32, set: precision auto follows the host (bf16 with AVX512-BF16/AMX, else fp32), and the steps where
# the loss path turns with it. In fp32 the eval loss goes 8.325 (before), 7.048 (the best, step 1), 7.323, 7.050:
# two evaluations without improvement stop the run at step 3.
RISING_FP32 = {**RISING, "precision": "fp32"}


def _adapter_hash(run: str, checkpoint: str) -> str:
    return sha256_file(Path(run, "checkpoints", checkpoint, "adapter_model.safetensors"))


def test_early_stopping_stops_a_run_whose_eval_loss_rises_and_exports_the_best_step(tiny_model, tmp_path, cpu_bf16):
    summary, metrics, run = _train(_config(tiny_model, tmp_path / "store", **RISING))
    assert summary["precision"] == {"0": "fp32", "1": "bf16"}[cpu_bf16]  # (the answer this parametrization asked for)
    evals = {row["step"]: row["eval_loss"] for row in metrics if "eval_loss" in row and row["step"] > 0}
    best = min(evals, key=evals.get)
    assert summary["stopped_early"] and summary["global_step"] == best + 2 < 30  # two evaluations without improvement
    assert summary["kept_step"] == best and summary["eval_loss"] == evals[best]
    assert _adapter_hash(run, "final") == _adapter_hash(run, f"checkpoint-{best}")
    assert _adapter_hash(run, "final") != _adapter_hash(run, f"checkpoint-{summary['global_step']}")


def test_a_resumed_run_still_exports_the_best_step_when_its_scratch_folder_is_gone(tiny_model, tmp_path):
    """The first attempt fails at step 3 (its newest checkpoint is step 2, the best step 1); the retry runs on a host
    without the first attempt's scratch folder, so the best checkpoint comes back from the store."""
    config = _config(tiny_model, tmp_path / "store", **RISING_FP32)
    scratch = {"LORAFLOW_SCRATCH": str(tmp_path / "scratch")}
    _train(config, {**scratch, "LORAFLOW_TEST_FAIL_AT_STEP": "3"}, exit_code=1)
    shutil.rmtree(tmp_path / "scratch")
    summary, metrics, run = _train(config, scratch)
    evals = {row["step"]: row["eval_loss"] for row in metrics if "eval_loss" in row and row["step"] > 0}
    assert min(evals, key=evals.get) == 1, evals  # (the path RISING_FP32 describes)
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["kept_step"] == 1 and summary["global_step"] == 3
    assert _adapter_hash(run, "final") == _adapter_hash(run, "checkpoint-1")


def test_a_best_checkpoint_holding_a_pickle_is_not_restored_from_the_store(tiny_model, tmp_path):
    """The store is untrusted: the best checkpoint copied back on resume passes the same check as a resumed one."""
    import torch

    from loraflow.storage import ArtifactStore
    from test_untrusted_store import TouchOnUnpickle

    config = _config(tiny_model, tmp_path / "store", **RISING_FP32)
    scratch = {"LORAFLOW_SCRATCH": str(tmp_path / "scratch")}
    _, _, run = _train(config, {**scratch, "LORAFLOW_TEST_FAIL_AT_STEP": "3"}, exit_code=1)
    shutil.rmtree(tmp_path / "scratch")
    best = Path(run, "checkpoints", "checkpoint-1")
    marker = tmp_path / "pwned"
    planted = tmp_path / "planted"
    shutil.copytree(best, planted)
    torch.save({"python": TouchOnUnpickle(str(marker))}, planted / "optimizer.pt")
    ArtifactStore(str(tmp_path / "store")).commit(planted, f"{run}/checkpoints/checkpoint-1", {"step": 1}, replace=True)

    _, lines, _ = _train(config, scratch, exit_code=3)  # a user error: not retried
    assert not marker.exists(), "a pickle planted in the best checkpoint was executed"
    [error] = [line for line in lines if line.startswith("error: ")]
    assert f"the best checkpoint so far, {run}/checkpoints/checkpoint-1, holds files that are not plain tensor data (optimizer.pt: " in error


def test_a_run_that_never_beats_its_start_stops_and_exports_the_adapter_it_started_from(tiny_model, tmp_path, cpu_bf16):
    import torch
    from safetensors.torch import load_file

    # lr 0.5: the eval loss goes 8.33 (before) → 8.57 at step 1; patience 1 stops there.
    config = _config(tiny_model, tmp_path / "store", **{**RISING, "learning_rate": 0.5, "early_stopping_patience": 1})
    summary, metrics, run = _train(config)
    assert summary["precision"] == {"0": "fp32", "1": "bf16"}[cpu_bf16]
    before = next(row["eval_loss"] for row in metrics if row["step"] == 0 and "eval_loss" in row)
    assert summary["global_step"] == 1 and summary["stopped_early"] and summary["kept_step"] == 0
    assert summary["eval_loss"] == before == summary["eval_loss_before"]
    [start] = (tmp_path / "store" / "lora").glob("*/adapter/adapter_model.safetensors")
    exported, started = load_file(str(Path(run, "checkpoints", "final", "adapter_model.safetensors"))), load_file(str(start))
    assert exported.keys() == started.keys() and all(torch.equal(exported[name], started[name]) for name in started)
    from loraflow.report import eval_text

    assert "adapter: the starting one (no evaluated step beat the starting model; stopped early at step 1)" in eval_text(summary, str)


def test_a_diverging_run_stops_at_once_with_what_to_change(tiny_model, tmp_path, cpu_bf16):
    # lr 2.0 with a constant schedule: the gradient norm overflows within a few steps.
    config = _config(tiny_model, tmp_path / "store", learning_rate=2.0, lr_scheduler="constant", warmup=0, max_steps=30,
                     eval_steps=100, save_steps=100)
    _, lines, _ = _train(config, exit_code=3)  # a user error: not retried
    [error] = [line for line in lines if line.startswith("error: ")]
    assert re.match(r"error: training diverged at step \d+: the (loss|gradient norm) is (nan|inf); lower train.learning_rate "
                    r"\(now 2\) or train.max_grad_norm$", error), error


def test_early_stopping_needs_a_validation_split_and_checkpoints_at_evaluated_steps(tiny_model, tmp_path):
    from loraflow.errors import LoraflowError

    base = {"name": "eval", "storage": str(tmp_path), "model": {"base": str(tiny_model)}, "data": {"path": SAMPLE}}
    with pytest.raises(LoraflowError, match=r"early_stopping_patience watches the eval loss: set data.val_set_size \(a validation split\), "
                                             "or train.early_stopping_patience: 0"):
        build_config({**base, "data": {"path": SAMPLE, "val_set_size": 0}, "train": {"early_stopping_patience": 2}})
    with pytest.raises(LoraflowError, match=r"save_steps \(50\) to be a multiple of eval_steps \(20\)"):
        build_config({**base, "train": {"early_stopping_patience": 2, "eval_steps": 20, "save_steps": 50}})


def test_compare_shows_the_settings_that_differ_and_the_results_side_by_side(prefect_server, tiny_model, tmp_path, capsys, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    from loraflow.cli import main

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # a running server: compare publishes an artifact

    store = tmp_path / "store"
    runs = []
    for learning_rate in (1e-2, 1e-3):
        _, _, run = _train(_config(tiny_model, store, learning_rate=learning_rate, max_steps=4, eval_steps=2, save_steps=2))
        runs.append(Path(run).name)
    assert main(["compare", *runs, "--storage", str(store), "--out", str(tmp_path / "out")]) == 0
    shown = capsys.readouterr().out
    assert "| train.learning_rate | 0.01 | 0.001 |" in shown
    assert "train.batch_size" not in shown and "lora.r" not in shown  # the same in both: not shown
    for result in ("**eval loss before**", "**eval loss**", "**perplexity**", "**tokens/s**", "**peak RSS MB**"):
        assert result in shown, result
    assert "Lowest eval loss: `" in shown
    assert (tmp_path / "out" / "loss-curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    [key] = re.findall(r"published in the Prefect UI as the artifact (compare-[0-9a-f]{8})", shown)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert "| train.learning_rate | 0.01 | 0.001 |" in artifact.data and "![loss curves](data:image/png;base64," in artifact.data

    assert main(["compare", runs[0], "no-such-run", "--storage", str(store)]) == 1
    assert "no-such-run: not a finished run in" in capsys.readouterr().err
    assert main(["compare", runs[0], runs[0], "--storage", str(store)]) == 1
    assert "compare needs two different runs or more" in capsys.readouterr().err
    assert main(["compare", *runs, "--storage", str(tmp_path / "nostore")]) == 1
    assert "no store there (the folder does not exist)" in capsys.readouterr().err


def test_exact_match_and_rouge_l_on_fixed_strings():
    from loraflow.evaluate import exact_match, extract_answer, rouge_l

    assert extract_answer("so the total is #### 1,234 apples", r"####\s*([\d,]+)") == "1,234"
    assert extract_answer("no number here", r"####\s*(\d+)") == ""
    assert extract_answer("  42 \n") == "42"
    assert exact_match("Reasoning... #### 18", "#### 18", r"####\s*(\d+)")
    assert not exact_match("Reasoning... #### 17", "#### 18", r"####\s*(\d+)")
    assert exact_match("The answer is 5.", "answer: 5", r"(\d+)")  # the pattern's group, from both sides
    # LCS "the cat on the mat" (5 of 6 candidate and 5 of 7 reference words): F1 = 2·(5/6)(5/7)/(5/6 + 5/7) = 10/13
    assert rouge_l("the cat sat on the mat", "The cat was lying on the mat") == pytest.approx(10 / 13)
    assert rouge_l("a b c", "a b c") == 1.0 and rouge_l("x y", "a b") == 0.0 and rouge_l("", "") == 1.0


def test_the_metrics_table_shows_a_diverged_value_as_text():
    """JSON has no Infinity: a bare one made the UI's metrics table show no rows at all."""
    from loraflow.report import metrics_table

    table = metrics_table([{"step": 6, "loss": 7.5, "grad_norm": 3.25}, {"step": 7, "loss": float("nan"), "grad_norm": float("inf")}])
    assert table == [{"step": 6, "loss": 7.5, "grad_norm": 3.25}, {"step": 7, "loss": "nan", "grad_norm": "inf"}]
    json.dumps(table, allow_nan=False)


@pytest.mark.parametrize("scratch_kept", [True, False], ids=["same-host-retry", "scratch-folder-lost"])
def test_tensorboard_and_mlflow_hold_each_step_once_across_a_resume(tiny_model, tmp_path, scratch_kept, monkeypatch):
    """The first attempt logs steps 1-3 and fails at step 4; the retry resumes from checkpoint-2 and logs 3-6 again.
    TensorBoard (read with its own event reader) and MLflow (a local database) each show one run with every step."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = _config(tiny_model, tmp_path / "store", max_steps=6, eval_steps=2, save_steps=2, report_to=["tensorboard", "mlflow"])
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)  # the flow's environment, which the trainer inherits
    env = {"LORAFLOW_SCRATCH": str(tmp_path / "scratch")}
    _train(config, {**env, "LORAFLOW_TEST_FAIL_AT_STEP": "4"}, exit_code=1)
    if not scratch_kept:
        shutil.rmtree(tmp_path / "scratch")
    summary, metrics, run = _train(config, env)
    assert summary["resumed_from"].endswith("checkpoint-2")
    losses = {row["step"]: row["loss"] for row in metrics if "loss" in row}
    evals = {row["step"]: row["eval_loss"] for row in metrics if "eval_loss" in row}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and sorted(evals) == [0, 2, 4, 6]

    events = EventAccumulator(str(Path(run, "metrics", "tensorboard")))
    events.Reload()
    for tag, expected in (("train/loss", losses), ("eval/loss", evals)):
        logged = [(event.step, event.value) for event in events.Scalars(tag)]
        assert [step for step, _ in logged] == sorted(expected), tag  # each step once, in order
        assert dict(logged) == pytest.approx(expected), tag

    client = MlflowClient(tracking_uri)
    [experiment] = [e for e in client.search_experiments() if e.name == "eval"]
    [mlflow_run] = client.search_runs([experiment.experiment_id])
    assert mlflow_run.info.run_name == Path(run).name and mlflow_run.info.status == "FINISHED"
    history = {m.step: m.value for m in client.get_metric_history(mlflow_run.info.run_id, "loss")}
    assert history == pytest.approx(losses)
    assert float(mlflow_run.data.params["learning_rate"]) == config.train.learning_rate


def test_a_tracker_without_its_package_or_server_is_a_user_error_before_any_stage(tiny_model, tmp_path, monkeypatch):
    from loraflow.envcheck import check_environment
    from loraflow.errors import LoraflowError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = _config(tiny_model, tmp_path / "store", report_to="mlflow")
    assert config.train.report_to == ["mlflow"]
    with pytest.raises(LoraflowError, match=r"train.report_to mlflow needs MLFLOW_TRACKING_URI in the training process's environment"):
        check_environment(config)
    with pytest.raises(LoraflowError, match=r"report_to\.0: Input should be 'tensorboard' or 'mlflow'"):
        _config(tiny_model, tmp_path / "store", report_to=["wandb"])


def test_compare_says_that_a_padded_run_s_tokens_per_s_counts_its_padding():
    from loraflow.compare import RunFacts, comparison_markdown

    packed = RunFacts("lora-run", {"lora.method": "lora"}, {"tokens_per_s": 900.0, "packed": True})
    padded = RunFacts("prefix-run", {"lora.method": "prefix-tuning"}, {"tokens_per_s": 1500.0, "packed": False})
    assert "tokens/s of padded runs (`prefix-run`) counts their padding too" in comparison_markdown([packed, padded])
    assert "padding" not in comparison_markdown([packed, RunFacts("other", {"lora.method": "ia3"}, {"packed": True})])
