"""What one sweep is (SweepConfig, validated where it is built) and which trials use up --trials."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from fwlora import methods
from fwlora.config import TrainConfig
from fwlora.errors import UserError
from fwlora.sweep.space import Param, default_space
from fwlora.sweep.storage import GRACE_SECONDS, HEARTBEAT_SECONDS

if TYPE_CHECKING:
    import optuna

OBJECTIVES = ("final", "best")
PRUNERS = ("median", "none")
# settings decided per run in a bench grid, not per method
PER_CELL = ("task", "method", "seed", "output_dir", "rank", "budget")
STUDY_ATTR = "fwlora_sweep"


@dataclass
class SweepConfig:
    """Everything `fwlora sweep` was asked to do; validated where it is built."""

    methods: list[str]
    settings: dict[str, Any]  # TrainConfig values shared by every trial (not method, output_dir)
    space: dict[str, Param] = field(default_factory=default_space)
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
    heartbeat_seconds: int = HEARTBEAT_SECONDS  # database storages: how often a running trial says it is alive
    grace_seconds: int = GRACE_SECONDS  # ... and how long after its last beat it is taken for dead

    def __post_init__(self) -> None:
        if not self.methods:
            raise UserError("give at least one method (--method or --methods)")
        for m in self.methods:
            methods.get(m)  # an unknown method: UserError listing the registered ones
        if len(set(self.methods)) != len(self.methods):
            raise UserError(f"--methods names a method twice: {','.join(self.methods)}")
        # entries for methods this sweep does not run (a plug-in's own settings) have nothing to search
        self.space = {n: p for n, p in self.space.items() if p.methods is None or set(p.methods) & set(self.methods)}
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
        if self.heartbeat_seconds < 1:
            raise UserError(f"--heartbeat-seconds = {self.heartbeat_seconds}: must be >= 1")
        if self.grace_seconds <= self.heartbeat_seconds:
            raise UserError(f"--grace-seconds = {self.grace_seconds} must exceed --heartbeat-seconds = "
                            f"{self.heartbeat_seconds} (else a live worker's trial would be failed between beats)")

    @property
    def task(self) -> str:
        return self.base_config().task

    def base_config(self) -> TrainConfig:
        """The trials' shared settings as a TrainConfig (the first method's; task and data resolved)."""
        return TrainConfig.from_dict(self.trial_settings(self.methods[0], {}), source="sweep settings")

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


def counts_toward_total(trial: "optuna.trial.FrozenTrial") -> bool:
    """Complete, pruned (infeasible included), running or waiting, or failed by diverging: these use up
    one of --trials. Interrupted, crashed, stale and surplus trials do not; another replaces them."""
    from optuna.trial import TrialState

    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING):
        return True
    return trial.state == TrialState.FAIL and bool(trial.user_attrs.get("counts"))


def identity_differences(have: dict, wanted: dict, method: str) -> list[str]:
    """How a study's recorded identity differs from this command's, as "key: old -> new". The fixed
    settings compare as run directories do (rundir.settings_difference): a setting a study made by an older
    release lacks counts as its default, and other methods' settings it recorded are not this study's."""
    from fwlora.rundir import settings_difference

    diffs = []
    for key in sorted(set(have) | set(wanted)):
        a, b = have.get(key), wanted.get(key)
        if key == "settings" and isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"settings.{k}: {old!r} -> {new!r}" for k, old, new in settings_difference(a, b, method)]
        elif isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    return diffs


def describe_diff(have: dict, wanted: dict, method: str, limit: int = 6) -> str:
    """The first differences between a study's recorded identity and this command's."""
    diffs = identity_differences(have, wanted, method)
    return ", ".join(diffs[:limit]) + (", ..." if len(diffs) > limit else "")
