"""Equal-effort learning rates: every method gets the same small lr grid on a design seed, the best final
validation metric picks its lr, and the choice is frozen into a preset before any evaluation seed runs.

A preset asks for it with an `lr_search` block:

    lr_search:
      lrs: [2.0e-4, 5.0e-4, 1.0e-3, 2.0e-3]
      seed: 100          # the design seed, apart from the evaluation seeds
      tasks: [cola]      # where the lrs are tried (default: the grid's tasks)
      ranks: [2]         # at which rank (default: the grid's first rank or budget)
      extend: 2          # a column whose best lr sits at the grid's end gets up to 2 more lrs beyond it

`fwlora bench --preset P --lr-search --output-dir D` runs one column per (method, lr) on the design seed
(label `<method>_lr<lr>`, ordinary run directories); where `extend` allows, a column whose choice sits at an end
of the grid is tried at the next lr beyond that end (the end pair's ratio), one at a time, until its choice is
inside its lrs or its extensions are spent: the same rule for every column, fixed before the search runs. It
then writes D/frozen.yaml: the preset with each method's chosen lr and an `lr_choice` block saying what every
lr scored and why the choice fell where it did.
Commit that file, then run the evaluation seeds with it; a bench refuses a frozen preset that git does not
hold unchanged (the held-out rule: the settings are fixed before an evaluation seed is seen).

The choice: per task, each lr's shortfall from that task's best lr (in the task's own metric, direction
included); the lr with the smallest summed shortfall wins; a tie goes to the smaller lr; a run that failed
or diverged scores as the worst lr of its task. Metrics on different scales (MCC, accuracy) are never added
directly, only their shortfalls.
"""

from __future__ import annotations

import copy
import logging
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fwlora.errors import UserError
from fwlora.records import RunRecord, Status, read_result

log = logging.getLogger(__name__)

FROZEN_FILE = "frozen.yaml"
RULE = ("the final epoch's validation metric on the design seed; per task each lr's shortfall from that task's "
        "best lr, summed over tasks, smallest wins; ties to the smaller lr; a failed run scores as its task's worst")


def lr_label(lr: float) -> str:
    """2e-4 -> '2e-4', 2.5e-4 -> '2.5e-4': short, exact, and safe in a directory name."""
    mantissa, exponent = f"{lr:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def column_label(column: str, lr: float) -> str:
    return f"{column}_lr{lr_label(lr)}"


@dataclass(frozen=True)
class LrSearch:
    """The preset's lr_search block, checked."""

    lrs: tuple[float, ...]
    seed: int = 100
    tasks: tuple[str, ...] = ()
    ranks: tuple[int, ...] = ()
    budgets: tuple[float, ...] = ()
    extend: int = 0  # lrs a column may get beyond an end of the grid where its choice sits

    @classmethod
    def from_preset(cls, preset: dict[str, Any]) -> "LrSearch | None":
        block = preset.get("lr_search")
        if block is None:
            return None
        source = preset.get("source", "preset")
        if not isinstance(block, dict) or set(block) - {"lrs", "seed", "tasks", "ranks", "budgets", "extend"}:
            raise UserError(f"{source}: lr_search takes lrs, seed, tasks, ranks, budgets or extend")
        try:
            lrs = tuple(float(v) for v in block.get("lrs") or ())
            seed = int(block.get("seed", 100))
            tasks = tuple(str(t) for t in block.get("tasks") or ())
            ranks = tuple(int(r) for r in block.get("ranks") or ())
            budgets = tuple(float(b) for b in block.get("budgets") or ())
            extend = block.get("extend", 0)
            if isinstance(extend, bool) or not isinstance(extend, int) or extend < 0:
                raise ValueError
        except (TypeError, ValueError):
            raise UserError(f"{source}: lr_search: lrs and budgets are numbers, seed and ranks integers, extend an "
                            "integer >= 0") from None
        if len(lrs) < 2 or any(not lr > 0 for lr in lrs) or len(set(lrs)) != len(lrs):
            raise UserError(f"{source}: lr_search.lrs needs two or more distinct positive learning rates")
        if ranks and budgets or len(ranks) > 1 or len(budgets) > 1:
            raise UserError(f"{source}: lr_search takes one rank or one budget (the lrs are chosen at one size)")
        return cls(tuple(sorted(lrs)), seed, tasks, ranks, budgets, extend)


def search_preset(preset: dict[str, Any], extended: dict[str, tuple[float, ...]] | None = None) -> dict[str, Any]:
    """The preset whose grid is the search: each column once per lr (and per lr of `extended[column]`, the lrs
    it earned beyond the grid's ends), on the design seed only."""
    search = LrSearch.from_preset(preset)
    if search is None:
        raise UserError(f"{preset.get('source', 'preset')} has no lr_search block: --lr-search needs one")
    out = copy.deepcopy(preset)
    grid = dict(out.get("grid") or {})
    variants = dict(out.get("variants") or {})
    columns = grid_columns(preset)
    new_columns = []
    for column in columns:
        base = dict(variants.get(column) or {"method": column})
        for lr in sorted({*search.lrs, *(extended or {}).get(column, ())}):
            label = column_label(column, lr)
            variants[label] = {**base, "lr": lr}
            new_columns.append(label)
    grid["methods"] = new_columns
    grid["seeds"] = [search.seed]
    if search.tasks:
        grid["tasks"] = list(search.tasks)
    if search.ranks:
        grid["ranks"], grid["budgets"] = list(search.ranks), None
    elif search.budgets:
        grid["budgets"], grid["ranks"] = list(search.budgets), None
    else:  # the grid's first size
        for key in ("ranks", "budgets"):
            sizes = grid.get(key)
            if sizes:
                items = sizes if isinstance(sizes, list) else str(sizes).split(",")
                grid[key] = [items[0]]
    out["grid"] = {k: v for k, v in grid.items() if v is not None}
    out["variants"] = variants
    return out


def fixed_by_search(preset: dict[str, Any]) -> dict[str, str]:
    """The grid keys the search sets whatever the grid says, each with what it sets them to: the design seed
    always; tasks and size where the lr_search block names them (a flag there would be silently replaced)."""
    search = LrSearch.from_preset(preset)
    if search is None:
        return {}
    fixed = {"seeds": f"the design seed {search.seed}"}
    if search.tasks:
        fixed["tasks"] = ", ".join(search.tasks)
    if search.ranks or search.budgets:
        size = f"rank {search.ranks[0]}" if search.ranks else f"budget {search.budgets[0]:g} %"
        fixed.update(ranks=size, budgets=size)
    return fixed


def grid_columns(preset: dict[str, Any]) -> list[str]:
    """The grid's columns (methods or variants), in order."""
    value = (preset.get("grid") or {}).get("methods") or []
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(c).strip() for c in items if str(c).strip()]


@dataclass
class ColumnChoice:
    """One column's trial: what every lr scored on every task, and the lr chosen."""

    column: str
    scores: dict[str, dict[str, float | None]] = field(default_factory=dict)  # task -> lr label -> metric
    shortfall: dict[str, float] = field(default_factory=dict)  # lr label -> summed shortfall
    chosen: float | None = None
    edge: str | None = None  # "largest" / "smallest": the choice sits at the grid's end, so a lr beyond may do better


def choose(columns: list[str], lrs: tuple[float, ...], records: list[RunRecord]) -> dict[str, ColumnChoice]:
    """Each column's lr by the rule in RULE, from the search's complete records."""
    by_key = {(str(rec.config.get("label") or rec.method), rec.task): rec for rec in records}
    tasks_seen = sorted({rec.task for rec in records})
    out = {}
    for column in columns:
        choice = ColumnChoice(column)
        totals = {lr_label(lr): 0.0 for lr in lrs}
        for task in tasks_seen:
            values: dict[str, float | None] = {}
            directions = set()
            for lr in lrs:
                rec = by_key.get((column_label(column, lr), task))
                if rec is None:
                    raise UserError(f"the lr search has no run of {column} at lr {lr:g} on {task}: "
                                    "run the search to its end first")
                if rec.status == Status.COMPLETE:  # a failed record does not know its task's direction
                    directions.add(rec.higher_is_better)
                value = rec.metric_value("final") if rec.status == Status.COMPLETE else None
                values[lr_label(lr)] = value if value is not None and value == value else None
            finite = [v for v in values.values() if v is not None]
            higher = directions.pop() if len(directions) == 1 else True
            if not finite:
                raise UserError(f"{column} failed at every lr on {task}: no lr can be chosen")
            best = max(finite) if higher else min(finite)
            worst = min(finite) if higher else max(finite)
            for label, value in values.items():
                score = worst if value is None else value
                totals[label] += (best - score) if higher else (score - best)
            choice.scores[task] = values
        choice.shortfall = totals
        choice.chosen = min(lrs, key=lambda lr: (round(totals[lr_label(lr)], 12), lr))
        if len(lrs) > 1:
            choice.edge = {max(lrs): "largest", min(lrs): "smallest"}.get(choice.chosen)
        out[column] = choice
    return out


def search_records(output_dir: Path, columns: list[str], search: LrSearch) -> list[RunRecord]:
    """The search's run records under the bench's output directory (any task and size it ran)."""
    records = []
    for path in sorted(Path(output_dir).glob(f"*/*/*/seed{search.seed}")):
        try:
            rec = read_result(path)
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: unreadable result ({e})") from None
        if rec is not None and any(str(rec.config.get("label") or "").startswith(c + "_lr") for c in columns):
            records.append(rec)
    return records


def beyond(lrs: tuple[float, ...], edge: str) -> float:
    """The next lr past the grid's `edge` end ("largest" / "smallest"), at the ratio of the end pair."""
    if edge == "largest":
        return lrs[-1] * (lrs[-1] / lrs[-2])
    return lrs[0] / (lrs[1] / lrs[0])


def column_lrs(search: LrSearch, column: str, records: list[RunRecord]) -> tuple[tuple[float, ...], float | None]:
    """A column's lrs so far (the grid, then each extension its records hold, in the order the rule asked for
    them) and the next lr the rule still owes it: None once its choice is inside its lrs or `extend` is spent."""
    tasks = {rec.task for rec in records}
    ended = {(str(rec.config.get("label") or ""), rec.task) for rec in records
             if rec.status in (Status.COMPLETE, Status.FAILED)}  # an interrupted run is owed until it ends
    lrs = tuple(search.lrs)
    while len(lrs) - len(search.lrs) < search.extend:
        edge = choose([column], lrs, records)[column].edge
        if edge is None:
            break
        lr = beyond(lrs, edge)
        if any((column_label(column, lr), task) not in ended for task in tasks):
            return lrs, lr
        lrs = tuple(sorted((*lrs, lr)))
    return lrs, None


def extensions(preset: dict[str, Any], output_dir: Path) -> tuple[dict[str, tuple[float, ...]], dict[str, float]]:
    """From the search's records: each column's lrs beyond the grid so far (those it is owed included), and the
    next lr each column is still owed. No lr owed: the search is finished."""
    search = LrSearch.from_preset(preset)
    if search is None or not search.extend:
        return {}, {}
    columns = grid_columns(preset)
    records = search_records(output_dir, columns, search)
    extended, owed = {}, {}
    for column in columns:
        lrs, lr = column_lrs(search, column, records)
        extra = set(lrs) - set(search.lrs) | ({lr} if lr is not None else set())
        if extra:
            extended[column] = tuple(sorted(extra))
        if lr is not None:
            owed[column] = lr
    return extended, owed


def freeze(preset: dict[str, Any], output_dir: Path, commit: str | None) -> tuple[Path, dict[str, ColumnChoice]]:
    """Write <output_dir>/frozen.yaml: the preset with each column's chosen lr and the lr_choice block."""
    search = LrSearch.from_preset(preset)
    if search is None:
        raise UserError(f"{preset.get('source', 'preset')} has no lr_search block")
    columns = grid_columns(preset)
    records = search_records(output_dir, columns, search)
    choices, extended = {}, {}
    for column in columns:
        lrs, owed = column_lrs(search, column, records)
        if owed is not None:
            raise UserError(f"{column}'s best lr sits at an end of the grid and lr {owed:g} beyond it has not run: "
                            "run the search to its end first")
        choices[column] = choose([column], lrs, records)[column]
        if len(lrs) > len(search.lrs):
            extended[column] = sorted(set(lrs) - set(search.lrs))
    frozen = {k: copy.deepcopy(v) for k, v in preset.items() if k not in ("source", "lr_search")}
    variants = frozen.setdefault("variants", {}) or {}
    per_method = frozen.setdefault("methods", {}) or {}
    for column, choice in choices.items():
        if column in variants:
            variants[column] = {**variants[column], "lr": choice.chosen}
        else:
            per_method[column] = {**(per_method.get(column) or {}), "lr": choice.chosen}
    frozen["variants"], frozen["methods"] = variants, per_method
    if not frozen["variants"]:
        del frozen["variants"]
    rule = RULE + (f"; a choice at an end of the grid earns the next lr beyond it, one at a time, up to "
                   f"{search.extend} per column" if search.extend else "")
    frozen["lr_choice"] = {
        "rule": rule, "seed": search.seed, "lrs": list(search.lrs), "from": preset.get("source"),
        "search_dir": str(output_dir), "search_commit": commit,
        "chosen": {c: ch.chosen for c, ch in choices.items()},
        "scores": {c: ch.scores for c, ch in choices.items()},
        "shortfall": {c: ch.shortfall for c, ch in choices.items()},
        "at_edge": {c: ch.edge for c, ch in choices.items() if ch.edge},
        **({"extend": search.extend, "extended": extended} if search.extend else {}),
    }
    path = Path(output_dir) / FROZEN_FILE
    header = (f"# Frozen by `fwlora bench --lr-search` from {preset.get('source')} (search runs: {output_dir}, "
              f"commit {commit or 'unknown'}).\n# Commit this file, then run the evaluation seeds with it:\n"
              f"#   fwlora bench --preset <this file> --output-dir <new directory>\n")
    path.write_text(header + yaml.safe_dump(frozen, sort_keys=False, width=110), encoding="utf-8")
    return path, choices


def describe(choices: dict[str, ColumnChoice]) -> str:
    """A small table: columns x lrs, the chosen lr marked."""
    lines = []
    for column, choice in choices.items():
        cells = []
        for label, total in choice.shortfall.items():
            mark = "*" if lr_label(choice.chosen or 0) == label else " "
            per_task = ", ".join(f"{t} {'failed' if v[label] is None else f'{v[label]:.4f}'}"
                                 for t, v in choice.scores.items())
            cells.append(f"  {mark} lr {label:8s} {per_task}  (shortfall {total:.4f})")
        edge = f" (the grid's {choice.edge} lr: one beyond it was not tried)" if choice.edge else ""
        lines.append(f"{column}: lr {lr_label(choice.chosen or 0)}{edge}")
        lines.extend(cells)
    return "\n".join(lines)


def check_committed(preset: dict[str, Any]) -> str | None:
    """A frozen preset (one with lr_choice) must be committed and unchanged before evaluation seeds run.
    Returns the commit that holds it (None outside a git checkout, said in the log); raises otherwise."""
    if "lr_choice" not in preset:
        return None
    source = str(preset.get("source", ""))
    path = Path(source)
    if not path.is_file():  # a packaged preset: it ships with the code, and so with the code's commit
        return None
    try:
        where = str(path.resolve().parent)
        name = path.resolve().name
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", name], cwd=where, capture_output=True)
        if tracked.returncode == 128:  # not a checkout, or one git will not read (ownership): cannot tell
            log.warning("%s: git cannot say whether it is committed (%s): its frozen lrs are not checked", path,
                        tracked.stderr.decode(errors="replace").strip().splitlines()[0] if tracked.stderr else "")
            return None
        changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", name], cwd=where).returncode
        commit = subprocess.run(["git", "log", "-1", "--format=%H", "--", name], cwd=where,
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        log.warning("git is not available: %s's frozen lrs cannot be checked as committed", path)
        return None
    if tracked.returncode != 0 or changed != 0 or not commit:
        raise UserError(f"{path} holds lrs chosen on the design seed but is not committed as it is: commit it "
                        "before any evaluation seed runs (git add + git commit), then run again")
    return commit
