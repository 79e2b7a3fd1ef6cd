"""Experiment tracking through Accelerate's trackers (--report-to tensorboard | mlflow | wandb | none).

TensorBoard (the default) writes event files to <run dir>/tensorboard/, offline. MLflow logs to
$MLFLOW_TRACKING_URI (a server, a file store with MLFLOW_ALLOW_FILE_STORE=true, ...), else to an SQLite store in
<run dir>/mlflow.db (MLflow 3's local backend); W&B as its own settings say (WANDB_MODE=offline works without a
network). A tracker whose package is missing is skipped with one warning: the run goes on.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
PROGRAM = __name__.split(".")[0]


def tracker_config(cfg: Any) -> dict[str, Any]:
    """The run's settings as the trackers take them: scalars as they are, lists joined, None as 'none'."""
    out = {}
    for key, value in cfg.to_dict().items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        out[key] = "none" if value is None else value
    return out


def start_trackers(accelerator: Any, cfg: Any, run_dir: Path) -> bool:
    """Start the run's tracker; False (after one warning) when its package is not installed."""
    name = cfg.report_to
    package = PACKAGES[name]
    if importlib.util.find_spec(package) is None:
        log.warning("--report-to %s: the package %s is not installed (pip install %s); this run is not tracked",
                    name, package, package if name != "mlflow" else "mlflow-skinny")
        return False
    run_name = f"{cfg.task}-{cfg.label or cfg.method}-seed{cfg.seed}"
    init_kwargs: dict[str, Any] = {}
    project = TENSORBOARD_DIR
    if name == "mlflow":
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}")
        project = f"{PROGRAM}-{cfg.task}"
        init_kwargs = {"mlflow": {"run_name": run_name}}
    elif name == "wandb":
        project = f"{PROGRAM}-{cfg.task}"
        init_kwargs = {"wandb": {"name": run_name, "dir": str(run_dir)}}
    accelerator.init_trackers(project, config=tracker_config(cfg), init_kwargs=init_kwargs)
    return True
