"""The run directory and its record: the only reader and writer of config.json and result.json.

A run directory holds
    config.json   the TrainConfig and the environment, written when the run starts
    result.json   the RunRecord, written when the run ends (complete, failed, interrupted or pruned)
    checkpoint/   the state to resume from (deleted once the run is complete)
    adapter/      the trained PEFT adapter (+ the method's own state)
    claim.json    while a bench worker holds the run (fwlora.claims; removed when the run ends)
A bench directory adds bench.json (the grid and its command).
Under torchrun only the main process writes these files (the write_* helpers do nothing elsewhere).

The record is typed (RunRecord, with RunTiming and RunBudget); `method_info` is the method's own mapping (its
resolved settings and ranks, whatever the method's summary() says).

result.json carries `schema_version`. Version 1 (release 1) had no version field and kept a method's
resolved settings under the method's own name (only AdaLoRA had any); `RunRecord.from_dict` reads both.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fwlora.checks import is_finite_real, is_real
from fwlora.files import is_main_process, read_json, write_json

SCHEMA_VERSION = 2
CONFIG_FILE, RESULT_FILE, BENCH_FILE = "config.json", "result.json", "bench.json"
CHECKPOINT_DIR, ADAPTER_DIR, CLAIM_FILE = "checkpoint", "adapter", "claim.json"


class Status(str, enum.Enum):
    """Where a run stands. RUNNING: config.json only (started, or killed without a trace)."""

    COMPLETE = "complete"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    PRUNED = "pruned"
    RUNNING = "running"
    UNREADABLE = "unreadable"

    def __str__(self) -> str:
        return self.value


# release 1 wrote a warm-up's timings under fw_* names; schema 2 names them for any method
LEGACY_TIMING = {"fw_warmup_step_seconds_median": "warmup_step_seconds_median",
                 "fw_after_warmup_step_seconds_median": "after_warmup_step_seconds_median",
                 "fw_warmup_seconds": "warmup_seconds"}


def _number(value: Any) -> float | None:
    return float(value) if is_real(value) else None


def _count(value: Any) -> int | None:
    """A whole number as int; None for anything else (a fraction, NaN or inf from another writer, a string)."""
    return int(value) if is_finite_real(value) and float(value).is_integer() else None


@dataclass
class RunTiming:
    """result.json's `timing`: the run's clocks (synchronised device clocks per step, after an untimed warm-up
    step) and its peak memory. None: not measured (an unfinished run, a method without a warm-up)."""

    train_seconds: float | None = None  # a method's timed initialisation included
    init_seconds: float | None = None  # that initialisation (a data pass, SVDs): None where a method has none
    eval_seconds: float | None = None
    load_seconds: float | None = None  # building the model and data, outside train_seconds
    optimizer_steps: int | None = None
    examples_per_second: float | None = None
    step_seconds_median: float | None = None
    warmup_step_seconds_median: float | None = None  # a method with a measuring warm-up: its steps apart
    after_warmup_step_seconds_median: float | None = None
    warmup_seconds: float | None = None
    peak_memory: dict[str, Any] | None = None  # device.PeakMemory's reading: kind, bytes, since
    resumes: int | None = None  # a resumed run's times include a restart's costs: compare with care
    boot_ids: list[str] | None = None  # the machine boot of each stretch it trained in (a resume may move it)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Any) -> "RunTiming":
        values = dict(data) if isinstance(data, dict) else {}
        for old, new in LEGACY_TIMING.items():  # schema 2's name wins where a file holds both
            if values.get(new) is None and old in values:
                values[new] = values[old]
        numbers = {f.name: _number(values.get(f.name)) for f in dataclasses.fields(cls)
                   if f.name not in ("peak_memory", "resumes", "optimizer_steps", "boot_ids")}
        memory, boots = values.get("peak_memory"), values.get("boot_ids")
        return cls(**numbers, optimizer_steps=_count(values.get("optimizer_steps")),
                   resumes=_count(values.get("resumes")), peak_memory=memory if isinstance(memory, dict) else None,
                   boot_ids=[b for b in boots if isinstance(b, str) and b] if isinstance(boots, list) else None)


@dataclass
class RunBudget:
    """result.json's `budget`: the rank and budget the run was given (budget.Budget's fields) and what it
    trained. A method that resizes its adapter (AdaLoRA's init_r ranks, widecut's width) trains more or fewer
    adapter parameters than its budget: initial, final and the mean over its optimizer steps."""

    rank: int | None = None
    adapter_params: int | None = None  # the budget: LoRA's size at this rank
    backbone_params: int | None = None
    head_params: int | None = None
    percent: float | None = None  # adapter_params / backbone_params, in %
    requested_percent: float | None = None  # --budget, where the rank came from one
    trainable_params: int | None = None  # at the end, the head included
    adapter_trainable_params: int | None = None
    trained_adapter_params_initial: int | None = None
    trained_adapter_params_final: int | None = None
    trained_adapter_params_mean: float | None = None
    head: str | None = None  # the head it trained (resolved: "mean", "cls", "model", ...)
    lora_alpha: float | None = None
    targets: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Any) -> "RunBudget":
        values = data if isinstance(data, dict) else {}
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            v = values.get(f.name)
            if f.name == "head":
                out[f.name] = v if isinstance(v, str) else None
            elif f.name == "targets":
                out[f.name] = [str(t) for t in v] if isinstance(v, list) else None
            elif f.name in ("percent", "requested_percent", "trained_adapter_params_mean", "lora_alpha"):
                out[f.name] = _number(v)
            else:
                out[f.name] = _count(v)
        return cls(**out)


# a stretch whose machine could not be told: a run with one such stretch and another pairs with no run; a run
# timed only where no machine could be told pairs with another such run (as two records that do not say)
UNKNOWN_MACHINE = "unknown"


def same_machine(a: Sequence[str], b: Sequence[str]) -> bool:
    """Two runs, given the machine boots each was timed on, each timed whole on one boot, the same one (a record
    that does not say pairs with any; a run resumed on another machine with none)."""
    return len(a) <= 1 and len(b) <= 1 and (not a or not b or list(a) == list(b))


@dataclass
class RunRecord:
    """result.json, typed. A complete run fills every field; an unfinished one the identity fields, the
    status, and whatever it got to (epochs so far, the failing step, the error)."""

    status: Status
    task: str
    method: str
    seed: int
    config: dict[str, Any]
    metric: str | None = None
    higher_is_better: bool = True
    final: dict[str, Any] | None = None  # the last epoch's evaluation
    best: dict[str, Any] | None = None  # the best epoch by the headline metric
    epochs: list[dict[str, Any]] = field(default_factory=list)
    processes: int = 1
    budget: RunBudget = field(default_factory=RunBudget)
    method_info: dict[str, Any] = field(default_factory=dict)  # the method's own (its resolved settings, ranks)
    timing: RunTiming = field(default_factory=RunTiming)
    matrices: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    env: dict[str, Any] = field(default_factory=dict)
    step: int | None = None  # optimizer step at which a failed/interrupted run stopped
    error: str | None = None
    traceback: str | None = None
    reason: str | None = None  # why a sweep pruned it
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:  # a mapping (a test's hand-made record, an older reader) is read as typed
        if not isinstance(self.budget, RunBudget):
            self.budget = RunBudget.from_dict(self.budget)
        if not isinstance(self.timing, RunTiming):
            self.timing = RunTiming.from_dict(self.timing)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(status=str(self.status), budget=self.budget.to_dict(), timing=self.timing.to_dict())
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunRecord":
        """Read any schema version; unknown keys are ignored (a newer writer), missing ones defaulted."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        values = dict(data)
        version = int(values.get("schema_version", 1))
        config = values.get("config") if isinstance(values.get("config"), dict) else {}
        values["config"] = config
        if version == 1:  # the method's resolved settings sat under its own name
            legacy = values.pop(str(values.get("method") or config.get("method")), None)
            if isinstance(legacy, dict) and legacy:
                values["method_info"] = legacy
        for key in ("task", "method", "seed"):
            if values.get(key) is None:
                values[key] = config.get(key)
        if values["task"] is None or values["method"] is None or values["seed"] is None:
            raise ValueError("cannot tell its task, method and seed")
        try:
            values["status"] = Status(values.get("status", "unreadable"))
        except ValueError:
            values["status"] = Status.UNREADABLE
        values["seed"] = int(values["seed"])
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in values.items() if k in names and v is not None}
        kept["schema_version"] = version
        return cls(**kept)

    def metric_value(self, which: str = "final") -> float | None:
        """The headline metric of the final or best epoch (None when absent or not a number)."""
        entry = getattr(self, which) or {}
        value = entry.get(self.metric) if self.metric else None
        return float(value) if is_real(value) else None

    @property
    def train_seconds(self) -> float | None:
        """The run's training time (an initialisation's timed pass included), None where it did not finish."""
        return self.timing.train_seconds

    @property
    def init_seconds(self) -> float | None:
        """The seconds of a method's timed initialisation (a data pass, SVDs) inside train_seconds; None: none."""
        return self.timing.init_seconds

    @property
    def machines(self) -> list[str]:
        """The machine boots its timed stretches ran on (timing.boot_ids, else env.boot_id; [] where the record
        does not say). More than one: a run resumed on another machine, its seconds from both."""
        if self.timing.boot_ids:
            return list(self.timing.boot_ids)
        value = (self.env or {}).get("boot_id")
        if not (isinstance(value, str) and value):
            return []
        # env is the last stretch's: a resumed run that did not list its boots may have started elsewhere
        return [value, UNKNOWN_MACHINE] if self.timing.resumes else [value]

    @property
    def boot_id(self) -> str | None:
        """The one machine boot that timed the whole run; None where unknown or several."""
        return self.machines[0] if len(self.machines) == 1 else None

    def same_machine(self, other: "RunRecord") -> bool:
        """Whether two runs' times may be compared (`same_machine`)."""
        return same_machine(self.machines, other.machines)

    def matrices_by_name(self) -> dict[str, dict[str, Any]]:
        """The per-matrix rows by matrix name: two runs' rows are compared matrix by matrix."""
        return {m["name"]: m for m in self.matrices or [] if m.get("name")}

    def check_complete(self) -> None:
        """Raise (KeyError/TypeError/ValueError) when a 'complete' record lacks what a report needs."""
        if self.metric is None:
            raise KeyError("metric")
        float(self.final[self.metric])  # type: ignore[index]
        float(self.best[self.metric])  # type: ignore[index]
        if self.timing.train_seconds is None:
            raise KeyError("timing.train_seconds")


# ---- files --------------------------------------------------------------------------------------


def write_config(run_dir: Path, config: dict[str, Any], env: dict[str, Any]) -> Path:
    if not is_main_process():
        return Path(run_dir) / CONFIG_FILE
    return write_json(Path(run_dir) / CONFIG_FILE, {"config": config, "env": env, "schema_version": SCHEMA_VERSION})


def read_config(run_dir: Path) -> dict[str, Any] | None:
    """The TrainConfig dict a run directory was started with; None when there is no config.json."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    data = read_json(path)
    config = data.get("config") if isinstance(data, dict) else None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds no configuration")
    return config


def write_result(run_dir: Path, record: RunRecord) -> Path:
    if not is_main_process():
        return Path(run_dir) / RESULT_FILE
    return write_json(Path(run_dir) / RESULT_FILE, record.to_dict())


def read_result(run_dir: Path) -> RunRecord | None:
    """The run's record; None when it has not finished (no result.json). Raises OSError/ValueError for an
    unreadable file."""
    path = Path(run_dir) / RESULT_FILE
    if not path.is_file():
        return None
    return RunRecord.from_dict(read_json(path))


def run_status(run_dir: Path) -> Status | None:
    """COMPLETE, FAILED, INTERRUPTED, PRUNED, RUNNING (started, no result yet), UNREADABLE, or None for a
    directory that holds no run."""
    run_dir = Path(run_dir)
    if (run_dir / RESULT_FILE).is_file():
        try:
            record = read_result(run_dir)
        except (OSError, ValueError):
            return Status.UNREADABLE
        return record.status if record is not None else Status.UNREADABLE
    return Status.RUNNING if (run_dir / CONFIG_FILE).is_file() else None


def is_run_dir(path: Path) -> bool:
    return (Path(path) / RESULT_FILE).is_file() or (Path(path) / CONFIG_FILE).is_file()


def copy_records(source: Path, destination: Path) -> int:
    """Copy what carries the results under `source` (each bench.json, and each run's config.json and
    result.json; no checkpoint, no adapter) to the same relative places under `destination`; return the
    number of run directories copied.

    A few kB a run, so a report can be committed with its records: `fwlora report <destination>` rebuilds
    it, and copied back into a bench directory they let `fwlora bench` skip the runs they record as complete
    and run only the rest (a bench extended in a later session, on another machine)."""
    source, destination = Path(source), Path(destination)
    if source.resolve() == destination.resolve():
        return 0
    copied = 0
    for dirpath, dirnames, filenames in os.walk(source):
        here = Path(dirpath)
        names = [n for n in (BENCH_FILE, CONFIG_FILE, RESULT_FILE) if n in filenames]
        if destination.resolve() in (here.resolve(), *here.resolve().parents):
            dirnames[:] = []  # the destination lies inside the source: never copy the copies
            continue
        for name in names:
            target = destination / here.relative_to(source) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(here / name, target)
        if CONFIG_FILE in names or RESULT_FILE in names:
            copied += 1
            dirnames[:] = []  # a run directory: its checkpoint and adapter stay behind
        else:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return copied


def write_bench(output_dir: Path, info: dict[str, Any]) -> Path:
    if not is_main_process():
        return Path(output_dir) / BENCH_FILE
    return write_json(Path(output_dir) / BENCH_FILE, {**info, "schema_version": SCHEMA_VERSION})


def read_bench(output_dir: Path) -> dict[str, Any] | None:
    path = Path(output_dir) / BENCH_FILE
    return read_json(path) if path.is_file() else None
