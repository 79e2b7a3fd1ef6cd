"""`fwlora sweep` running trials: the bookkeeping (totals, resumption, interruption, infeasible and diverged
trials, surplus and dead workers, storages and heartbeats, settings a study refuses, seeds per trial) with a
stand-in for `train`, and real sweeps (pruning and the exported configs, CLI resume, two workers, SIGINT)
that train the offline MiniLM on 32 CoLA examples for 2 epochs per trial. Helpers come from test_sweep.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from test_sweep import REPO, SLICE, TINY_SPACE, fake_train, load, make_config, slice_flags, snapshot, write_space

from fwlora import bench, records, sweep
from fwlora.cli import build_parser, collect_train_settings, main
from fwlora.config import TrainConfig, load_config_file
from fwlora.errors import NonFiniteError, TrainingInterrupted, UserError
from fwlora.files import read_json
from fwlora.records import Status




def test_resumed_study_continues_to_the_total_and_samples_as_an_unbroken_one(tmp_path, glue_dir):
    cfg = make_config(tmp_path / "a", glue_dir, trials=2)
    sweep.run_sweep(cfg, train_fn=fake_train)
    first = snapshot(load(cfg))
    assert [t[1] for t in first] == [TrialState.COMPLETE] * 2
    cfg.trials = 3
    sweep.run_sweep(cfg, train_fn=fake_train)
    again = snapshot(load(cfg))
    assert len(again) == 3 and again[:2] == first
    sweep.run_sweep(cfg, train_fn=fake_train)  # the total is reached: nothing more runs
    assert len(load(cfg).trials) == 3
    straight = make_config(tmp_path / "b", glue_dir, trials=3)
    sweep.run_sweep(straight, train_fn=fake_train)
    assert snapshot(load(straight)) == again


def test_method_studies_draw_the_same_shared_values_during_the_random_start_up(tmp_path, glue_dir):
    cfg = make_config(tmp_path, glue_dir, methods=["lora", "fwlora"], trials=3, space={})  # the default space
    sweep.run_sweep(cfg, train_fn=fake_train)  # fwlora's K >= 4 steps: pruned untrained, but drawn all the same
    lora, fwlora = load(cfg, "lora").trials, load(cfg, "fwlora").trials
    shared = ("lr", "rank", "batch_size")
    assert [{k: t.params[k] for k in shared} for t in lora] == [{k: t.params[k] for k in shared} for t in fwlora]
    assert len({t.params["lr"] for t in lora}) == 3


def test_interrupted_trial_is_failed_and_replaced(tmp_path, glue_dir):
    calls = []

    def interrupted_second(cfg, overwrite=False, on_epoch_end=None):
        calls.append(cfg.output_dir)
        if len(calls) == 2:
            raise TrainingInterrupted("stopped by SIGINT", 2)
        return fake_train(cfg, overwrite, on_epoch_end)

    cfg = make_config(tmp_path, glue_dir, trials=3)
    with pytest.raises(TrainingInterrupted):
        sweep.run_sweep(cfg, train_fn=interrupted_second)
    trials = load(cfg).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert trials[1].user_attrs["fail_reason"] == "interrupted"
    sweep.run_sweep(cfg, train_fn=fake_train)
    study = load(cfg)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL] + [TrialState.COMPLETE] * 2
    counts = sweep.study_counts(study)
    assert counts["counted"] == counts["complete"] == 3 and counts["failed"] == 1


def test_infeasible_warmup_is_pruned_untrained_and_divergence_counts(tmp_path, glue_dir):
    trained = []

    def diverge_at_rank_2(cfg, overwrite=False, on_epoch_end=None):
        trained.append(cfg.method_settings.warmup_steps)
        if cfg.rank == 2:
            raise NonFiniteError("the loss became NaN at step 3")
        return fake_train(cfg, overwrite, on_epoch_end)

    space = {**TINY_SPACE, "fw_warmup_steps": {"type": "categorical", "choices": [2, 4], "methods": ["fwlora"]}}
    cfg = make_config(tmp_path, glue_dir, methods=["fwlora"], trials=6, space=space)
    sweep.run_sweep(cfg, train_fn=diverge_at_rank_2)
    trials = load(cfg, "fwlora").trials
    assert len(trials) == 6 and 4 not in trained  # K = 4 = the run's 4 steps: never trained
    for t in trials:
        if t.params["fw_warmup_steps"] == 4:
            assert t.state == TrialState.PRUNED and "never start" in t.user_attrs["infeasible"]
        elif t.params["rank"] == 2:
            assert t.state == TrialState.FAIL and t.user_attrs["counts"] and "diverged" in t.user_attrs["fail_reason"]
        else:
            assert t.state == TrialState.COMPLETE
    assert {t.state for t in trials} == {TrialState.PRUNED, TrialState.FAIL, TrialState.COMPLETE}
    # the sweep's count of optimizer steps agrees with train.setup's refusal
    late = TrainConfig.from_dict({**SLICE, "data_dir": str(glue_dir), "method": "fwlora", "rank": 1,
                                  "fw_warmup_steps": 4})
    n_train = sweep.train_size(late)
    assert sweep.infeasible_reason(late, n_train) and not sweep.infeasible_reason(late.replace(fw_warmup_steps=3), n_train)
    assert not sweep.infeasible_reason(late.replace(allow_late_penalty=True), n_train)  # the method's own rule
    from fwlora.train import setup
    with pytest.raises(UserError, match="fw-warmup-steps = 4 >= the run's 4 optimizer steps"):
        setup(late)


def test_surplus_and_dead_worker_trials_do_not_count(tmp_path, glue_dir):
    cfg = make_config(tmp_path, glue_dir, trials=2)
    runner = sweep.Sweep(cfg, train_fn=fake_train)
    study = runner.open_study("lora")
    # a trial left running by a process of this host that has exited
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = study.ask()
    dead.set_user_attr("worker", {"host": runner.worker["host"], "pid": gone.pid})
    # a worker elsewhere is running trial 1; trial 2 arrives when the total (2) is already taken
    alive = study.ask()
    alive.set_user_attr("worker", {"host": "another-machine", "pid": 1})
    late = study.ask()
    assert not runner._surplus(study, alive) and runner._surplus(study, late)
    assert late.number == 2 and study.trials[2].state == TrialState.FAIL and study.trials[2].user_attrs["surplus"]
    runner._run_study(study, "lora", sweep.train_size(TrainConfig.from_dict({"task": "cola", "data_dir": str(glue_dir),
                                                                             "train_limit": 32})))
    states = [t.state for t in load(cfg).trials]
    assert states == [TrialState.FAIL, TrialState.RUNNING, TrialState.FAIL, TrialState.COMPLETE]
    assert f"process {gone.pid}) is gone" in load(cfg).trials[0].user_attrs["fail_reason"]
    counts = sweep.study_counts(load(cfg))
    assert counts["counted"] == 2 and counts["failed"] == 1 and counts["running"] == 1  # surplus not shown as failed


def test_other_storages_sqlite_and_a_journal_path(tmp_path, glue_dir):
    for storage in (f"sqlite:///{tmp_path / 'sweep.db'}", str(tmp_path / "shared" / "sweep.journal")):
        cfg = make_config(tmp_path, glue_dir, trials=2, storage=storage)
        sweep.run_sweep(cfg, train_fn=fake_train)
        assert [t.state for t in load(cfg).trials] == [TrialState.COMPLETE] * 2
    assert sweep.open_storage(f"sqlite:///{tmp_path / 'sweep.db'}", tmp_path).storage.get_heartbeat_interval() == 60
    assert (tmp_path / "shared" / "sweep.journal").is_file() and not (tmp_path / "out" / sweep.JOURNAL_FILE).exists()
    with pytest.raises(UserError, match="--storage") as info:
        sweep.open_storage("postgresql://user:secret@localhost:1/db", tmp_path)
    assert "secret" not in str(info.value) and "user:***@localhost" in str(info.value)
    assert sweep.storage.redact("postgresql://user@host/db") == "postgresql://user@host/db"
    # a bare postgresql:// (or postgres://) gets whichever driver is installed, not SQLAlchemy's choice
    url = sweep.storage.with_postgres_driver("postgres://user@host/db")
    assert url.split("://")[1] == "user@host/db" and url.split("://")[0] in ("postgresql", "postgresql+psycopg",
                                                                            "postgresql+psycopg2")
    assert sweep.storage.with_postgres_driver("mysql+pymysql://u@h/db") == "mysql+pymysql://u@h/db"


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the test's own ask() outside Study.optimize
def test_a_silent_trial_is_failed_by_heartbeat_and_replaced_by_a_waiting_worker(tmp_path, glue_dir):
    """SQLite keeps heartbeats: a trial another machine took and then stopped beating for is failed with
    its reason, and a worker that has taken its share waits for it and runs the replacement."""
    cfg = make_config(tmp_path, glue_dir, trials=2, storage=f"sqlite:///{tmp_path / 'hb.db'}",
                      heartbeat_seconds=1, grace_seconds=2)
    runner = sweep.Sweep(cfg, train_fn=fake_train)
    study = runner.open_study("lora")
    lost = study.ask()  # taken by a machine that then died: one heartbeat, then silence
    lost.set_user_attr("worker", {"host": "another-machine", "pid": 1})
    runner.store.storage.record_heartbeat(lost._trial_id)
    assert sweep.fail_stale_trials(study) == []  # still within its grace period
    started = time.monotonic()
    sweep.run_sweep(cfg, train_fn=fake_train)
    trials = load(cfg).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert "no heartbeat for over 2 s" in trials[0].user_attrs["fail_reason"]
    assert time.monotonic() - started >= 2  # it waited out the grace period rather than leave a study short
    counts = sweep.study_counts(load(cfg))
    assert counts["complete"] == counts["counted"] == 2 and counts["failed"] == 1 and counts["running"] == 0


def test_a_study_refuses_other_settings(tmp_path, glue_dir):
    cfg = make_config(tmp_path, glue_dir, trials=1)
    sweep.run_sweep(cfg, train_fn=fake_train)
    cfg.settings["epochs"] = 3
    with pytest.raises(UserError, match="epochs: 2 -> 3"):
        sweep.run_sweep(cfg, train_fn=fake_train)
    cfg.settings["epochs"] = 2
    cfg.seeds_per_trial = 2
    with pytest.raises(UserError, match="seeds"):
        sweep.run_sweep(cfg, train_fn=fake_train)


def test_a_release_1_study_continues_where_its_settings_still_hold(tmp_path):
    """The committed release-1 journal (results/sweep-cpu) recorded every method's settings in every study.
    Its LoRA and AdaLoRA studies continue under this release; FW-LoRA's is refused, naming the one thing
    that changed for it: the default statistic (release 1: exact, every warm-up step)."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copyfile(REPO / "results" / "sweep-cpu" / "optuna.journal", out / sweep.JOURNAL_FILE)
    recorded = json.loads((REPO / "results" / "sweep-cpu" / "sweep.json").read_text())
    cfg = sweep.SweepConfig(methods=["lora", "adalora", "fwlora"], settings=recorded["settings"], trials=6,
                            space=sweep.load_space(REPO / "examples" / "sweep_space_cpu.yaml"), output_dir=str(out))
    runner = sweep.Sweep(cfg, train_fn=fake_train)
    for method in ("lora", "adalora"):
        assert len(runner.open_study(method).trials) == 6
    with pytest.raises(UserError) as refused:
        runner.open_study("fwlora")
    assert str(refused.value).count("settings.") == 2
    assert "fw_estimator: 'exact' -> 'sketch'" in str(refused.value) and "fw_measure_every: 1 -> None" in str(refused.value)
    cfg.settings.update(fw_estimator="exact", fw_measure_every=1)  # release 1's statistic, asked for: continues
    assert len(runner.open_study("fwlora").trials) == 6


def test_seeds_per_trial_average_and_step_numbering(tmp_path, glue_dir):
    cfg = make_config(tmp_path, glue_dir, trials=1, seeds_per_trial=2, objective="best")
    sweep.run_sweep(cfg, train_fn=fake_train)
    trial = load(cfg).trials[0]
    runs = trial.user_attrs["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    assert [Path(r["run_dir"]).name for r in runs] == ["trial0-seed0", "trial0-seed1"]
    assert trial.value == pytest.approx((runs[0]["best"] + runs[1]["best"]) / 2)
    assert sorted(trial.intermediate_values) == [1, 2, 3, 4]  # seed i, epoch e -> step i * epochs + e


# ---- real training on a slice of CoLA ---------------------------------------------------------------


class PruneOddTrials(optuna.pruners.BasePruner):
    """Prunes every odd-numbered trial at its first report: deterministic, to see the wiring."""

    def prune(self, study, trial) -> bool:
        return trial.number % 2 == 1


def test_real_sweep_prunes_and_exports_configs_train_and_bench_accept(tmp_path, glue_dir):
    cfg = make_config(tmp_path, glue_dir, methods=["fwlora"], trials=3)
    outcome = sweep.run_sweep(cfg, pruner=PruneOddTrials())
    study = outcome["studies"]["fwlora"]
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]
    assert list(trials[1].intermediate_values) == [1] and "after epoch 1" in trials[1].user_attrs["pruned_reason"]
    assert list(trials[0].intermediate_values) == [1, 2]
    out = Path(cfg.output_dir)
    pruned = out / "cola-fwlora" / "trial1"
    assert read_json(pruned / "result.json")["status"] == "pruned" and not (pruned / "checkpoint").exists()
    record = records.read_result(pruned)
    assert record.status == Status.PRUNED and "after epoch 1" in record.reason and [e["epoch"] for e in record.epochs] == [1]
    assert records.run_status(pruned) == Status.PRUNED and record.config["fw_warmup_steps"] == trials[1].params["fw_warmup_steps"]
    result = read_json(out / "cola-fwlora" / "trial0" / "result.json")
    assert result["status"] == "complete" and trials[0].value == result["final"]["mcc"]
    assert records.read_result(out / "cola-fwlora" / "trial0").metric_value("final") == trials[0].value

    best = read_json(out / "best_params.json")["fwlora"]
    assert best["value"] == study.best_value and best["params"] == study.best_params
    assert best["trials"]["complete"] == 2 and best["trials"]["pruned"] == 1
    # the exported configuration: every TrainConfig key, accepted by TrainConfig and by `fwlora train --config`
    exported = load_config_file(out / "best_fwlora.yaml")
    assert set(exported) == set(TrainConfig.from_dict({"method": "fwlora"}).to_dict())
    restored = TrainConfig.from_dict(exported)
    assert restored.lr == study.best_params["lr"] and restored.rank == study.best_params["rank"]
    assert restored.method_settings.warmup_steps == study.best_params["fw_warmup_steps"]
    assert restored.method == "fwlora"
    args = build_parser().parse_args(["train", "--config", str(out / "best_fwlora.yaml"), "--seed", "1"])
    assert TrainConfig.from_dict(collect_train_settings(args)) == restored.replace(seed=1)
    # the bench preset: tuned settings per method, the sweep's slice shared
    preset = bench.load_preset(str(out / "tuned_preset.yaml"))
    cells = bench.plan(preset, tmp_path / "bench", {}, {})
    assert {c.method for c in cells} == {"fwlora"} and {c.seed for c in cells} == {0, 1, 2}
    assert all(c.config.lr == restored.lr and c.config.train_limit == 32 and c.config.rank == restored.rank
               for c in cells)
    importance = read_json(out / "importance.json")["fwlora"]
    assert "importances" in importance or "note" in importance
    assert (out / "plots" / "cola-fwlora-history.png").stat().st_size > 0
    assert (out / "plots" / "cola-fwlora-parallel.png").stat().st_size > 0
    summary = (out / "sweep_summary.md").read_text()
    assert "| fwlora |" in summary and f"{study.best_value:.4f}" in summary


def test_real_cli_resume_continues_to_the_new_total(tmp_path, glue_dir, capsys):
    argv = ["sweep", "--method", "lora", "--space", str(write_space(tmp_path)), "--output-dir", str(tmp_path / "out"),
            *slice_flags(glue_dir)]
    assert main([*argv, "--trials", "2"]) == 0
    cfg = make_config(tmp_path, glue_dir, trials=3)
    first = snapshot(load(cfg))
    assert len(first) == 2 and all(t[1] == TrialState.COMPLETE for t in first)
    assert main([*argv, "--trials", "3"]) == 0
    again = snapshot(load(cfg))
    assert len(again) == 3 and again[:2] == first
    assert "| lora |" in capsys.readouterr().out
    assert read_json(tmp_path / "out" / "best_params.json")["lora"]["trials"]["complete"] == 3
    assert main([*argv, "--trials", "3", "--epochs", "1"]) == 2  # other settings: refused, nothing mixed in
    assert len(load(cfg).trials) == 3


def test_real_two_workers_share_one_total(tmp_path, glue_dir):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fwlora", "sweep", "--method", "lora", "--trials", "4",
               "--space", str(write_space(tmp_path)), "--output-dir", str(out), *slice_flags(glue_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    workers = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=240)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    trials = load(make_config(tmp_path, glue_dir)).trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]  # no surplus trial: the file lock serialises taking
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert {t.user_attrs["worker"]["pid"] for t in trials} <= {w.pid for w in workers}
    dirs = sorted(p.name for p in (out / "cola-lora").iterdir())
    assert dirs == [f"trial{n}" for n in range(4)]
    assert all(read_json(out / "cola-lora" / d / "result.json")["status"] == "complete" for d in dirs)


def test_real_sigint_fails_the_running_trial_and_exits_130(tmp_path, glue_dir):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fwlora", "sweep", "--method", "lora", "--trials", "2",
               "--space", str(write_space(tmp_path)), "--output-dir", str(out), *slice_flags(glue_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    worker = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = out / "cola-lora" / "trial0" / "config.json"
    deadline = time.monotonic() + 120
    while not started.is_file() and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    worker.send_signal(signal.SIGINT)
    output = worker.communicate(timeout=120)[0]
    assert worker.returncode == 130, output
    trials = load(make_config(tmp_path, glue_dir)).trials
    assert [(t.state, t.user_attrs.get("fail_reason")) for t in trials] == [(TrialState.FAIL, "interrupted")]
    assert "run the same command again" in output
