"""The trial runner: one process takes trials from each method's study until --trials are used up,
builds each trial's TrainConfig, trains it (or prunes it untrained when the method refuses the run),
reports per-epoch values to the pruner and records the outcome in the study and the run directory.

Several processes (workers) may run the same sweep: taking a trial is atomic under a file lock where
the storage is a local file; on a server a worker that lost a race closes its surplus trial at once.
A worker with nothing left to take waits while trials it can watch are still running (any trial on a
database with heartbeats; a live process of this host on a local file), so that it replaces one whose
worker dies; the last worker to finish writes complete outputs.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import statistics
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from fwlora import methods, records, tasks
from fwlora.claims import pid_alive
from fwlora.config import TrainConfig
from fwlora.errors import FWLoRAError, NonFiniteError, TrainingInterrupted, UserError
from fwlora.plan import build_method, plan_without_training
from fwlora.records import RunRecord, Status
from fwlora.sweep.config import (OBJECTIVES, STUDY_ATTR, SweepConfig, counts_toward_total, describe_diff,
                                 identity_differences)
from fwlora.sweep.export import export
from fwlora.sweep.space import format_params
from fwlora.sweep.storage import beat, fail_stale_trials, file_lock, heartbeat, open_storage
from fwlora.train import train

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

# train(cfg, overwrite=..., on_epoch_end=...) -> RunRecord; raises NonFiniteError when the run diverges
TrainFn = Callable[..., RunRecord]


def train_size(cfg: TrainConfig) -> int:
    """Training examples a run of these settings sees (its --train-limit applied)."""
    train_examples, _, _ = tasks.task_for(cfg).load(cfg.data_dir)
    return len(tasks.subset(train_examples, cfg.train_limit))


def infeasible_reason(cfg: TrainConfig, n_train: int) -> str | None:
    """Why the run's method would refuse this run before training (its own Method.check), or None.

    The run's plan comes from plan.py, as train's does; the sweep loads a model for it only when a budget in %
    decides the rank."""
    plan = plan_without_training(cfg, tasks.task_for(cfg), n_train)
    try:
        build_method(cfg, plan).check()
    except FWLoRAError as e:  # UserError and the method's own setting errors
        return f"{e} (batch_size {cfg.batch_size}, {cfg.epochs} epochs of {n_train} examples: {plan.total_steps} steps)"
    return None


class Sweep:
    """Runs the studies of a SweepConfig in one process; several processes may run the same one."""

    def __init__(self, cfg: SweepConfig, train_fn: TrainFn | None = None, pruner: Any = None):
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.train_fn = train_fn
        self.pruner_override = pruner
        self.store = open_storage(cfg.storage, self.output_dir, cfg.heartbeat_seconds, cfg.grace_seconds)
        self.worker = {"host": socket.gethostname(), "pid": os.getpid()}
        task = tasks.task_for(cfg.base_config())
        self.metric = task.metric
        self.direction = "maximize" if task.higher_is_better else "minimize"

    # -- before anything runs --

    def preflight(self) -> int:
        """Check the fixed settings, every bound of the space and the data; return the training set size."""
        for method in self.cfg.methods:
            TrainConfig.from_dict(self.cfg.trial_settings(method, {}), source=f"sweep settings ({method})")
            for p in self.cfg.space_for(method).values():
                for value in p.extremes():
                    try:
                        TrainConfig.from_dict(self.cfg.trial_settings(method, {p.name: value}))
                    except FWLoRAError as e:
                        raise UserError(f"search space: {p.name} = {value!r} is not a valid setting "
                                        f"for {method}: {e}") from None
        n_train = train_size(self.cfg.base_config())
        for method in self.cfg.methods:
            self._warn_infeasible(method, n_train)
        return n_train

    def _warn_infeasible(self, method: str, n_train: int) -> None:
        """Say up front which of the method's own values its check refuses in the shortest runs."""
        space = self.cfg.space_for(method)
        shortest = {}
        if "batch_size" in space:
            shortest["batch_size"] = max(space["batch_size"].extremes())
        if "epochs" in space:
            shortest["epochs"] = min(space["epochs"].extremes())
        base = self.cfg.trial_settings(method, shortest)
        refused, example = [], None
        variants = [(p.name, v) for p in space.values() if methods.owner_of(p.name) == method for v in p.extremes()]
        for name, value in variants or [(None, None)]:
            try:
                cfg = TrainConfig.from_dict(base if name is None else {**base, name: value})
            except FWLoRAError:
                continue
            reason = infeasible_reason(cfg, n_train)
            if reason:
                refused.append("its fixed settings" if name is None else f"{name} = {value}")
                example = example or reason
        if refused:
            log.warning("%s: in the shortest runs the method refuses %s (%s); trials that draw such a combination "
                        "are pruned before training (reason in the trial's 'infeasible' attribute)",
                        method, ", ".join(refused), example)

    # -- studies --

    def _pruner(self) -> Any:
        import optuna

        if self.pruner_override is not None:
            return self.pruner_override
        if self.cfg.pruner == "none":
            return optuna.pruners.NopPruner()
        # steps of the first seed are epoch numbers: the earliest prune is after epoch prune_from_epoch
        return optuna.pruners.MedianPruner(n_startup_trials=self.cfg.prune_startup_trials,
                                           n_warmup_steps=self.cfg.prune_from_epoch)

    def _sampler(self, trial_number: int) -> Any:
        """TPE seeded from (sampler seed, trial number): a resumed study draws what an unbroken one would."""
        import numpy as np
        import optuna

        seed = int(np.random.SeedSequence([self.cfg.sampler_seed, trial_number]).generate_state(1)[0])
        return optuna.samplers.TPESampler(seed=seed)

    def open_study(self, method: str) -> "optuna.Study":
        import optuna

        name = self.cfg.study_name(method)
        with file_lock(self.store.lock_path):
            study = optuna.create_study(study_name=name, storage=self.store.storage, direction=self.direction,
                                        load_if_exists=True, sampler=self._sampler(0), pruner=self._pruner())
            wanted = self.cfg.identity(method)
            have = study.user_attrs.get(STUDY_ATTR)
            if have is None:
                study.set_user_attr(STUDY_ATTR, wanted)
            elif identity_differences(have, wanted, method):
                raise UserError(f"study {name} in {self.store.description} was made with other settings "
                                f"({describe_diff(have, wanted, method)}); use another --study-name or "
                                "--output-dir, or the original settings")
        return study

    def run(self) -> dict[str, "optuna.Study"]:
        """Run every method's study to --trials, then wait for the trials other workers still run (where
        their death can be seen) and replace those that fail; return {method: study}."""
        from optuna.trial import TrialState

        n_train = self.preflight()
        studies = {method: self.open_study(method) for method in self.cfg.methods}
        announced: set[tuple[str, int]] = set()
        while True:
            watched = []
            for method, study in studies.items():
                self._run_study(study, method, n_train)
                if self.cfg.trials:  # --trials 0 only writes the outputs
                    watched += [(study.study_name, t) for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                                if self._watchable(t)]
            if not watched:
                return studies
            new = [(name, t) for name, t in watched if (name, t.number) not in announced]
            if new:
                log.info("waiting for trial(s) of other workers: %s (a trial whose worker dies is failed and "
                         "replaced here)", ", ".join(f"{n} #{t.number}" for n, t in new))
                announced |= {(n, t.number) for n, t in new}
            time.sleep(min(self.store.heartbeat_interval or 5, 10))

    def _watchable(self, trial: "optuna.trial.FrozenTrial") -> bool:
        """A running trial of another worker whose death this worker would notice."""
        if self.store.heartbeat_interval:
            return True
        worker = trial.user_attrs.get("worker") or {}
        return (self.store.local and worker.get("host") == self.worker["host"]
                and worker.get("pid") not in (None, os.getpid()) and pid_alive(worker["pid"]))

    def _run_study(self, study: "optuna.Study", method: str, n_train: int) -> None:
        started = 0
        while True:
            with file_lock(self.store.lock_path):
                fail_stale_trials(study)
                self._fail_dead_local_trials(study)
                trials = study.get_trials(deepcopy=False)
                counted = sum(counts_toward_total(t) for t in trials)
                if counted >= self.cfg.trials:
                    break
                study.sampler = self._sampler(len(trials))  # len(trials) is the number ask() will give
                with warnings.catch_warnings():  # "heartbeat ... with Study.optimize": heartbeat() beats for ask/tell
                    warnings.filterwarnings("ignore", message="Heartbeat of storage")
                    trial = study.ask()
                beat(self.store.storage, trial)
                trial.set_user_attr("worker", self.worker)
            if self._surplus(study, trial):
                break
            started += 1
            self._run_trial(study, trial, method, n_train)
        log.log(logging.INFO if started else logging.DEBUG, "%s: --trials %d reached; this process ran %d of them",
                study.study_name, self.cfg.trials, started)

    def _fail_dead_local_trials(self, study: "optuna.Study") -> None:
        """Trials left RUNNING by a process of this host that no longer exists (local file storages only:
        on a server the heartbeat decides, which also holds across containers that share a host name)."""
        import optuna
        from optuna.trial import TrialState

        if not self.store.local:
            return
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = t.user_attrs.get("worker") or {}
            if worker.get("host") == self.worker["host"] and worker.get("pid") not in (None, os.getpid()) \
                    and not pid_alive(worker["pid"]):
                log.warning("%s: trial %d was left running by process %d, which is gone: marking it failed "
                            "(another trial replaces it)", study.study_name, t.number, worker["pid"])
                try:
                    study._storage.set_trial_user_attr(t._trial_id, "fail_reason",
                                                       f"its worker (process {worker['pid']}) is gone; replaced")
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue
                study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)

    def _surplus(self, study: "optuna.Study", trial: "optuna.Trial") -> bool:
        """Without a shared lock two workers may both take the last slot: the later trial number yields."""
        from optuna.trial import TrialState

        earlier = sum(counts_toward_total(t) for t in study.get_trials(deepcopy=False) if t.number < trial.number)
        if earlier < self.cfg.trials:
            return False
        trial.set_user_attr("surplus", True)
        study.tell(trial, state=TrialState.FAIL)
        log.info("%s: trial %d is beyond --trials %d (another worker took the last one): closed unused",
                 study.study_name, trial.number, self.cfg.trials)
        return True

    # -- one trial --

    def _run_trial(self, study: "optuna.Study", trial: "optuna.Trial", method: str, n_train: int) -> None:
        import optuna
        from optuna.trial import TrialState

        try:
            with heartbeat(self.store.storage, trial):
                value = self._evaluate(study, trial, method, n_train)
        except optuna.TrialPruned as e:
            trial.set_user_attr("pruned_reason", str(e) or "pruned")
            study.tell(trial, state=TrialState.PRUNED)
            log.info("%s: trial %d pruned: %s", study.study_name, trial.number, e)
            return
        except NonFiniteError as e:  # an outcome of these parameters (too high a learning rate, say)
            trial.set_user_attr("fail_reason", f"diverged: {e}")
            trial.set_user_attr("counts", True)
            study.tell(trial, state=TrialState.FAIL)
            log.warning("%s: trial %d diverged (recorded as failed; the sweep goes on): %s", study.study_name,
                        trial.number, e)
            return
        except BaseException as e:  # interrupted, a mistake to fix, a bug: close the trial, then stop
            interrupted = isinstance(e, (TrainingInterrupted, KeyboardInterrupt))
            try:
                trial.set_user_attr("fail_reason", "interrupted" if interrupted else f"{type(e).__name__}: {e}")
                study.tell(trial, state=TrialState.FAIL)
            except Exception as tell_error:  # keep the original exception; the trial is cleaned up on restart
                log.error("%s: could not record trial %d as failed: %s", study.study_name, trial.number, tell_error)
            raise
        study.tell(trial, value)
        log.info("%s: trial %d complete: %s %.4f", study.study_name, trial.number, self.cfg.objective, value)

    def run_dir(self, study_name: str, trial_number: int, seed: int) -> Path:
        suffix = f"-seed{seed}" if self.cfg.seeds_per_trial > 1 else ""
        return self.output_dir / study_name / f"trial{trial_number}{suffix}"

    def _evaluate(self, study: "optuna.Study", trial: "optuna.Trial", method: str, n_train: int) -> float:
        import optuna

        params = {name: p.suggest(trial) for name, p in self.cfg.space_for(method).items()}
        log.info("%s: trial %d: %s", study.study_name, trial.number, format_params(params))
        seeds = self.cfg.seeds
        try:
            first = TrainConfig.from_dict({**self.cfg.trial_settings(method, params), "seed": seeds[0]},
                                          source=f"trial {trial.number}")
        except FWLoRAError as e:  # a combination of otherwise valid values (batch_size vs grad_accum, say)
            trial.set_user_attr("infeasible", str(e))
            raise optuna.TrialPruned(f"infeasible: {e}") from None
        reason = infeasible_reason(first, n_train)
        if reason:
            trial.set_user_attr("infeasible", reason)
            raise optuna.TrialPruned(f"infeasible: {reason}")
        metric, better = self.metric, (max if self.direction == "maximize" else min)
        train_fn = self.train_fn
        if train_fn is None:
            train_fn = train
        runs: list[dict[str, Any]] = []
        for i, seed in enumerate(seeds):
            cfg = first.replace(seed=seed, output_dir=str(self.run_dir(study.study_name, trial.number, seed)))
            history: list[dict] = []
            last_run = i == len(seeds) - 1

            def on_epoch_end(entry: dict, i: int = i, seed: int = seed, history: list = history,
                             last_run: bool = last_run) -> None:
                history.append(entry)
                values = [h[metric] for h in history]
                value = values[-1] if self.cfg.objective == "final" else better(values)
                trial.report(value, i * first.epochs + entry["epoch"])
                if not (last_run and entry["epoch"] == first.epochs) and trial.should_prune():
                    raise optuna.TrialPruned(f"by {type(study.pruner).__name__} after epoch {entry['epoch']} "
                                             f"of seed {seed}: {metric} {value:.4f}")

            run_dir = Path(cfg.output_dir)
            overwrite = run_dir.is_dir() and any(run_dir.iterdir())
            if overwrite:  # trial numbers are never reused in a study: this is left from a deleted one
                log.warning("replacing %s, left by an earlier study of the same name", run_dir)
            try:
                record = train_fn(cfg, overwrite=overwrite, on_epoch_end=on_epoch_end)
            except optuna.TrialPruned as e:
                close_pruned_run(run_dir, cfg, metric, history, str(e))
                raise
            runs.append({"seed": seed, **{kind: _metric(record, kind, run_dir) for kind in OBJECTIVES},
                         "train_seconds": record.train_seconds, "run_dir": str(run_dir)})
            trial.set_user_attr("runs", runs)
        trial.set_user_attr("metric", metric)
        for kind in OBJECTIVES:
            trial.set_user_attr(kind, statistics.fmean(r[kind] for r in runs))
        return statistics.fmean(r[self.cfg.objective] for r in runs)


def _metric(record: RunRecord, which: str, run_dir: Path) -> float:
    value = record.metric_value(which)
    if value is None:  # train returns complete records only: this is a bug, not an outcome of the parameters
        raise ValueError(f"the record of {run_dir} ({record.status}) has no {which} {record.metric}")
    return value


def close_pruned_run(run_dir: Path, cfg: TrainConfig, metric: str, history: list[dict], reason: str) -> None:
    """A pruned run is never resumed: say so in its result.json and drop its checkpoints."""
    if not run_dir.is_dir():
        return
    records.write_result(run_dir, RunRecord(status=Status.PRUNED, task=cfg.task, method=cfg.method, seed=cfg.seed,
                                            config=cfg.to_dict(), metric=metric, epochs=list(history), reason=reason))
    for path in run_dir.glob(records.CHECKPOINT_DIR + "*"):  # checkpoint/ and its .old / .tmp siblings
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def run_sweep(cfg: SweepConfig, train_fn: TrainFn | None = None, pruner: Any = None) -> dict[str, Any]:
    """Run (or continue) every study, then write the outputs; returns export()'s summary plus the studies."""
    sweep = Sweep(cfg, train_fn=train_fn, pruner=pruner)
    studies = sweep.run()
    outputs = export(cfg, studies, sweep.store.description)
    return {**outputs, "studies": studies}
