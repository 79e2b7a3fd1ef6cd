"""`fwlora bench`: the grid of runs (tasks x budgets x methods x seeds), in an order that makes time
ratios fair, resumable, and tolerant of a failing run.

Order: seed by seed; within a seed, task by task and budget by budget, the methods back to back, so
that a method's time is compared with LoRA's measured minutes apart on the same machine state.
Layout: <output-dir>/<task>/<budget>/<method>/seed<k>/ (a `fwlora train` run directory each), plus
<output-dir>/bench.json describing the grid and the command.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from fwlora.config import METHODS, TrainConfig
from fwlora.data import task_spec
from fwlora.errors import TrainingInterrupted, UserError
from fwlora.files import read_json, write_json

log = logging.getLogger(__name__)

PRESET_KEYS = {"grid", "train", "tasks", "methods"}
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
    method: str
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
    tasks = _as_list(grid.get("tasks"), str, "tasks")
    methods = _as_list(grid.get("methods"), str, "methods")
    budgets = _as_list(grid.get("budgets"), float, "budgets")
    ranks = _as_list(grid.get("ranks"), int, "ranks")
    seeds_value = grid.get("seeds", 1)
    seeds = list(range(seeds_value)) if isinstance(seeds_value, int) else _as_list(seeds_value, int, "seeds")
    if "budgets" in overrides and overrides["budgets"] is not None:
        ranks = []
    if "ranks" in overrides and overrides["ranks"] is not None:
        budgets = []
    if not tasks or not methods or not seeds or not (budgets or ranks):
        raise UserError("the grid needs tasks, methods, seeds and budgets (or ranks): give --preset or the flags")
    if budgets and ranks:
        raise UserError("the grid has both budgets and ranks: give one of them")
    for m in methods:
        if m not in METHODS:
            raise UserError(f"unknown method {m!r}; use {', '.join(METHODS)}")
    for t in tasks:
        task_spec(t)  # an unknown task is refused before any run starts, not recorded as failed runs
    sizes = [("b", b) for b in budgets] or [("r", r) for r in ranks]
    base = {k.replace("-", "_"): v for k, v in (preset.get("train") or {}).items()}
    per_task = preset.get("tasks") or {}
    per_method = preset.get("methods") or {}
    for name, table in (("tasks", per_task), ("methods", per_method)):
        if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
            raise UserError(f"{preset.get('source', 'preset')}: {name} must map names to settings")
    cells = []
    for seed in seeds:
        for task in tasks:
            for kind, size in sizes:
                label = f"{kind}{size:g}"
                for method in methods:
                    values = {**base, **(per_task.get(task) or {}), **(per_method.get(method) or {}), **train_overrides,
                              "task": task, "method": method, "seed": seed,
                              "rank": size if kind == "r" else None, "budget": size if kind == "b" else None,
                              "output_dir": str(output_dir / task / label / method / f"seed{seed}")}
                    values = {k.replace("-", "_"): v for k, v in values.items()}
                    cfg = TrainConfig.from_dict(values, source=f"{preset.get('source', 'bench')} ({task}, {method})")
                    cells.append(Cell(task, label, method, seed, cfg))
    return cells


def warn_colliding_budgets(cells: list[Cell]) -> None:
    """Two budgets that round to one rank make identical runs: say so before hours are spent."""
    from fwlora import models
    from fwlora.budget import colliding_budgets

    checked = set()
    for cell in cells:
        cfg = cell.config
        key = (cfg.model, cfg.head, tuple(cfg.target_modules or ()))
        if cfg.budget is None or key in checked:
            continue
        checked.add(key)
        budgets = sorted({c.config.budget for c in cells if c.config.budget is not None})
        model, _ = models.load_backbone(cfg.model, 2, "model")
        counts = models.count_params(model, models.resolve_targets(model, cfg.target_modules))
        for rank, same in colliding_budgets(budgets, counts.per_rank, counts.backbone).items():
            log.warning("budgets %s %% all map to rank %d on %s: those runs will be identical",
                        ", ".join(f"{b:g}" for b in same), rank, cfg.model)


def check_existing(cells: list[Cell]) -> None:
    """Refuse, before anything runs, an output directory whose runs were made with other settings."""
    from fwlora.train import CONFIG_FILE

    for cell in cells:
        path = Path(cell.config.output_dir) / CONFIG_FILE
        if path.is_file():
            old = read_json(path).get("config", {})
            old = {k: v for k, v in old.items() if k not in TrainConfig.NON_IDENTITY}
            if old != cell.config.identity():
                diff = sorted(k for k in set(old) | set(cell.config.identity()) if old.get(k) != cell.config.identity().get(k))
                raise UserError(f"{cell.config.output_dir} holds a run made with other settings ({', '.join(diff)}); "
                                "use a new --output-dir for a changed grid")


def run_bench(cells: list[Cell], output_dir: Path, retry_failed: bool = True, stop_on_error: bool = False) -> dict[str, str]:
    """Run every cell not yet complete; return {cell key: final status}."""
    from fwlora.train import run_status, train

    statuses: dict[str, str] = {}
    todo = [c for c in cells if run_status(Path(c.config.output_dir)) != "complete"]
    done = len(cells) - len(todo)
    log.info("bench: %d runs in the grid, %d already complete, %d to run", len(cells), done, len(todo))
    for c in cells:
        if c not in todo:
            statuses[c.key] = "complete"
    for i, cell in enumerate(todo, start=1):
        run_dir = Path(cell.config.output_dir)
        status = run_status(run_dir)
        if status == "failed" and not retry_failed:
            statuses[cell.key] = "failed"
            continue
        log.info("[%d/%d] %s", i, len(todo), cell.key)
        start = time.perf_counter()
        try:
            train(cell.config, resume=status in ("running", "interrupted"), overwrite=status == "failed")
            statuses[cell.key] = "complete"
        except TrainingInterrupted:
            raise
        except Exception as e:  # one bad run must not cost the others
            statuses[cell.key] = "failed"
            recorded = read_json(run_dir / "result.json") if (run_dir / "result.json").is_file() else {}
            if recorded.get("status") != "failed":  # keep what train() recorded (step, epochs so far)
                recorded = {}
            write_json(run_dir / "result.json", {
                **recorded, "status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                "config": cell.config.to_dict(), "task": cell.task, "method": cell.method, "seed": cell.seed})
            log.error("%s failed after %.0f s: %s (recorded; the bench goes on)", cell.key, time.perf_counter() - start, e)
            if stop_on_error:
                raise
    return statuses


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="run LoRA, AdaLoRA and FW-LoRA over tasks, budgets and seeds, then report",
        description="Run the comparison grid (resumable: complete runs are skipped, an interrupted run "
                    "continues from its checkpoint, a failed run is recorded and retried on the next call), "
                    "then write the report into the output directory and print its main table.",
        epilog="presets: " + ", ".join(preset_names()) + " (see src/fwlora/presets/; a path to your own YAML works too)\n"
               "examples:\n  fwlora bench --preset quick --output-dir runs/quick\n"
               "  fwlora bench --preset cpu --output-dir runs/cpu\n"
               "  fwlora bench --tasks cola,sst2 --methods lora,adalora,fwlora --budgets 0.1,0.2,0.5 --seeds 3 \\\n"
               "      --set model=roberta-base --output-dir runs/mine",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="a named preset or a YAML file (grid + shared training settings)")
    p.add_argument("--output-dir", required=True, help="where the run directories and the report go")
    p.add_argument("--tasks", help="comma-separated GLUE tasks (overrides the preset)")
    p.add_argument("--methods", help="comma-separated methods among lora, adalora, fwlora")
    p.add_argument("--budgets", help="comma-separated budgets in %% of the backbone")
    p.add_argument("--ranks", help="comma-separated LoRA ranks (instead of budgets)")
    p.add_argument("--seeds", type=int, help="number of seeds (0..N-1)")
    p.add_argument("--data-dir", help="GLUE directory (default: $FWLORA_DATA_DIR, then the hub)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training setting for every run (YAML value), e.g. --set epochs=1; repeatable")
    p.add_argument("--no-retry-failed", action="store_true", help="leave runs recorded as failed alone")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state, run nothing")
    p.set_defaults(handler=cmd_bench)


def parse_sets(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: cannot read the value") from None
    return out


def cmd_bench(args: argparse.Namespace) -> int:
    from fwlora import report
    from fwlora.train import quiet_transformers, run_status

    preset = load_preset(args.preset) if args.preset else {"source": "command line"}
    train_overrides = parse_sets(args.set)
    if args.data_dir:
        train_overrides["data_dir"] = args.data_dir
    output_dir = Path(args.output_dir)
    cells = plan(preset, output_dir, {"tasks": args.tasks, "methods": args.methods, "budgets": args.budgets,
                                      "ranks": args.ranks, "seeds": args.seeds}, train_overrides)
    if args.dry_run:
        for c in cells:
            print(f"{c.key:40s} {run_status(Path(c.config.output_dir)) or 'to run'}")
        return 0
    check_existing(cells)
    with quiet_transformers():
        warn_colliding_budgets(cells)
        write_json(output_dir / "bench.json", {
            "command": " ".join(["fwlora"] + sys.argv[1:]), "preset": preset, "set": train_overrides,
            "runs": [c.key for c in cells]})
        statuses = run_bench(cells, output_dir, retry_failed=not args.no_retry_failed)
    failed = [k for k, s in statuses.items() if s != "complete"]
    if not args.no_report:
        summary = report.write_report([output_dir], output_dir / "report")
        print(summary["main_table"])
        print(f"\nreport: {output_dir / 'report' / 'report.md'}")
    if failed:
        print(f"\n{len(failed)} run(s) failed: " + ", ".join(failed) + " (errors in their result.json; "
              "run the same command again to retry)", file=sys.stderr)
        return 1
    return 0
