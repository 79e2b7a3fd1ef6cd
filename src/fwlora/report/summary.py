"""A protocol's report as one frozen object, built once from its runs: its columns, its cells (task x budget),
the pooled views, what the runs were made with, and each method's own section. The markdown (render.py), the
figures (plots.py, heatmaps.py), summary.json and summary.csv (write.py) are views over it.

Columns are labels (a method, or a bench's named variant of one), ordered by the method registry and then by
label. Every column is compared with the reference (the registry's reference method unless told otherwise)
and with the rival (when present); each comparison gets a verdict line, and every column but the reference a
time verdict: its method's claim (the registry's).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fwlora import methods
from fwlora.methods.base import ReportCell, ReportView
from fwlora.report.cells import Cell, build_cell, complete_records, with_verdicts
from fwlora.report.columns import Columns, columns_of
from fwlora.report.load import LrChoice, Protocol, Run, budget_sort_key
from fwlora.report.settings import (Environment, ProtocolSettings, Provenance, protocol_env,
                                    protocol_settings, provenance)
from fwlora.report.verdicts import BudgetPool, TaskPool, cell_verdicts, pool_over_budgets, pool_over_tasks


@dataclass(frozen=True)
class MethodSection:
    """A method's own part of the report (methods/base.py Method.report_section), as markdown."""

    method: str
    markdown: str


@dataclass(frozen=True)
class ProtocolReport:
    label: str
    root: Path
    split: Mapping[str, Any]  # the settings that tell this split of a directory apart
    notes: tuple[str, ...]
    columns: Columns = field(metadata={"json": "flatten"})  # summary.json: methods, method_of, names, ...
    tasks: tuple[str, ...]
    cells: tuple[Cell, ...]
    pooled: Mapping[str, BudgetPool]  # task -> its cells pooled over budgets
    pooled_over_tasks: TaskPool | None
    settings: ProtocolSettings
    env: Environment
    provenance: Provenance = field(metadata={"json": "bench"})
    counts: Mapping[str, int]  # status -> runs
    lr_choice: LrChoice | None  # how a frozen preset chose each column's learning rate
    sections: tuple[MethodSection, ...]
    plots: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # figure kind -> files, once drawn


def summarise_protocol(p: Protocol, reference: str | None = None) -> ProtocolReport:
    """Every number of one protocol's report. `reference`: the column every other is compared with."""
    cols = columns_of(p, reference)
    by_cell = runs_by_cell(p)
    cells = []
    for (task, budget), runs in by_cell.items():
        cell = build_cell(p, cols, task, budget, runs)
        cells.append(with_verdicts(cell, cell_verdicts(cell, cols)))
    view = report_view(p, cols)
    sections = tuple(MethodSection(name, text) for name, cls in methods.REGISTRY.items()
                     if (text := cls.report_section(view)))
    return ProtocolReport(
        label=p.label, root=p.root, split=p.split, notes=p.notes, columns=cols,
        tasks=tuple(_ordered_tasks(p)), cells=tuple(cells), pooled=pool_over_budgets(cells, cols),
        pooled_over_tasks=pool_over_tasks(cells, cols),
        settings=protocol_settings(p, cols), env=protocol_env(p), provenance=provenance(p),
        counts=dict(sorted(_count_status(p).items())), lr_choice=p.bench.lr_choice if p.bench else None,
        sections=sections)


def runs_by_cell(p: Protocol) -> dict[tuple[str, str], dict[str, dict[int, Run]]]:
    """(task, budget) -> label -> seed -> run, in the report's order: tasks as the bench ran them, budgets by
    size; a cell the bench planned but that holds nothing yet is there, empty."""
    found: dict[tuple[str, str], dict[str, dict[int, Run]]] = defaultdict(lambda: defaultdict(dict))
    for r in p.runs:
        found[(r.task, r.budget_label)][r.label][r.seed] = r
    for task, budget, _label, _seed in p.expected:
        found[(task, budget)]
    return {(task, budget): found[(task, budget)] for task in _ordered_tasks(p)
            for budget in sorted({b for t, b in found if t == task}, key=budget_sort_key)}


def report_view(p: Protocol, cols: Columns | None = None) -> ReportView:
    """What a method's own section reads: the columns and, per cell in the report's order, every column's
    complete runs (an empty mapping for a column without one)."""
    cols = cols or columns_of(p)
    cells = tuple(ReportCell(task, budget, {lb: complete_records(runs.get(lb, {})) for lb in cols.labels})
                  for (task, budget), runs in runs_by_cell(p).items())
    return ReportView(cols.labels, cols.names, cols.method_of, cols.reference, cells)


def _ordered_tasks(p: Protocol) -> list[str]:
    """The bench's task order, then tasks it did not plan (alphabetically)."""
    order = list(p.bench.task_order) if p.bench else []
    planned = [t for t in order if any(r.task == t for r in p.runs) or any(e[0] == t for e in p.expected)]
    return planned + sorted({r.task for r in p.runs} - set(order))


def _count_status(p: Protocol) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for r in p.runs:
        counts[str(r.status)] += 1
    have = {r.key for r in p.runs}
    counts["missing"] = len([e for e in p.expected if e not in have])
    return counts
