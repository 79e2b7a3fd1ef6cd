"""Run directories -> runs -> protocols.

Reading. Each RUN_DIR is scanned for run directories (a directory with result.json or config.json).
Numbers come only from result.json, read through fwlora.records (any schema version); it is written
atomically, so a run still in progress (config.json alone) is counted as unfinished and never
half-read. A failed run is counted as failed.

Columns. A run's column is its label: the bench names a variant of a method (say "mine_wide", a variant of
method "mine") in its config's `label`; a run without one is its method's column.

Protocols. A bench directory (one with bench.json) is one protocol: the runs of one `fwlora bench` call,
compared with each other only. Runs under a RUN_DIR but under no bench directory form one protocol named
after the RUN_DIR. A protocol must hold at most one run per (task, budget, label, seed); a directory of
pilot runs that holds several (say one method at two learning rates) is split by the settings that tell
them apart ("explore: lr=0.001"), a run that those settings do not concern (one method's own setting, seen
from another method's run) joining every split it fits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fwlora import methods
from fwlora.errors import UserError
from fwlora.records import (BENCH_FILE, CONFIG_FILE, RESULT_FILE, RunRecord, Status, read_bench, read_config,
                            read_result)
from fwlora.report.text import fmt_value

log = logging.getLogger(__name__)

# Config keys that say nothing about how a result was obtained (or are the grid's own coordinates).
COORDINATE_KEYS = {"task", "method", "seed", "rank", "budget", "label"}
IGNORED_KEYS = COORDINATE_KEYS | {"output_dir", "data_dir", "threads", "log_every", "eval_batch_size",
                                  "checkpoint_every"}

_BUDGET_PART = re.compile(r"^(r\d+|b\d+(?:\.\d+)?(?:e-?\d+)?)$")
_SKIP_DIRS = {"checkpoint", "checkpoint.tmp", "checkpoint.old", "adapter", "report"}
# which run of a repeated key to keep: a complete one first
_STATUS_RANK = {Status.COMPLETE: 0, Status.FAILED: 1, Status.UNREADABLE: 2, Status.INTERRUPTED: 3,
                Status.PRUNED: 4, Status.RUNNING: 5}

Key = tuple[str, str, str, int]  # task, budget label, column label, seed


@dataclass(frozen=True)
class Run:
    """One run directory as found on disk. `record` is set whenever result.json could be read; `result`
    only for a complete run."""

    path: Path
    status: Status
    task: str
    method: str
    seed: int
    budget_label: str
    config: Mapping[str, Any]
    label: str  # the column: the config's label, else the method
    record: RunRecord | None = None
    error: str | None = None

    @property
    def result(self) -> RunRecord | None:
        return self.record if self.status == Status.COMPLETE else None

    @property
    def key(self) -> Key:
        return self.task, self.budget_label, self.label, self.seed


@dataclass(frozen=True)
class LrChoice:
    """How a frozen preset's learning rates were chosen (its `lr_choice` block, written by fwlora.lr_search):
    what every lr scored on the design seed, per column and task, and the lr each column got."""

    rule: str
    seed: int
    lrs: tuple[float, ...]
    chosen: Mapping[str, float]  # column -> lr
    scores: Mapping[str, Mapping[str, Mapping[str, float | None]]]  # column -> task -> lr label -> metric
    # column -> lr label -> shortfall from each task's best lr, summed over tasks
    shortfall: Mapping[str, Mapping[str, float]]
    at_edge: Mapping[str, str] = field(default_factory=dict)  # column -> "largest" / "smallest" lr of the grid

    @classmethod
    def from_block(cls, block: Any) -> LrChoice | None:
        if not isinstance(block, dict):
            return None
        try:
            chosen = {str(column): float(lr) for column, lr in (block.get("chosen") or {}).items()}
            lrs = tuple(float(x) for x in block["lrs"])
            scores, shortfall = dict(block.get("scores") or {}), dict(block.get("shortfall") or {})
            at_edge = {str(column): str(end) for column, end in (block.get("at_edge") or {}).items()}
            return cls(str(block.get("rule") or ""), int(block["seed"]), lrs, chosen, scores, shortfall, at_edge)
        except (KeyError, TypeError, ValueError) as e:  # a hand-edited preset: the report goes on without it
            log.warning("bench.json: cannot read the preset's lr_choice (%s)", e)
            return None


@dataclass(frozen=True)
class BenchInfo:
    """bench.json, read once: the command, its preset, and the runs it planned."""

    command: str | None
    overrides: Mapping[str, Any]  # --set
    preset_source: str | None  # "preset quick", a YAML path, or "command line"
    preset_note: str | None
    planned: frozenset[Key]
    task_order: tuple[str, ...]  # tasks in the order the bench ran them
    variants: Mapping[str, str]  # a named variant's label -> its method
    lr_choice: LrChoice | None

    @classmethod
    def from_json(cls, bench: dict[str, Any]) -> BenchInfo:
        preset = bench.get("preset") if isinstance(bench.get("preset"), dict) else {}
        runs = [str(key) for key in bench.get("runs") or []]
        table = bench.get("variants") or preset.get("variants") or {}
        variants = {k: str(v["method"]) for k, v in table.items()
                    if isinstance(v, dict) and v.get("method")} if isinstance(table, dict) else {}
        tasks = tuple(dict.fromkeys(key.split("/")[0] for key in runs))
        return cls(bench.get("command"), bench.get("set") or {}, preset.get("source"), preset.get("note"),
                   frozenset(_planned(runs)), tasks, variants, LrChoice.from_block(preset.get("lr_choice")))

    def label(self, bench_dir: Path) -> str:
        name = bench_dir.resolve().name
        source = self.preset_source
        if source and source.startswith("preset "):
            return f"{name} (preset {source.removeprefix('preset ')})"
        if source and source != "command line":
            return f"{name} (preset file {Path(source).name})"
        return name


@dataclass(frozen=True)
class Protocol:
    """Runs compared with each other: one bench directory, or the loose runs under one RUN_DIR."""

    label: str
    root: Path
    runs: tuple[Run, ...]
    bench: BenchInfo | None = None
    expected: frozenset[Key] = frozenset()  # from bench.json's list of runs
    split: Mapping[str, Any] = field(default_factory=dict)  # what tells this split of a directory apart
    notes: tuple[str, ...] = ()


def budget_label_of(path_parts: Sequence[str], config: Mapping[str, Any]) -> str:
    """The bench layout's path component ("r2", "b0.2"); else from the config's rank or budget (the
    trainer's default budget is 0.2 %)."""
    for part in reversed(path_parts):
        if _BUDGET_PART.match(part):
            return part
    if config.get("rank") is not None:
        return f"r{config['rank']}"
    if config.get("budget") is not None:
        return f"b{float(config['budget']):g}"
    return "b0.2"


def budget_sort_key(label: str) -> tuple[str, float]:
    try:
        return label[0], float(label[1:])
    except (ValueError, IndexError):
        return label, 0.0


def _run_dirs(root: Path) -> list[Path]:
    """Directories holding result.json or config.json, not descending into run directories."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if RESULT_FILE in filenames or CONFIG_FILE in filenames:
            found.append(Path(dirpath))
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
    return sorted(found)


def load_run(run_dir: Path, root: Path) -> Run | None:
    """Read one run directory (its budget label from its path below `root`); None when it holds nothing a
    report can use (logged)."""
    parts = run_dir.relative_to(root).parts if run_dir != root else ()
    record: RunRecord | None = None
    error = None
    try:
        record = read_result(run_dir)
    except (OSError, ValueError) as e:
        status, error = Status.UNREADABLE, f"cannot read {run_dir / RESULT_FILE}: {e}"
    else:  # no result.json: config.json only, started and not finished (or killed without a trace)
        status = record.status if record is not None else Status.RUNNING
    config = record.config if record is not None else {}
    if not config:
        try:
            config = read_config(run_dir) or {}
        except (OSError, ValueError, AttributeError) as e:
            log.warning("skipping %s: cannot read %s (%s)", run_dir, run_dir / CONFIG_FILE, e)
            return None
    task = record.task if record else config.get("task")
    method = record.method if record else config.get("method")
    seed = record.seed if record else config.get("seed")
    if not task or not method or seed is None:
        log.warning("skipping %s: cannot tell its task, method and seed", run_dir)
        return None
    if status == Status.FAILED:
        error = str(record.error or "failed (no message)") if record else "failed (no message)"
    if status == Status.COMPLETE:
        try:
            record.check_complete()  # type: ignore[union-attr]
        except (KeyError, TypeError, ValueError) as e:
            status, error = Status.UNREADABLE, f"result.json lacks {e}"
    return Run(path=run_dir, status=status, task=str(task), method=str(method), seed=int(seed),
               budget_label=budget_label_of(parts, config), config=config,
               label=str(config.get("label") or method), record=record, error=error)


def value_key(v: Any) -> str:
    """A setting's value as a hashable key that compares equal values as equal (lists, dicts included)."""
    return json.dumps(v, sort_keys=True)


def relevant(method: str, key: str) -> bool:
    """Whether a setting can change a run of this method: a method's own settings do not change the other
    methods' runs."""
    return methods.owner_of(key) in (None, method)


def split_by_settings(runs: Sequence[Run]) -> list[tuple[dict[str, Any], list[Run]]]:
    """Split runs so that each part holds at most one run per (task, budget, label, seed).

    The settings used are those that differ between runs sharing such a key; a run that a setting does
    not concern joins every part it agrees with. Returns [(settings, runs)].
    """
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        groups[r.key].append(r)
    keys = sorted({k for g in groups.values() if len(g) > 1 for r in g for k in r.config
                   if k not in IGNORED_KEYS and relevant(r.method, k)
                   and len({value_key(x.config.get(k)) for x in g}) > 1})
    if not keys:
        return [({}, list(runs))]

    def assignment(r: Run) -> frozenset:
        return frozenset((k, value_key(r.config.get(k))) for k in keys if relevant(r.method, k))

    candidates = {assignment(r) for r in runs}
    maximal = [a for a in candidates if not any(a < b for b in candidates)]
    out = []
    for a in sorted(maximal, key=lambda s: sorted(s)):
        members = [r for r in runs if assignment(r) <= a]
        settings = {k: json.loads(v) for k, v in sorted(a)}
        out.append((settings, members))
    return out


def dedupe(runs: Sequence[Run], notes: list[str]) -> tuple[Run, ...]:
    """One run per key: prefer a complete one, then the first by path; say what was left out."""
    by_key: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        by_key[r.key].append(r)
    kept = []
    for key, group in by_key.items():
        group.sort(key=lambda r: (_STATUS_RANK.get(r.status, 9), str(r.path)))
        kept.append(group[0])
        for other in group[1:]:
            notes.append(f"{other.path} repeats {'/'.join(map(str, key))} with the same settings; "
                         f"{group[0].path} is used")
    return tuple(sorted(kept, key=lambda r: str(r.path)))


def _planned(keys: Sequence[str]) -> set[Key]:
    """The runs bench.json planned ("task/budget/label/seedK") as keys."""
    out = set()
    for key in keys:
        parts = key.split("/")
        if len(parts) == 4 and parts[3].startswith("seed"):
            try:
                out.add((parts[0], parts[1], parts[2], int(parts[3][4:])))
            except ValueError:
                pass
    return out


def _read_bench(home: Path) -> BenchInfo | None:
    try:
        bench = read_bench(home)
    except (OSError, ValueError) as e:
        log.warning("cannot read %s: %s", home / BENCH_FILE, e)
        return None
    return BenchInfo.from_json(bench) if isinstance(bench, dict) and bench else None


def _split_note(home: Path, settings: Mapping[str, Any]) -> str:
    values = ", ".join(f"{k} = {fmt_value(v)}" for k, v in settings.items())
    return (f"{home} holds several runs per task, budget, method and seed; they are split by "
            f"{', '.join(settings)}. This part has {values} (a setting that does not concern a method leaves "
            "its runs in every part).")


def discover(run_dirs: Sequence[Path]) -> list[Protocol]:
    """Every run under the given directories, grouped into protocols (see the module docstring).
    Raises UserError for a path that does not exist or a file other than a result.json."""
    protocols: list[Protocol] = []
    seen: set[Path] = set()
    for arg in run_dirs:
        arg = Path(arg)
        if not arg.exists():
            raise UserError(f"{arg} does not exist (give run directories or bench directories written by "
                            "`fwlora train` / `fwlora bench`)")
        if arg.is_file():
            if arg.name != RESULT_FILE:
                raise UserError(f"{arg} is a file: give a run directory or a bench directory")
            arg = arg.parent
        found = {p.parent for p in arg.rglob(BENCH_FILE)} | ({arg} if (arg / BENCH_FILE).is_file() else set())
        benches = sorted(found, key=lambda p: len(p.parts), reverse=True)  # the innermost bench first
        groups: dict[Path, list[Run]] = defaultdict(list)
        for d in _run_dirs(arg):
            resolved = d.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            home = next((b for b in benches if b == d or b in d.parents), arg)
            run = load_run(d, home)
            if run is not None:
                groups[home].append(run)
        for home in sorted(set(groups) | set(benches), key=str):
            bench = _read_bench(home) if (home / BENCH_FILE).is_file() else None
            base = bench.label(home) if bench else (home.resolve().name or str(home))
            for settings, members in split_by_settings(groups.get(home, [])):
                notes: list[str] = [_split_note(home, settings)] if settings else []
                label = base + (": " + ", ".join(f"{k}={fmt_value(v)}" for k, v in settings.items())
                                if settings else "")
                # a bench's list of runs cannot be split by setting: do not expect runs a part may not hold
                expected = bench.planned if bench and not settings else frozenset()
                runs = dedupe(members, notes)
                protocols.append(Protocol(label, home, runs, bench, expected, settings, tuple(notes)))
    return _numbered(protocols)


def _numbered(protocols: list[Protocol]) -> list[Protocol]:
    """Protocols with one label made unique: 'runs', 'runs (2)'."""
    seen: dict[str, int] = defaultdict(int)
    out = []
    for p in protocols:
        seen[p.label] += 1
        out.append(dataclasses.replace(p, label=f"{p.label} ({seen[p.label]})") if seen[p.label] > 1 else p)
    return out
