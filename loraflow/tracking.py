"""Experiment trackers (`train.report_to`): TensorBoard event files in the run's metrics folder in the store, and
MLflow runs at the tracking server named by MLFLOW_TRACKING_URI. Optional packages, never needed by the default path:
`pip install 'loraflow[tracking]'` (tensorboard, mlflow-skinny).

transformers' own callbacks do the logging; what is added here is what a retried, store-backed run needs: the event
files are written at every log (a checkpoint's commit carries every step before it), a resumed run
hides the steps its first attempt logged past the checkpoint (TensorBoard's purge_step), and it goes on logging into
the same MLflow run.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

TENSORBOARD_FOLDER = "tensorboard"  # in the run's metrics folder
MLFLOW_RUN = "mlflow_run.json"  # in the run's metrics folder: the MLflow run a resumed attempt goes on with
INSTALL = "pip install 'loraflow[tracking]'"


def problems(report_to: list[str]) -> list[str]:
    """What the trackers asked for lack in this Python environment (the training process's): a line each."""
    found = []
    if "tensorboard" in report_to and importlib.util.find_spec("tensorboard") is None:
        found.append(f"train.report_to tensorboard needs the tensorboard package in the training environment ({INSTALL})")
    if "mlflow" in report_to:
        if importlib.util.find_spec("mlflow") is None:
            found.append(f"train.report_to mlflow needs MLflow in the training environment ({INSTALL})")
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            found.append("train.report_to mlflow needs MLFLOW_TRACKING_URI in the training process's environment (the "
                         "tracking server, e.g. http://mlflow.example:5000, or a local database, sqlite:////srv/mlflow.db)")
    return found


def callbacks(report_to: list[str], metrics_dir: Path, run_id: str, resumed_step: int | None) -> list:
    """The Trainer callbacks for the trackers in report_to, logging into metrics_dir (which the trainer commits to the
    store with the metrics). resumed_step: the checkpoint's step when this attempt resumes one."""
    found = []
    if "tensorboard" in report_to:
        found.append(_tensorboard(metrics_dir / TENSORBOARD_FOLDER, resumed_step))
    if "mlflow" in report_to:
        found.append(_mlflow(metrics_dir / MLFLOW_RUN, run_id, resumed_step is not None))
    return found


def _tensorboard(folder: Path, resumed_step: int | None):
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    class TensorBoardToStore(TensorBoardCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            super().on_log(args, state, control, logs, **kwargs)
            if self.tb_writer is not None:
                self.tb_writer.flush()  # on disk at once (else every 2 minutes): in the folder each checkpoint commits

    # purge_step: TensorBoard hides what an earlier attempt logged from this step on (it is logged again now).
    writer = SummaryWriter(str(folder), purge_step=None if resumed_step is None else resumed_step + 1)
    return TensorBoardToStore(tb_writer=writer)


def _mlflow(record: Path, run_id: str, resumed: bool):
    from transformers.integrations import MLflowCallback

    tracking_uri = os.environ["MLFLOW_TRACKING_URI"]
    # One experiment per config name (the run id less its key), unless the environment names one.
    os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", run_id.rsplit("-", 1)[0])
    earlier = json.loads(record.read_text()) if resumed and record.is_file() else {}
    if earlier.get("tracking_uri") == tracking_uri and earlier.get("run_id"):
        os.environ["MLFLOW_RUN_ID"] = earlier["run_id"]  # (a plain id: at worst it names another run to log into)
        # The first attempt logged the run's parameters; MLflow refuses a changed one (eval_on_start is off now: the
        # baseline was measured), so the resumed attempt logs none.
        os.environ["MLFLOW_MAX_LOG_PARAMS"] = "0"

    class MLflowToStore(MLflowCallback):
        def setup(self, args, state, model):
            super().setup(args, state, model)
            if state.is_world_process_zero and self._ml_flow.active_run() is not None:
                record.write_text(json.dumps({"tracking_uri": tracking_uri, "run_id": self._ml_flow.active_run().info.run_id}))

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero and self._initialized:
                self._ml_flow.flush_async_logging()

    return MLflowToStore()
