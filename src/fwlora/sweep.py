"""`fwlora sweep`: a hyper-parameter search with Optuna around `train`, resumable and shareable.

One Optuna study per method, named "<task>-<method>" (or "<prefix>-<task>-<method>" with
--study-name PREFIX); every method gets the same number of trials (--trials, a TOTAL per study, not
per process). A trial trains --seeds-per-trial runs (seeds S, S+1, ... from --seed S, the same for
every trial) into <output-dir>/<study>/trial<number>[-seed<k>]/ and its value is the mean of their
validation metric (MCC for CoLA, accuracy otherwise) at the final epoch (--objective final, the
default: what a fixed-epoch protocol reports; --objective best takes each run's best epoch, which
picks the maximum on the very dev set it reports, an optimistic number).

Search space: METHOD.md's ranges by default (DEFAULT_SPACE); --space FILE (YAML/JSON) replaces
entries key by key, `key: null` drops one. A training flag given on the command line fixes that
setting and takes it out of the space (--budget or --rank fixes the rank). Combinations that cannot
run, such as fw_warmup_steps >= the run's optimizer steps (FW-LoRA's penalty would never start;
with CoLA, 3 epochs and batch 64 that is K = 500 and 800), are not clamped, which would record a
parameter that was never used: the trial is PRUNED before training, its reason in the trial's user
attribute "infeasible", and TPE learns to avoid the region. It counts as one of the --trials.

Pruning: after each epoch the trial reports its metric (for seed i, epoch e, at step i*epochs + e;
the seeds are the same in every trial, so the steps compare like with like) and a MedianPruner
(--prune-startup-trials, --prune-from-epoch) may stop it: state PRUNED, its run directory's
result.json says "pruned".

Outcomes: a run that diverges (NaN) is a FAIL that counts (the parameters were tried; the reason is in
"fail_reason"); a mistake the user must fix (missing data, a bad setting) stops the sweep; SIGINT or
SIGTERM marks the running trial FAIL ("interrupted", not counted) and exits with 130/143.

Storage and workers:
  * default: <output-dir>/optuna.journal, Optuna's JournalStorage with JournalFileBackend: an
    append-only log with a file lock, safe for several processes on one machine. --storage PATH
    (no "://") puts that journal elsewhere.
  * --storage sqlite:///sweep.db works, but SQLite serialises writers and may report "database is
    locked" under contention: fine for one or two workers, not for many.
  * --storage postgresql://user:pw@host/db or mysql+pymysql://... (a server, its driver installed):
    several machines share the study. Each runs the same command; heartbeats (every 60 s) let a
    worker mark the trial of a machine that died as FAIL after 5 minutes, and another trial replaces it.
  * --storage redis://host:6379 (the `redis` package): a journal kept in Redis, also multi-machine,
    but without heartbeats: the running trial of a machine that died is failed only when a worker
    starts again on that machine (same host name).
Start as many workers as you like with the same command; they share the total. Before taking a
trial a worker counts the trials that are complete, pruned, counted failures or running; when the
count reaches --trials it stops. On one machine a file lock makes count-and-take atomic; on a server
a worker that lost a race sees it from the trial numbers and closes its surplus trial at once as FAIL
(user attribute "surplus"), so no study exceeds --trials and no trial runs twice. Trials left RUNNING
by a killed process of this host (SIGKILL, or SIGTERM outside a run's training loop) are marked FAIL
on the next start and replaced.

Resume: run the same command again; it continues each study (load_if_exists) until --trials.
--trials 0 only (re)writes the outputs. The sampler is TPE, re-seeded for every trial from
(--sampler-seed, trial number), so one worker resumed any number of times samples the same
parameters as one run straight through (with several workers the order of completions varies, so
the draws after TPE's random start-up do too). Seeds depend on the trial number only, so during the
start-up trial n of every method's study draws the same values of the shared parameters (lr, rank,
batch_size): a paired comparison of the methods. A study remembers its settings, space, seeds and objective
and refuses a command that would mix in different ones.

Outputs in <output-dir>, written by each worker when it finishes (the last one has them all):
best_params.json, importance.json, plots/<study>-history.png and -parallel.png, best_<method>.yaml
(full settings for `fwlora train --config`), tuned_preset.yaml (a `fwlora bench` preset),
sweep_summary.md (best of N per method, side by side) and sweep.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import socket
import statistics
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import yaml

from fwlora.config import METHODS, TrainConfig, config_fields, load_config_file
from fwlora.errors import NonFiniteError, TrainingInterrupted, UserError
from fwlora.files import write_json, write_text_atomic

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

JOURNAL_FILE = "optuna.journal"
OBJECTIVES = ("final", "best")
PRUNERS = ("median", "none")
PARAM_TYPES = ("float", "int", "categorical")
ENTRY_KEYS = {"type", "low", "high", "log", "step", "choices", "methods"}
# settings that name the run or that the sweep sets itself: never searched
NOT_SEARCHABLE = ("task", "method", "seed", "output_dir") + TrainConfig.NON_IDENTITY
# settings decided per run in a bench grid, not per method
PER_CELL = ("task", "method", "seed", "output_dir", "rank", "budget")
HEARTBEAT_SECONDS, GRACE_SECONDS = 60, 300
STUDY_ATTR = "fwlora_sweep"

# METHOD.md's search ranges
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "lr": {"type": "float", "low": 1e-4, "high": 3e-4, "log": True},
    "lambda_fw": {"type": "float", "low": 5e-5, "high": 5e-4, "log": True, "methods": ["fwlora"]},
    "rank": {"type": "categorical", "choices": [4, 8, 16]},
    "fw_warmup_steps": {"type": "categorical", "choices": [300, 500, 800], "methods": ["fwlora"]},
    "batch_size": {"type": "categorical", "choices": [16, 32, 64]},
}


# ---- the search space ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One searched TrainConfig setting."""

    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()
    methods: tuple[str, ...] | None = None  # None: every method

    def applies_to(self, method: str) -> bool:
        return self.methods is None or method in self.methods

    def suggest(self, trial: "optuna.Trial") -> Any:
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.name, list(self.choices))

    def extremes(self) -> list:
        """The values that bound what a trial may draw (checked against TrainConfig before any trial)."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        if self.type == "categorical":
            out["choices"] = list(self.choices)
        else:
            out.update(low=self.low, high=self.high, log=self.log)
            if self.step is not None:
                out["step"] = self.step
        if self.methods is not None:
            out["methods"] = list(self.methods)
        return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _yaml_number(value: Any) -> Any:
    """YAML 1.1 reads 1e-4 (no dot) as a string: take it as the number it was meant to be."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value


def parse_param(name: str, entry: Any, source: str) -> Param:
    """One space entry, checked so that a typo fails before the first trial, not in the twentieth."""
    kinds = {f.name: str(f.type) for f in config_fields()}
    where = f"{source}: {name}"
    if name not in kinds:
        raise UserError(f"{where}: not a training setting; known: {', '.join(sorted(kinds))}")
    if name in NOT_SEARCHABLE:
        raise UserError(f"{where}: cannot be searched (the sweep sets it: use --methods, --seed, "
                        "--seeds-per-trial, --output-dir)")
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected a mapping like {{type: float, low: 1e-4, high: 3e-4, log: true}}, "
                        f"got {entry!r}")
    unknown = set(entry) - ENTRY_KEYS
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; use {', '.join(sorted(ENTRY_KEYS))}")
    kind = entry.get("type")
    if kind not in PARAM_TYPES:
        raise UserError(f"{where}: type must be one of {', '.join(PARAM_TYPES)}, got {kind!r}")
    methods = entry.get("methods")
    if methods is not None:
        if isinstance(methods, str):
            methods = [methods]
        if not (isinstance(methods, list) and methods and all(m in METHODS for m in methods)):
            raise UserError(f"{where}: methods must be a non-empty list of {', '.join(METHODS)}, got {methods!r}")
        methods = tuple(methods)
    field_kind = kinds[name]
    if kind == "categorical":
        extra = {"low", "high", "log", "step"} & set(entry)
        if extra:
            raise UserError(f"{where}: a categorical entry takes choices, not {', '.join(sorted(extra))}")
        choices = entry.get("choices")
        if isinstance(choices, list) and (field_kind.startswith("float") or field_kind.startswith("int")):
            choices = [_yaml_number(c) for c in choices]
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: choices must be a non-empty list, got {choices!r}")
        if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            raise UserError(f"{where}: choices must be numbers, strings, true/false or null, got {choices!r}")
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise UserError(f"{where}: choices repeat a value: {choices!r}")
        return Param(name, kind, choices=tuple(choices), methods=methods)
    if "choices" in entry:
        raise UserError(f"{where}: choices belong to type categorical (this entry is {kind})")
    if not (field_kind.startswith("int") or field_kind.startswith("float")):
        raise UserError(f"{where}: a {field_kind} setting can only be searched as type categorical")
    if kind == "float" and field_kind.startswith("int"):
        raise UserError(f"{where}: an integer setting: use type int or categorical")
    low, high = _yaml_number(entry.get("low")), _yaml_number(entry.get("high"))
    log_scale, step = entry.get("log", False), _yaml_number(entry.get("step"))
    if not (_is_number(low) and _is_number(high)):
        raise UserError(f"{where}: low and high must be finite numbers, got {low!r} and {high!r}")
    if kind == "int" and not (isinstance(low, int) and isinstance(high, int)):
        raise UserError(f"{where}: type int needs integer low and high, got {low!r} and {high!r}")
    if not low < high:
        raise UserError(f"{where}: low = {low} must be below high = {high} (a fixed value is a flag, not a search)")
    if not isinstance(log_scale, bool):
        raise UserError(f"{where}: log must be true or false, got {log_scale!r}")
    if log_scale and low <= 0:
        raise UserError(f"{where}: a log scale needs low > 0, got {low}")
    if step is not None:
        if not (_is_number(step) and step > 0) or (kind == "int" and not isinstance(step, int)):
            raise UserError(f"{where}: step must be a positive {'integer' if kind == 'int' else 'number'}, got {step!r}")
        if log_scale:
            raise UserError(f"{where}: give log or step, not both (Optuna cannot combine them)")
    if kind == "float":
        low, high = float(low), float(high)
    return Param(name, kind, low=low, high=high, log=log_scale, step=step, methods=methods)


def parse_space(entries: Mapping[str, Any], source: str) -> dict[str, Param]:
    return {name.replace("-", "_"): parse_param(name.replace("-", "_"), entry, source) for name, entry in entries.items()}


def load_space(path: str | os.PathLike | None) -> dict[str, Param]:
    """DEFAULT_SPACE, with the entries of a YAML/JSON file replacing it key by key (`key: null` drops one)."""
    space = parse_space(DEFAULT_SPACE, "default space")
    if path is None:
        return space
    raw = load_config_file(path)  # a mapping with file-named errors; dashes in keys become underscores
    for name, entry in raw.items():
        if entry is None or entry is False:
            space.pop(name, None)
        else:
            space[name] = parse_param(name, entry, f"space file {path}")
    if "rank" in space and "budget" in space:
        raise UserError(f"space file {path}: search rank or budget, not both (budget maps to a rank)")
    return space


# ---- what one sweep is -----------------------------------------------------------------------------


@dataclass
class SweepConfig:
    """Everything `fwlora sweep` was asked to do; validated where it is built."""

    methods: list[str]
    settings: dict[str, Any]  # TrainConfig values shared by every trial (not method, output_dir)
    space: dict[str, Param] = field(default_factory=lambda: parse_space(DEFAULT_SPACE, "default space"))
    trials: int = 20
    output_dir: str = "runs/sweep"
    storage: str | None = None
    seeds_per_trial: int = 1
    sampler_seed: int = 0
    study_prefix: str | None = None
    objective: str = "final"
    pruner: str = "median"
    prune_startup_trials: int = 5
    prune_from_epoch: int = 2

    def __post_init__(self) -> None:
        if not self.methods:
            raise UserError("give at least one method (--method or --methods)")
        for m in self.methods:
            if m not in METHODS:
                raise UserError(f"unknown method {m!r}; use {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise UserError(f"--methods names a method twice: {','.join(self.methods)}")
        for key in ("method", "output_dir"):
            if key in self.settings:
                raise UserError(f"sweep settings may not hold {key} (the sweep sets it per study and trial)")
        if self.trials < 0:
            raise UserError(f"--trials = {self.trials}: must be >= 0 (0 only writes the outputs)")
        if self.seeds_per_trial < 1:
            raise UserError(f"--seeds-per-trial = {self.seeds_per_trial}: must be >= 1")
        if self.objective not in OBJECTIVES:
            raise UserError(f"--objective = {self.objective!r}: use {' or '.join(OBJECTIVES)}")
        if self.pruner not in PRUNERS:
            raise UserError(f"--pruner = {self.pruner!r}: use {' or '.join(PRUNERS)}")
        if self.prune_startup_trials < 0 or self.prune_from_epoch < 1:
            raise UserError("--prune-startup-trials must be >= 0 and --prune-from-epoch >= 1")
        if self.study_prefix is not None and not self.study_prefix.strip():
            raise UserError("--study-name must not be empty")

    @property
    def task(self) -> str:
        return self.settings.get("task", TrainConfig.task)

    @property
    def seeds(self) -> list[int]:
        first = self.settings.get("seed", TrainConfig.seed)
        return [first + i for i in range(self.seeds_per_trial)]

    def study_name(self, method: str) -> str:
        return "-".join(p for p in (self.study_prefix, self.task, method) if p)

    def space_for(self, method: str) -> dict[str, Param]:
        """The method's parameters, those of every method first: the sampler draws them in this order, so
        the random start-up gives trial n of each method's study the same shared values."""
        mine = [(name, p) for name, p in self.space.items() if p.applies_to(method)]
        return dict(sorted(mine, key=lambda item: item[1].methods is not None))

    def trial_settings(self, method: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """The TrainConfig values of one trial (without seed and output_dir)."""
        values = {**self.settings, **params, "method": method}
        if "rank" in params:
            values["budget"] = None
        if "budget" in params:
            values["rank"] = None
        return values

    def identity(self, method: str) -> dict[str, Any]:
        """What a study must agree on to be continued: its fixed settings, space, seeds and objective."""
        base = TrainConfig.from_dict({**self.settings, "method": method}).identity()
        space = self.space_for(method)
        drop = set(space) | {"seed"} | ({"rank", "budget"} if {"rank", "budget"} & set(space) else set())
        ident = {"task": self.task, "method": method, "objective": self.objective, "seeds": self.seeds,
                 "space": {n: p.to_dict() for n, p in space.items()},
                 "settings": {k: v for k, v in base.items() if k not in drop}}
        return json.loads(json.dumps(ident))  # the form the storage gives back (lists, not tuples)


# ---- storage ---------------------------------------------------------------------------------------


@dataclass
class Storage:
    storage: Any  # an optuna BaseStorage
    description: str
    lock_path: Path | None  # a local file lock that makes count-and-take atomic, when there is a local file


def open_storage(url: str | None, output_dir: Path) -> Storage:
    """The default journal file, a journal at a path, an RDB URL (with heartbeats) or Redis."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if not url or "://" not in url:
        path = Path(url) if url else output_dir / JOURNAL_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            storage = JournalStorage(JournalFileBackend(str(path)))
        except OSError as e:
            raise UserError(f"--storage {path}: cannot open the journal file ({e})") from None
        return Storage(storage, f"journal file {path}", path.with_name(path.name + ".sweep.lock"))
    if url.startswith("redis"):
        try:
            from optuna.storages.journal import JournalRedisBackend

            return Storage(JournalStorage(JournalRedisBackend(url)), f"redis journal {url}", None)
        except ImportError:
            raise UserError("--storage redis://...: install the redis package (pip install redis)") from None
    lock_path = None
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        db = Path(url.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        lock_path = db.with_name(db.name + ".sweep.lock")
        engine_kwargs = {"connect_args": {"timeout": 60}}  # wait for a busy writer instead of failing at once
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_SECONDS,
                                                 grace_period=GRACE_SECONDS)
    except (ImportError, ModuleNotFoundError) as e:
        raise UserError(f"--storage {_redact(url)}: the database driver is missing ({e})") from None
    except Exception as e:  # SQLAlchemy's many connection errors: say which URL, without its password
        raise UserError(f"--storage {_redact(url)}: cannot open the database ({type(e).__name__}: {e})") from None
    return Storage(storage, f"database {_redact(url)}", lock_path)


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        cred, host = rest.rsplit("@", 1)
        rest = cred.split(":", 1)[0] + ":***@" + host
    return scheme + sep + rest


@contextlib.contextmanager
def _file_lock(path: Path | None) -> Iterator[None]:
    """Exclusive across processes of this machine; a no-op where there is no local file (or no fcntl)."""
    if path is None:
        yield
        return
    try:
        import fcntl
    except ImportError:  # Windows: the trial-number check after taking a trial still keeps the total
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _heartbeat(storage: Any, trial: "optuna.Trial") -> Iterator[None]:
    """Record the trial's heartbeat while it runs (RDB storage only; see fail_stale_trials)."""
    interval = storage.get_heartbeat_interval() if hasattr(storage, "record_heartbeat") else None
    if not interval:
        yield
        return
    stop = threading.Event()
    trial_id = trial._trial_id  # Optuna's own optimize loop does the same; ask/tell has no public handle

    def beat() -> None:
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception as e:  # a lost connection must not kill the run; the next beat retries
                log.warning("heartbeat of trial %d failed: %s", trial.number, e)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ---- trial bookkeeping -----------------------------------------------------------------------------


def counts_toward_total(trial: "optuna.trial.FrozenTrial") -> bool:
    """Complete, pruned (infeasible included), running or waiting, or failed by diverging: these use up
    one of --trials. Interrupted, crashed, stale and surplus trials do not; another replaces them."""
    from optuna.trial import TrialState

    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING):
        return True
    return trial.state == TrialState.FAIL and bool(trial.user_attrs.get("counts"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def total_steps(n_train: int, cfg: TrainConfig) -> int:
    """Optimizer steps of a run (as train.setup counts them: batch_size is the global batch)."""
    return math.ceil(n_train / cfg.batch_size) * cfg.epochs


def _train_size(task: str, data_dir: str | None, limit: int | None) -> int:
    from fwlora.data import load_task, subset

    train_examples, _, _ = load_task(task, data_dir)
    return len(subset(train_examples, limit))


def late_penalty_reason(cfg: TrainConfig, n_train: int) -> str | None:
    """Why a run cannot start (FW-LoRA's warm-up as long as the run), or None."""
    if cfg.method != "fwlora" or cfg.allow_late_penalty:
        return None
    steps = total_steps(n_train, cfg)
    if cfg.fw_warmup_steps < steps:
        return None
    return (f"fw_warmup_steps = {cfg.fw_warmup_steps} >= the run's {steps} optimizer steps "
            f"(batch_size {cfg.batch_size}, {cfg.epochs} epochs): the FW-LoRA penalty would never start")


# ---- the sweep -------------------------------------------------------------------------------------


TrainFn = Callable[..., dict]


class Sweep:
    """Runs the studies of a SweepConfig in one process; several processes may run the same one."""

    def __init__(self, cfg: SweepConfig, train_fn: TrainFn | None = None, pruner: Any = None):
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.train_fn = train_fn
        self.pruner_override = pruner
        self.store = open_storage(cfg.storage, self.output_dir)
        self.worker = {"host": socket.gethostname(), "pid": os.getpid()}

    # -- before anything runs --

    def preflight(self) -> int:
        """Check the fixed settings, every bound of the space and the data; return the training set size."""
        for method in self.cfg.methods:
            TrainConfig.from_dict(self.cfg.trial_settings(method, {}), source=f"sweep settings ({method})")
            for p in self.cfg.space_for(method).values():
                for value in p.extremes():
                    try:
                        TrainConfig.from_dict(self.cfg.trial_settings(method, {p.name: value}))
                    except UserError as e:
                        raise UserError(f"search space: {p.name} = {value!r} is not a valid setting "
                                        f"for {method}: {e}") from None
        n_train = _train_size(self.cfg.task, self.cfg.settings.get("data_dir"), self.cfg.settings.get("train_limit"))
        if "fwlora" in self.cfg.methods:
            self._warn_late_penalty(n_train)
        return n_train

    def _warn_late_penalty(self, n_train: int) -> None:
        space = self.cfg.space_for("fwlora")
        base = TrainConfig.from_dict(self.cfg.trial_settings("fwlora", {}))
        if base.allow_late_penalty:
            return
        batches = space["batch_size"].extremes() if "batch_size" in space else [base.batch_size]
        epochs = space["epochs"].extremes() if "epochs" in space else [base.epochs]
        warmups = space["fw_warmup_steps"].extremes() if "fw_warmup_steps" in space else [base.fw_warmup_steps]
        fewest = math.ceil(n_train / max(batches)) * min(epochs)
        late = [k for k in warmups if k >= fewest]
        if late:
            log.warning("fwlora: with batch_size %s and %s epochs a run has only %d optimizer steps: "
                        "fw_warmup_steps %s would never start the penalty; trials that draw such a combination "
                        "are pruned before training (reason in the trial's 'infeasible' attribute)",
                        max(batches), min(epochs), fewest, ", ".join(map(str, late)))

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
        with _file_lock(self.store.lock_path):
            study = optuna.create_study(study_name=name, storage=self.store.storage, direction="maximize",
                                        load_if_exists=True, sampler=self._sampler(0), pruner=self._pruner())
            wanted = self.cfg.identity(method)
            have = study.user_attrs.get(STUDY_ATTR)
            if have is None:
                study.set_user_attr(STUDY_ATTR, wanted)
            elif have != wanted:
                raise UserError(f"study {name} in {self.store.description} was made with other settings "
                                f"({_describe_diff(have, wanted)}); use another --study-name or --output-dir, "
                                "or the original settings")
        return study

    def run(self) -> dict[str, "optuna.Study"]:
        """Run every method's study to --trials; return {method: study}."""
        n_train = self.preflight()
        studies = {}
        for method in self.cfg.methods:
            studies[method] = study = self.open_study(method)
            self._run_study(study, method, n_train)
        return studies

    def _run_study(self, study: "optuna.Study", method: str, n_train: int) -> None:
        started = 0
        while True:
            with _file_lock(self.store.lock_path):
                self._fail_stale_trials(study)
                self._fail_dead_local_trials(study)
                trials = study.get_trials(deepcopy=False)
                counted = sum(counts_toward_total(t) for t in trials)
                if counted >= self.cfg.trials:
                    break
                study.sampler = self._sampler(len(trials))  # len(trials) is the number ask() will give
                with warnings.catch_warnings():  # "heartbeat ... with Study.optimize": _heartbeat beats for ask/tell
                    warnings.filterwarnings("ignore", message="Heartbeat of storage")
                    trial = study.ask()
                trial.set_user_attr("worker", self.worker)
            if self._surplus(study, trial):
                break
            started += 1
            self._run_trial(study, trial, method, n_train)
        log.info("%s: --trials %d reached; this process ran %d of them", study.study_name, self.cfg.trials, started)

    def _fail_stale_trials(self, study: "optuna.Study") -> None:
        """Trials whose worker stopped sending heartbeats (RDB storage): FAIL, so they are replaced."""
        import optuna

        if getattr(self.store.storage, "get_heartbeat_interval", lambda: None)():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)

    def _fail_dead_local_trials(self, study: "optuna.Study") -> None:
        """Trials left RUNNING by a process of this host that no longer exists: FAIL, so they are replaced."""
        from optuna.trial import TrialState

        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = t.user_attrs.get("worker") or {}
            if worker.get("host") == self.worker["host"] and worker.get("pid") not in (None, os.getpid()) \
                    and not _pid_alive(worker["pid"]):
                log.warning("%s: trial %d was left running by process %d, which is gone: marking it failed "
                            "(another trial replaces it)", study.study_name, t.number, worker["pid"])
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
            with _heartbeat(self.store.storage, trial):
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

        from fwlora.data import task_spec

        params = {name: p.suggest(trial) for name, p in self.cfg.space_for(method).items()}
        log.info("%s: trial %d: %s", study.study_name, trial.number, _format_params(params))
        seeds = self.cfg.seeds
        try:
            first = TrainConfig.from_dict({**self.cfg.trial_settings(method, params), "seed": seeds[0]},
                                          source=f"trial {trial.number}")
        except UserError as e:  # a combination of otherwise valid values (batch_size vs grad_accum, say)
            trial.set_user_attr("infeasible", str(e))
            raise optuna.TrialPruned(f"infeasible: {e}") from None
        reason = late_penalty_reason(first, n_train)
        if reason:
            trial.set_user_attr("infeasible", reason)
            raise optuna.TrialPruned(f"infeasible: {reason}")
        metric = task_spec(first.task).metric
        train_fn = self.train_fn
        if train_fn is None:
            from fwlora.train import train as train_fn
        runs: list[dict[str, Any]] = []
        for i, seed in enumerate(seeds):
            cfg = first.replace(seed=seed, output_dir=str(self.run_dir(study.study_name, trial.number, seed)))
            history: list[dict] = []
            last_run = i == len(seeds) - 1

            def on_epoch_end(entry: dict, i: int = i, seed: int = seed, history: list = history,
                             last_run: bool = last_run) -> None:
                history.append(entry)
                values = [h[metric] for h in history]
                value = values[-1] if self.cfg.objective == "final" else max(values)
                trial.report(value, i * first.epochs + entry["epoch"])
                if not (last_run and entry["epoch"] == first.epochs) and trial.should_prune():
                    raise optuna.TrialPruned(f"by {type(study.pruner).__name__} after epoch {entry['epoch']} "
                                             f"of seed {seed}: {metric} {value:.4f}")

            run_dir = Path(cfg.output_dir)
            overwrite = run_dir.is_dir() and any(run_dir.iterdir())
            if overwrite:  # trial numbers are never reused in a study: this is left from a deleted one
                log.warning("replacing %s, left by an earlier study of the same name", run_dir)
            try:
                result = train_fn(cfg, overwrite=overwrite, on_epoch_end=on_epoch_end)
            except optuna.TrialPruned as e:
                _close_pruned_run(run_dir, cfg, history, str(e))
                raise
            runs.append({"seed": seed, "final": result["final"][metric], "best": result["best"][metric],
                         "train_seconds": result.get("timing", {}).get("train_seconds"), "run_dir": str(run_dir)})
            trial.set_user_attr("runs", runs)
        trial.set_user_attr("metric", metric)
        for kind in OBJECTIVES:
            trial.set_user_attr(kind, statistics.fmean(r[kind] for r in runs))
        return statistics.fmean(r[self.cfg.objective] for r in runs)


def _close_pruned_run(run_dir: Path, cfg: TrainConfig, history: list[dict], reason: str) -> None:
    """A pruned run is never resumed: say so in its result.json and drop its checkpoint."""
    import shutil

    from fwlora.train import CHECKPOINT_DIR, RESULT_FILE

    if run_dir.is_dir():
        write_json(run_dir / RESULT_FILE, {"status": "pruned", "reason": reason, "epochs": history,
                                           "config": cfg.to_dict()})
        shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)


def _describe_diff(have: dict, wanted: dict, limit: int = 6) -> str:
    diffs = []
    for key in sorted(set(have) | set(wanted)):
        a, b = have.get(key), wanted.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    return ", ".join(diffs[:limit]) + (", ..." if len(diffs) > limit else "")


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _format_params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_format_value(v)}" for k, v in params.items()) or "(no searched parameters)"


# ---- outputs ---------------------------------------------------------------------------------------


def study_counts(study: "optuna.Study") -> dict[str, int]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    by = {s: [t for t in trials if t.state == s] for s in TrialState}
    failed = [t for t in by[TrialState.FAIL] if not t.user_attrs.get("surplus")]
    return {"complete": len(by[TrialState.COMPLETE]), "pruned": len(by[TrialState.PRUNED]),
            "infeasible": sum(1 for t in by[TrialState.PRUNED] if "infeasible" in t.user_attrs),
            "failed": len(failed), "diverged": sum(1 for t in failed if t.user_attrs.get("counts")),
            "running": len(by[TrialState.RUNNING]), "counted": sum(counts_toward_total(t) for t in trials)}


def best_config(cfg: SweepConfig, method: str, trial: "optuna.trial.FrozenTrial") -> dict[str, Any]:
    """Full TrainConfig settings of a trial, as `fwlora train --config` takes them."""
    values = {**cfg.trial_settings(method, trial.params), "seed": cfg.seeds[0],
              "output_dir": f"runs/{cfg.study_name(method)}-best"}
    return TrainConfig.from_dict(values, source=f"best trial {trial.number} of {cfg.study_name(method)}").to_dict()


def param_importances(study: "optuna.Study") -> dict[str, Any]:
    """Optuna's importances, or a note saying why there are none; its caveats (few trials) kept."""
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return {"note": f"needs at least 2 complete trials, the study has {len(complete)}"}
    if not any(t.params for t in complete):
        return {"note": "no searched parameters"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            values = optuna.importance.get_param_importances(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:  # too little variation, say
            return {"note": f"could not be computed: {e}"}
    out: dict[str, Any] = {"importances": {k: float(v) for k, v in values.items()}}
    notes = sorted({str(w.message) for w in caught if not isinstance(w.message, optuna.exceptions.ExperimentalWarning)})
    if notes:
        out["note"] = " ".join(notes)
    return out


def write_plots(study: "optuna.Study", directory: Path) -> dict[str, str]:
    """History and parallel-coordinate PNGs where the study has enough complete trials; notes otherwise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    out: dict[str, str] = {}
    plots = [("history", ovm.plot_optimization_history, 1), ("parallel", ovm.plot_parallel_coordinate, 2)]
    directory.mkdir(parents=True, exist_ok=True)
    for kind, plot, needed in plots:
        if len(complete) < needed or (kind == "parallel" and not any(t.params for t in complete)):
            out[kind] = f"skipped: needs {needed} complete trial(s) with parameters, the study has {len(complete)}"
            continue
        path = directory / f"{study.study_name}-{kind}.png"
        with warnings.catch_warnings():  # experimental-API notices, axis limits of a one-valued parameter
            warnings.simplefilter("ignore")
            ax = plot(study)
        ax.set_title(f"{study.study_name}: {ax.get_title()}")
        fig = ax.figure
        fig.set_size_inches(9, 5)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")  # workers may export at once
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        plt.close(fig)
        os.replace(tmp, path)
        out[kind] = str(path)
    return out


def export(cfg: SweepConfig, studies: Mapping[str, "optuna.Study"], storage: str) -> dict[str, Any]:
    """Write best_params.json, importance.json, plots, best_<method>.yaml, tuned_preset.yaml,
    sweep_summary.md and sweep.json into the output directory; return what was written."""
    from fwlora.data import task_spec

    out_dir = Path(cfg.output_dir)
    metric = task_spec(cfg.task).metric
    best: dict[str, Any] = {}
    importance: dict[str, Any] = {}
    plots: dict[str, Any] = {}
    configs: dict[str, dict[str, Any]] = {}
    for method, study in studies.items():
        counts = study_counts(study)
        try:
            trial = study.best_trial
        except ValueError:  # no complete trial yet
            trial = None
        entry: dict[str, Any] = {"study": study.study_name, "metric": metric, "objective": cfg.objective,
                                 "seeds": cfg.seeds, "trials": counts}
        if trial is not None:
            entry.update(value=trial.value, trial=trial.number, params=trial.params,
                         runs=trial.user_attrs.get("runs"))
            configs[method] = best_config(cfg, method, trial)
            path = out_dir / f"best_{method}.yaml"
            header = (f"# best of study {study.study_name}: trial {trial.number}, {cfg.objective} {metric} "
                      f"{trial.value:.4f} (mean of {len(cfg.seeds)} seed(s)), written by fwlora sweep\n"
                      f"# fwlora train --config {path.name} --seed 1 --output-dir runs/{method}-seed1\n")
            write_text_atomic(path, header + yaml.safe_dump(configs[method], sort_keys=False))
            entry["config_file"] = str(path)
        best[method] = entry
        importance[method] = {"study": study.study_name, **param_importances(study)}
        plots[method] = write_plots(study, out_dir / "plots")
    write_json(out_dir / "best_params.json", best)
    write_json(out_dir / "importance.json", importance)
    preset_path = write_tuned_preset(cfg, configs, out_dir / "tuned_preset.yaml")
    summary = summary_markdown(cfg, best, storage)
    write_text_atomic(out_dir / "sweep_summary.md", summary)
    write_json(out_dir / "sweep.json", {
        "command": " ".join(["fwlora"] + sys.argv[1:]), "storage": storage, "task": cfg.task, "methods": cfg.methods,
        "studies": {m: cfg.study_name(m) for m in cfg.methods}, "trials": cfg.trials, "objective": cfg.objective,
        "seeds": cfg.seeds, "sampler_seed": cfg.sampler_seed,
        "pruner": {"kind": cfg.pruner, "startup_trials": cfg.prune_startup_trials, "from_epoch": cfg.prune_from_epoch},
        "settings": cfg.settings, "space": {n: p.to_dict() for n, p in cfg.space.items()}, "plots": plots})
    return {"best": best, "importance": importance, "plots": plots, "summary": summary,
            "preset": str(preset_path) if preset_path else None}


def write_tuned_preset(cfg: SweepConfig, configs: Mapping[str, dict[str, Any]], path: Path) -> Path | None:
    """A `fwlora bench` preset: shared settings in train:, each method's tuned ones in methods:.

    bench sets every cell's rank (or budget) from the grid, so that methods are compared at one budget:
    the tuned ranks become the grid's ranks, not per-method settings."""
    if not configs:
        return None
    tuned = {m: {k: v for k, v in c.items() if k in cfg.space_for(m) and k not in PER_CELL} for m, c in configs.items()}
    shared = {k: v for k, v in cfg.settings.items() if k not in PER_CELL}
    grid: dict[str, Any] = {"tasks": [cfg.task], "methods": list(configs), "seeds": 3}
    ranks = sorted({c["rank"] for c in configs.values() if c.get("rank") is not None})
    budgets = sorted({c["budget"] for c in configs.values() if c.get("budget") is not None})
    if ranks:
        grid["ranks"] = ranks
    else:
        grid["budgets"] = budgets or [0.2]  # train's default budget
    chosen = ", ".join(f"{m} rank {c.get('rank')}" if c.get("rank") else f"{m} budget {c.get('budget')}"
                       for m, c in configs.items())
    header = ("# Tuned by fwlora sweep (" + ", ".join(cfg.study_name(m) for m in configs) + f"), objective "
              f"{cfg.objective}.\n# fwlora bench --preset {path.name} --output-dir runs/tuned\n"
              f"# bench sets the rank of every run from the grid (one budget for all methods); the sweep chose: "
              f"{chosen}.\n# Edit grid: (seeds, ranks or budgets) to taste.\n")
    body = yaml.safe_dump({"grid": grid, "train": shared, "methods": tuned}, sort_keys=False)
    write_text_atomic(path, header + body)
    return path


def summary_markdown(cfg: SweepConfig, best: Mapping[str, Any], storage: str) -> str:
    from fwlora.data import task_spec

    metric = task_spec(cfg.task).metric
    n = len(cfg.seeds)
    lines = [f"# Sweep: {cfg.task}, best of N per method (--trials {cfg.trials})",
             "",
             f"Objective: {cfg.objective}-epoch validation {metric}, mean over {n} seed(s) ({', '.join(map(str, cfg.seeds))}).",
             "",
             f"| method | best {metric} | trial | complete | pruned | failed | running | parameters |",
             "|---|---|---|---|---|---|---|---|"]
    for method in cfg.methods:
        e = best.get(method)
        if e is None:
            continue
        c = e["trials"]
        pruned = f"{c['pruned']}" + (f" ({c['infeasible']} infeasible)" if c["infeasible"] else "")
        failed = f"{c['failed']}" + (f" ({c['diverged']} diverged)" if c["diverged"] else "")
        value = f"{e['value']:.4f}" if "value" in e else "-"
        lines.append(f"| {method} | {value} | {e.get('trial', '-')} | {c['complete']} | {pruned} | {failed} | "
                     f"{c['running']} | {_format_params(e.get('params') or {}) if 'params' in e else '-'} |")
    lines += ["", "Pruned: stopped by the pruner, or infeasible (never trained); failed: diverged (counted) or "
              "interrupted / crashed (replaced by another trial). Every method got the same number of trials.",
              "", f"Studies in {storage}: " + ", ".join(cfg.study_name(m) for m in cfg.methods) + "."]
    return "\n".join(lines) + "\n"


# ---- command line ----------------------------------------------------------------------------------


EPILOG = """examples:
  fwlora sweep --task cola --method fwlora --trials 20 --data-dir ../shared/glue --output-dir runs/sweep
  fwlora sweep --task cola --methods lora,adalora,fwlora --trials 20 --space my_space.yaml --output-dir runs/sweep
  fwlora sweep ... --seeds-per-trial 3          # objective: mean over seeds S..S+2 of the final-epoch metric

the search space (default: METHOD.md's ranges; see examples/sweep_space.yaml):
  lr: {type: float, low: 1.0e-4, high: 3.0e-4, log: true}
  lambda_fw: {type: float, low: 5.0e-5, high: 5.0e-4, log: true, methods: [fwlora]}
  rank: {type: categorical, choices: [4, 8, 16]}
  fw_warmup_steps: {type: categorical, choices: [300, 500, 800], methods: [fwlora]}
  batch_size: {type: categorical, choices: [16, 32, 64]}
  a --space file replaces entries key by key (key: null drops one); a training flag given on the
  command line fixes that setting and takes it out of the space. A trial whose fw_warmup_steps is not
  below its number of optimizer steps is pruned untrained (reason recorded), not clamped.

storage, workers, resuming:
  default storage: <output-dir>/optuna.journal (Optuna JournalStorage, file lock: many processes on one
  machine). Start more workers by running the same command again in other terminals: --trials is the
  TOTAL per study, shared by all workers; no trial runs twice, none is lost.
  several machines: --storage postgresql://user:pw@host/db (or mysql+pymysql://..., its driver installed;
  or redis://host:6379 with the redis package, no heartbeats), the same command on each machine; heartbeats fail a dead
  machine's trial after 5 minutes and another trial replaces it. Trial directories stay on the machine
  that ran them; any machine writes the outputs from the shared study (--trials 0 to refresh them).
  --storage sqlite:///sweep.db also works, but SQLite locks the whole file per write: few workers only.
  resume: run the same command again (Ctrl-C marks the running trial failed; it is replaced); raise
  --trials to extend a study; --trials 0 only rewrites the outputs.

outputs in --output-dir: best_params.json, importance.json, plots/*.png, best_<method>.yaml
  (fwlora train --config best_fwlora.yaml), tuned_preset.yaml (fwlora bench --preset tuned_preset.yaml),
  sweep_summary.md, sweep.json; each trial's runs in <output-dir>/<study>/trial<n>[-seed<k>]/."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from fwlora.cli import add_train_flags

    p = sub.add_parser(
        "sweep", help="hyper-parameter search with Optuna (resumable, several workers or machines)",
        description="Search learning rate, rank, batch size and FW-LoRA's lambda and warm-up with Optuna\n"
                    "(TPE sampler, median pruner): one study per method, each with the same number of trials;\n"
                    "then write the best configuration per method, importances, plots and a bench preset.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of the fixed training settings")
    p.add_argument("--output-dir", default="runs/sweep",
                   help="trial runs, the default journal storage and the outputs (default: runs/sweep)")
    p.add_argument("--methods", help="comma-separated methods, one study each with the same --trials "
                                     "(instead of --method)")
    p.add_argument("--trials", type=int, default=20, help="total trials per method over all workers (default: 20)")
    p.add_argument("--storage", metavar="URL",
                   help="Optuna storage: a journal file path, sqlite:///FILE, postgresql://..., mysql://..., "
                        "redis://... (default: <output-dir>/optuna.journal)")
    p.add_argument("--space", metavar="FILE", help="YAML/JSON search space replacing the default's entries")
    p.add_argument("--seeds-per-trial", type=int, default=1, metavar="N",
                   help="train each trial with seeds S..S+N-1 (S = --seed) and average (default: 1)")
    p.add_argument("--sampler-seed", type=int, default=0, help="seed of the TPE sampler (default: 0)")
    p.add_argument("--study-name", metavar="PREFIX", help="prefix of the study names (studies: [PREFIX-]<task>-<method>)")
    p.add_argument("--objective", choices=OBJECTIVES, default="final",
                   help="the metric at the final epoch, or each run's best epoch (default: final)")
    p.add_argument("--pruner", choices=PRUNERS, default="median", help="median pruner or none (default: median)")
    p.add_argument("--prune-startup-trials", type=int, default=5, metavar="N",
                   help="no pruning until N trials are complete (default: 5)")
    p.add_argument("--prune-from-epoch", type=int, default=2, metavar="E",
                   help="the earliest epoch after which a trial may be pruned (default: 2)")
    add_train_flags(p, skip=("output_dir",))
    p.set_defaults(handler=cmd_sweep)


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    """Settings from --config < flags; a flag given on the command line takes its setting out of the space."""
    from fwlora.cli import collect_train_settings

    settings = collect_train_settings(args)
    given = {f.name for f in config_fields() if getattr(args, f.name, None) is not None}
    if args.methods and args.method:
        raise UserError("give --method or --methods, not both")
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    else:
        methods = [settings.get("method", TrainConfig.method)]
    settings.pop("method", None)
    settings.pop("output_dir", None)  # the sweep's own --output-dir (or a config file's): trials go under it
    space = load_space(args.space)
    fixed = given & set(space)
    if given & {"rank", "budget"}:
        fixed |= {"rank", "budget"} & set(space)
    for name in sorted(fixed):
        log.info("%s fixed at %r by --%s: not searched", name, settings.get(name), name.replace("_", "-"))
        del space[name]
    return SweepConfig(methods=methods, settings=settings, space=space, trials=args.trials, output_dir=args.output_dir,
                       storage=args.storage, seeds_per_trial=args.seeds_per_trial, sampler_seed=args.sampler_seed,
                       study_prefix=args.study_name, objective=args.objective, pruner=args.pruner,
                       prune_startup_trials=args.prune_startup_trials, prune_from_epoch=args.prune_from_epoch)


def run_sweep(cfg: SweepConfig, train_fn: TrainFn | None = None, pruner: Any = None) -> dict[str, Any]:
    """Run (or continue) every study, then write the outputs; returns export()'s summary plus the studies."""
    sweep = Sweep(cfg, train_fn=train_fn, pruner=pruner)
    studies = sweep.run()
    outputs = export(cfg, studies, sweep.store.description)
    return {**outputs, "studies": studies}


def cmd_sweep(args: argparse.Namespace) -> int:
    import optuna

    from fwlora.train import quiet_transformers

    cfg = config_from_args(args)
    optuna.logging.set_verbosity(optuna.logging.DEBUG if args.verbose else optuna.logging.WARNING)
    try:
        with quiet_transformers():
            outcome = run_sweep(cfg)
    except TrainingInterrupted as e:
        raise TrainingInterrupted(f"sweep stopped ({e}); the trial is recorded as failed and will be replaced: "
                                  "run the same command again to continue", e.signum) from None
    except KeyboardInterrupt:  # a signal outside a run's training loop (loading, evaluating the study)
        print("fwlora: sweep stopped; a running trial is recorded as failed and will be replaced: "
              "run the same command again to continue", file=sys.stderr)
        raise
    print(outcome["summary"])
    print(f"outputs in {cfg.output_dir}: sweep_summary.md, best_params.json, importance.json, best_<method>.yaml, "
          "tuned_preset.yaml, plots/")
    empty = [m for m, e in outcome["best"].items() if "value" not in e and not e["trials"]["running"]]
    if empty and cfg.trials > 0:
        print(f"no complete trial for {', '.join(empty)} (see the trials' fail_reason / pruned_reason in the study)",
              file=sys.stderr)
        return 1
    return 0
