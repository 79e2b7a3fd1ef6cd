"""Tracking through Accelerate's trackers: TensorBoard event files in the run directory and an MLflow file
store hold per-step loss, the method's extra loss term, the learning rate, the gradient norm, the warm-up's
importances and the evaluation metrics (read back here)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from test_cli import tiny

from fwlora.cli import main

FW = ["--method", "fwlora", "--fw-warmup-steps", "2", "--fw-measure-every", "1", "--lambda-fw", "0.1", "--log-every", "1"]


def fw_run(glue_dir, out, *extra: str) -> list[str]:
    """FW-LoRA on 48 examples: 6 steps, 2 of warm-up and 4 with the penalty, logged every step."""
    args = tiny(glue_dir, out, *FW, *extra)
    args[args.index("--train-limit") + 1] = "48"
    return args


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_event_files_hold_per_step_loss_and_the_penalty(tmp_path, glue_dir):
    out = tmp_path / "run"
    assert main(fw_run(glue_dir, out)) == 0
    s = scalars(out)
    assert [step for step, _ in s["train/loss"]] == [1, 2, 3, 4, 5, 6]  # every --log-every step
    penalty = dict(s["train/extra_loss"])
    assert penalty[1] == 0 and penalty[2] == 0 and all(penalty[k] > 0 for k in (3, 4, 5, 6))  # zero in the warm-up
    assert {"train/lr", "train/grad_norm", "train/step_seconds", "eval/mcc", "eval/accuracy"} <= set(s)
    importance = [t for t in s if t.startswith("importance/")]
    assert importance and sum(s[t][0][1] for t in importance) == pytest.approx(1.0, rel=1e-5)  # I_m sums to 1
    record = json.loads((out / "result.json").read_text())
    assert dict(s["eval/mcc"])[6] == pytest.approx(record["final"]["mcc"], abs=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
@pytest.mark.parametrize("store", ["file", "default"])
def test_an_mlflow_store_gets_the_same(tmp_path, glue_dir, monkeypatch, store):
    """A file store (MLflow 3 wants MLFLOW_ALLOW_FILE_STORE=true for it), or by default an SQLite store in the run."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    if store == "file":
        uri = (tmp_path / "mlruns").as_uri()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        uri = f"sqlite:///{out.resolve() / 'mlflow.db'}"
    assert main(fw_run(glue_dir, out, "--report-to", "mlflow")) == 0
    client = MlflowClient(tracking_uri=uri)
    [experiment] = [e for e in client.search_experiments() if e.name == "fwlora-cola"]
    [run] = client.search_runs([experiment.experiment_id])
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in loss] == [1, 2, 3, 4, 5, 6] and run.data.params["method"] == "fwlora"
    extra = client.get_metric_history(run.info.run_id, "train/extra_loss")
    assert [m.value > 0 for m in sorted(extra, key=lambda m: m.step)] == [False] * 2 + [True] * 4
    assert "eval/mcc" in run.data.metrics and not (out / "tensorboard").exists()


def test_a_missing_tracker_package_warns_once_and_the_run_goes_on(tmp_path, glue_dir, caplog):
    out = tmp_path / "run"
    assert main(tiny(glue_dir, out, "--report-to", "wandb")) == 0 or importlib.util.find_spec("wandb") is not None
    if importlib.util.find_spec("wandb") is None:
        assert any("--report-to wandb: the package wandb is not installed" in r.message for r in caplog.records)
        assert (out / "result.json").is_file()
