"""`fwlora bench`: the grid of runs (tasks x budgets x methods x seeds), in an order that makes time
ratios fair, resumable, and tolerant of a failing run.

Order: seed by seed; within a seed, task by task and budget by budget, the methods back to back, so
that a method's time is compared with LoRA's measured minutes apart on the same machine state. The methods'
order turns by one each seed (seed k's group starts with the k-th method), so that no method always runs first
in its process: the first run measured up to ~5 % slow per step even after the untimed warm-up step (MPNet
SST-2, the quick preset), and the report's median over seeds of per-seed ratios then does not carry it.
Layout: <output-dir>/<task>/<budget>/<method>/seed<k>/ (a `fwlora train` run directory each), plus
<output-dir>/bench.json describing the grid and the command.

Workers: several benches may share one output directory (Slurm array tasks, processes packed on one GPU).
Each is dealt whole groups (a seed's task and budget, all its methods) round-robin in plan order, claims a
group's runs before the first starts (fwlora.claims), and afterwards takes what others left (Schedule).
Under torchrun the main process decides and claims; every process trains what it decided.

Variants: a preset may name settings of a method as a column of their own, e.g.

    variants:
      fwlora_exact: {method: fwlora, fw_measure_every: 1}
    grid:
      methods: [lora, fwlora, fwlora_exact]

A variant's runs carry its name as their `label` (the report's column) and live under <variant>/.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import time
import traceback
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Generator, Iterator

import yaml

from fwlora import methods, tasks
from fwlora.budget import colliding_budgets
from fwlora.claims import STALE_AFTER, Claims, Holder, Worker
from fwlora.config import TrainConfig, data_name, read_yaml
from fwlora.errors import TrainingInterrupted, UserError
from fwlora.files import broadcast_from_main, is_main_process
from fwlora.plan import backbone_facts
from fwlora.records import RESULT_FILE, RunRecord, Status, read_config, read_result, run_status, write_result
from fwlora.rundir import config_difference
from fwlora.train import train

log = logging.getLogger(__name__)

PRESET_KEYS = {"grid", "train", "tasks", "methods", "variants", "note", "lr_search", "lr_choice"}
GRID_KEYS = {"tasks", "methods", "budgets", "ranks", "seeds"}


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("fwlora.presets").iterdir()
                  if p.name.endswith(".yaml"))


def load_preset(name_or_path: str) -> dict[str, Any]:
    """A preset by name (fwlora/presets/<name>.yaml) or a path to a YAML file of the same shape."""
    path = Path(name_or_path)
    if not path.suffix:
        candidate = resources.files("fwlora.presets") / f"{name_or_path}.yaml"
        if not candidate.is_file():
            raise UserError(f"unknown preset {name_or_path!r}; known presets: {', '.join(preset_names())} "
                            "(or give a path to a YAML file)")
        text = candidate.read_text(encoding="utf-8")
        source = f"preset {name_or_path}"
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"preset file {path}: {e.strerror}") from None
        source = str(path)
    try:
        data = read_yaml(text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{source}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping with keys {', '.join(sorted(PRESET_KEYS))}")
    unknown = set(data) - PRESET_KEYS
    if unknown:
        raise UserError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; expected {', '.join(sorted(PRESET_KEYS))}")
    grid = data.get("grid") or {}
    if set(grid) - GRID_KEYS:
        raise UserError(f"{source}: unknown grid key(s) {', '.join(sorted(set(grid) - GRID_KEYS))}")
    data["source"] = source
    return data


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    task: str
    budget_label: str  # "r2" for --rank 2, "b0.2" for --budget 0.2
    method: str  # the grid's column: a method's name or a variant's
    seed: int
    config: TrainConfig

    @property
    def key(self) -> str:
        return f"{self.task}/{self.budget_label}/{self.method}/seed{self.seed}"


def _as_list(value: Any, kind: type, what: str) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        value = [value]
    try:
        return [kind(v) for v in value]
    except (TypeError, ValueError):
        raise UserError(f"{what}: cannot read {value!r} as a list of {kind.__name__}") from None


def plan(preset: dict[str, Any], output_dir: Path, overrides: dict[str, Any], train_overrides: dict[str, Any]) -> list[Cell]:
    """Every run of the grid, in execution order, each with its validated TrainConfig."""
    grid = {**(preset.get("grid") or {}), **{k: v for k, v in overrides.items() if v is not None}}
    tasks_ = _as_list(grid.get("tasks"), str, "tasks")
    methods_ = _as_list(grid.get("methods"), str, "methods")
    budgets = _as_list(grid.get("budgets"), float, "budgets")
    ranks = _as_list(grid.get("ranks"), int, "ranks")
    seeds_value = grid.get("seeds", 1)
    seeds = list(range(seeds_value)) if isinstance(seeds_value, int) else _as_list(seeds_value, int, "seeds")
    if "budgets" in overrides and overrides["budgets"] is not None:
        ranks = []
    if "ranks" in overrides and overrides["ranks"] is not None:
        budgets = []
    if train_overrides.get("dataset") and not overrides.get("tasks"):  # your own data: its name is the task's
        tasks_ = [train_overrides.get("task") or data_name(train_overrides["dataset"])]
    if not tasks_ or not methods_ or not seeds or not (budgets or ranks):
        raise UserError("the grid needs tasks, methods, seeds and budgets (or ranks): give --preset or the flags")
    if budgets and ranks:
        raise UserError("the grid has both budgets and ranks: give one of them")
    variants = preset.get("variants") or {}
    if not isinstance(variants, dict) or not all(isinstance(v, dict) and "method" in v for v in variants.values()):
        raise UserError(f"{preset.get('source', 'preset')}: variants must map names to settings with a 'method'")
    for m in methods_:
        if m not in variants:
            methods.get(m)  # an unknown method is refused with the list of known ones
    own_data = bool(train_overrides.get("dataset") or (preset.get("train") or {}).get("dataset"))
    for t in tasks_:
        if not own_data:
            tasks.get_task(t)  # an unknown task is refused before any run starts, not recorded as failed runs
    sizes = [("b", b) for b in budgets] or [("r", r) for r in ranks]
    base = {k.replace("-", "_"): v for k, v in (preset.get("train") or {}).items()}
    per_task = preset.get("tasks") or {}
    per_method = preset.get("methods") or {}
    for name, table in (("tasks", per_task), ("methods", per_method)):
        if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
            raise UserError(f"{preset.get('source', 'preset')}: {name} must map names to settings")
    cells = []
    for turn, seed in enumerate(seeds):
        turn %= len(methods_)
        for task in tasks_:
            for kind, size in sizes:
                size_label = f"{kind}{size:g}"
                for method in methods_[turn:] + methods_[:turn]:
                    variant = dict(variants.get(method) or {})
                    real = variant.pop("method", method)
                    label = {"label": method} if method in variants else {}
                    values = {**base, **(per_task.get(task) or {}), **(per_method.get(real) or {}), **variant,
                              **train_overrides, **label, "task": task, "method": real, "seed": seed,
                              "rank": size if kind == "r" else None, "budget": size if kind == "b" else None,
                              "output_dir": str(output_dir / task / size_label / method / f"seed{seed}")}
                    if "rank" in variant:  # a variant at another rank in this budget's cell (a capacity control)
                        values["rank"], values["budget"] = variant["rank"], None
                    values = {k.replace("-", "_"): v for k, v in values.items()}
                    cfg = TrainConfig.from_dict(values, source=f"{preset.get('source', 'bench')} ({task}, {method})")
                    cells.append(Cell(task, size_label, method, seed, cfg))
    return cells


def warn_colliding_budgets(cells: list[Cell]) -> None:
    """Two budgets that round to one rank make identical runs: say so before hours are spent."""
    checked = set()
    for cell in cells:
        cfg = cell.config
        key = (cfg.model, cfg.head, tuple(cfg.target_modules or ()))
        if cfg.budget is None or key in checked:
            continue
        checked.add(key)
        budgets = sorted({c.config.budget for c in cells if c.config.budget is not None})
        counts, _, _ = backbone_facts(cfg, tasks.task_for(cfg))
        for rank, same in colliding_budgets(budgets, counts.per_rank, counts.backbone).items():
            log.warning("budgets %s %% all map to rank %d on %s: those runs will be identical",
                        ", ".join(f"{b:g}" for b in same), rank, cfg.model)


def check_data(cells: list[Cell]) -> None:
    """Load each task's data once before anything runs: data that cannot be found (no local copy offline, a
    bad file) is one message up front, not a failed run per cell."""
    seen = set()
    for cell in cells:
        cfg = cell.config
        key = (cfg.task, cfg.dataset, cfg.data_dir)
        if key not in seen:
            seen.add(key)
            tasks.task_for(cfg).load(cfg.data_dir)


def check_existing(cells: list[Cell]) -> None:
    """Refuse, before anything runs, an output directory whose runs were made with other settings."""
    for cell in cells:
        old = read_config(Path(cell.config.output_dir))
        if old is not None:
            diff = config_difference(old, cell.config)
            if diff:
                raise UserError(f"{cell.config.output_dir} holds a run made with other settings "
                                f"({', '.join(k for k, _, _ in diff)}); use a new --output-dir for a changed grid")


class Outcome(str, enum.Enum):
    """What run_bench says of each run: finished (here or by another worker), or left to another worker."""

    COMPLETE = "complete"
    FAILED = "failed"
    HELD = "held"  # claimed by a live worker when this one last looked
    OTHER = "another worker's"  # another worker's share, not taken (--no-steal)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Job:
    """One run to train, as the main process decided it (under torchrun every process receives it)."""

    key: str  # "" while the main process waits for a silent claim to go stale (the others wait with it)
    resume: bool = False
    overwrite: bool = False


def groups(cells: list[Cell]) -> list[list[Cell]]:
    """The grid's groups in plan order: the methods of one seed, task and budget, which one worker runs back
    to back so that their times are compared on one machine state. Workers are dealt whole groups."""
    out: list[list[Cell]] = []
    for cell in cells:
        first = out[-1][0] if out else None
        if first and (first.seed, first.task, first.budget_label) == (cell.seed, cell.task, cell.budget_label):
            out[-1].append(cell)
        else:
            out.append([cell])
    return out


def _stamp(cell: Cell) -> tuple[int, int] | None:
    try:
        st = (Path(cell.config.output_dir) / RESULT_FILE).stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class Schedule:
    """Which runs this worker trains, in which order: its own groups (Worker.owns), then, with `steal`, the
    groups no live worker holds, then again those that were held: taken if released or stale meanwhile,
    waited for while a holder is silent (no heartbeat for two beats: killed, perhaps on another host, its
    claim not yet stale), left to a live holder otherwise. A group is claimed whole before its first run
    starts (claims.Claims); a run claimed elsewhere is never trained nor recorded here."""

    def __init__(self, cells: list[Cell], claims: Claims, retry_failed: bool = True, steal: bool = True):
        self.claims, self.retry_failed = claims, retry_failed
        dealt = groups(cells)
        self.own = [g for i, g in enumerate(dealt) if claims.worker.owns(i)]
        self.others = [g for i, g in enumerate(dealt) if not claims.worker.owns(i)] if steal else []
        self.statuses = {c.key: Outcome.OTHER for g in dealt for c in g}
        self.holders: dict[str, Holder] = {}  # run -> who held it when this worker last looked
        self.before = {c.key: _stamp(c) for c in cells}  # a failure recorded after this is not ours to retry

    def decide(self, cell: Cell) -> Job | None:
        """The job for `cell`, or None when it is finished (its status recorded)."""
        status = run_status(Path(cell.config.output_dir))
        if status == Status.COMPLETE:
            self.statuses[cell.key] = Outcome.COMPLETE
            return None
        if status == Status.FAILED and (not self.retry_failed or _stamp(cell) != self.before[cell.key]):
            self.statuses[cell.key] = Outcome.FAILED  # left alone, or failed in this round under another worker
            return None
        return Job(cell.key, resume=status in (Status.RUNNING, Status.INTERRUPTED),
                   overwrite=status in (Status.FAILED, Status.UNREADABLE))

    def todo(self) -> int:
        """Runs of this worker's own share not complete when it starts (for the log)."""
        return sum(run_status(Path(c.config.output_dir)) != Status.COMPLETE for g in self.own for c in g)

    def jobs(self) -> Iterator[Job]:
        held = yield from self._pass(self.own + self.others)
        held = yield from self._pass(held)  # back to them: finished, released or stale meanwhile?
        while any(self._silent(c.key) for g in held for c in g):
            time.sleep(self.claims.heartbeat_every)
            yield Job("")  # under torchrun: the other processes wait at the broadcast, a beat at a time
            held = yield from self._pass(held)

    def _pass(self, todo: list[list[Cell]]) -> Generator[Job, None, list[list[Cell]]]:
        """Run the groups no live worker holds; return those still held."""
        held = []
        for group in todo:
            if not (yield from self._group(group)):
                held.append(group)
        return held

    def _silent(self, key: str) -> bool:
        holder = self.holders.get(key)
        return holder is not None and time.time() - holder.heartbeat > 2 * self.claims.heartbeat_every

    def _group(self, group: list[Cell]) -> Generator[Job, None, bool]:
        """Claim the group's unfinished runs, then yield them one by one; False when a live worker holds one."""
        needed = [c for c in group if self.decide(c) is not None]
        taken: list[Cell] = []
        for cell in needed:
            holder = self.claims.acquire(Path(cell.config.output_dir))
            if holder is not None:
                for c in taken:
                    self.claims.release(Path(c.config.output_dir))
                for c in needed:
                    self.statuses[c.key], self.holders[c.key] = Outcome.HELD, holder
                return False
            taken.append(cell)
        for cell in taken:
            run_dir = Path(cell.config.output_dir)
            job = self.decide(cell)  # again, now that it is ours: another worker may have finished it
            if job is not None:
                self.statuses[cell.key] = Outcome.FAILED  # until the run says otherwise
                self.holders.pop(cell.key, None)
                yield job
            self.claims.release(run_dir)
        return True


def run_bench(cells: list[Cell], output_dir: Path, retry_failed: bool = True, stop_on_error: bool = False,
              worker: Worker = Worker(), steal: bool = True, stale_after: float = STALE_AFTER) -> dict[str, Outcome]:
    """Run this worker's share of the cells not yet complete (and, with `steal`, what other workers leave);
    return {cell key: its Outcome}.

    Under torchrun the main process claims and decides each run, every process trains it."""
    by_key = {c.key: c for c in cells}
    main = is_main_process()
    with Claims(worker, stale_after) if main else contextlib.nullcontext() as claims:
        schedule = Schedule(cells, claims, retry_failed, steal) if main else None
        jobs = schedule.jobs() if schedule else iter(())
        todo = schedule.todo() if schedule else 0
        if schedule:
            then = ", then what others leave" if steal else ""
            share = f" (worker {worker}'s share{then})" if worker.count > 1 else ""
            log.info("bench: %d runs in the grid, %d to run%s", len(cells), todo, share)
        done = 0
        while (job := broadcast_from_main(next(jobs, None))) is not None:
            if not job.key:
                continue
            done += 1
            log.info("[%d/%d] %s", done, max(done, todo), job.key)
            ok = _train_cell(by_key[job.key], job, stop_on_error)
            if schedule:
                schedule.statuses[job.key] = Outcome.COMPLETE if ok else Outcome.FAILED
        statuses = broadcast_from_main(schedule.statuses if schedule else None)
    held = {k: h for k, h in schedule.holders.items() if statuses[k] == Outcome.HELD} if schedule else {}
    if held:
        log.warning("bench: %d run(s) held by other workers: %s", len(held),
                    ", ".join(f"{k} ({h.describe()})" for k, h in held.items()))
    return statuses


def _train_cell(cell: Cell, job: Job, stop_on_error: bool) -> bool:
    """Train one run; a failure is recorded in its result.json and the bench goes on (False)."""
    run_dir = Path(cell.config.output_dir)
    start = time.perf_counter()
    try:
        train(cell.config, resume=job.resume, overwrite=job.overwrite)
        return True
    except TrainingInterrupted:
        raise
    except Exception as e:  # one bad run must not cost the others
        try:
            recorded = read_result(run_dir)
        except (OSError, ValueError):
            recorded = None
        if recorded is None or recorded.status != Status.FAILED:  # keep what train() recorded (step, epochs)
            recorded = RunRecord(status=Status.FAILED, task=cell.task, method=cell.config.method, seed=cell.seed,
                                 config=cell.config.to_dict())
        recorded.error, recorded.traceback = f"{type(e).__name__}: {e}", traceback.format_exc()
        write_result(run_dir, recorded)
        log.error("%s failed after %.0f s: %s (recorded; the bench goes on)", cell.key, time.perf_counter() - start, e)
        if stop_on_error:
            raise
        return False
