"""`fwlora bench`: the grid of runs (tasks x budgets x methods x seeds), in an order that makes time
ratios fair, resumable, and tolerant of a failing run.

Order: seed by seed; within a seed, task by task and budget by budget, the methods back to back, so
that a method's time is compared with LoRA's measured minutes apart on the same machine state.
Layout: <output-dir>/<task>/<budget>/<method>/seed<k>/ (a `fwlora train` run directory each), plus
<output-dir>/bench.json describing the grid and the command.

Variants: a preset may name settings of a method as a column of their own, e.g.

    variants:
      fwlora_exact: {method: fwlora, fw_measure_every: 1}
    grid:
      methods: [lora, fwlora, fwlora_exact]

A variant's runs carry its name as their `label` (the report's column) and live under <variant>/.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from fwlora import methods, tasks
from fwlora.budget import colliding_budgets
from fwlora.config import TrainConfig, data_name
from fwlora.errors import TrainingInterrupted, UserError
from fwlora.plan import backbone_facts
from fwlora.records import RunRecord, Status, read_config, read_result, run_status, write_result
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
        data = yaml.safe_load(text) or {}
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
    for seed in seeds:
        for task in tasks_:
            for kind, size in sizes:
                size_label = f"{kind}{size:g}"
                for method in methods_:
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


def run_bench(cells: list[Cell], output_dir: Path, retry_failed: bool = True, stop_on_error: bool = False) -> dict[str, str]:
    """Run every cell not yet complete; return {cell key: final status}."""
    statuses: dict[str, str] = {}
    todo = [c for c in cells if run_status(Path(c.config.output_dir)) != Status.COMPLETE]
    done = len(cells) - len(todo)
    log.info("bench: %d runs in the grid, %d already complete, %d to run", len(cells), done, len(todo))
    for c in cells:
        if c not in todo:
            statuses[c.key] = "complete"
    for i, cell in enumerate(todo, start=1):
        run_dir = Path(cell.config.output_dir)
        status = run_status(run_dir)
        if status == Status.FAILED and not retry_failed:
            statuses[cell.key] = "failed"
            continue
        log.info("[%d/%d] %s", i, len(todo), cell.key)
        start = time.perf_counter()
        try:
            train(cell.config, resume=status in (Status.RUNNING, Status.INTERRUPTED),
                  overwrite=status in (Status.FAILED, Status.UNREADABLE))
            statuses[cell.key] = "complete"
        except TrainingInterrupted:
            raise
        except Exception as e:  # one bad run must not cost the others
            statuses[cell.key] = "failed"
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
    return statuses


