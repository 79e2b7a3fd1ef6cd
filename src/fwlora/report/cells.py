"""One cell of a protocol (a task at a budget): each column's statistics over seeds and the paired differences
between columns, built once from the runs' records.

Per column: seeds done, the metric's mean and sample std at the final and at the best epoch (best in the
metric's direction), parameters trained, time, and time ratios to the reference (the median over seeds of
column / reference with the same seed, from the total training time and from the median step time).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fwlora.checks import is_finite_real
from fwlora.records import RunRecord, Status
from fwlora.report.columns import Columns
from fwlora.report.load import Protocol, Run
from fwlora.report.matrices import MatrixStats, matrix_stats
from fwlora.report.stats import (MeanStd, PairedInterval, RatioSummary, at_majority, mean_std, median_ratio,
                                 paired_ci)

# a warm-up's step times, shown where a method has a measuring warm-up
WARMUP_TIMING = ("warmup_step_seconds_median", "after_warmup_step_seconds_median", "warmup_seconds")


@dataclass(frozen=True)
class SeedCount:
    """How many of a column's expected seeds are complete, and where the others stand."""

    expected: int
    complete: int
    failed: int = 0
    running: int = 0
    interrupted: int = 0
    pruned: int = 0
    unreadable: int = 0
    missing: int = 0  # planned by the bench, no run directory

    @property
    def text(self) -> str:
        """'3/3 seeds', '2/3 seeds, 1 failed', '0/3 seeds, 2 running, 1 missing'."""
        kinds = ("failed", "running", "interrupted", "pruned", "unreadable", "missing")
        others = [f"{getattr(self, k)} {k}" for k in kinds if getattr(self, k)]
        return f"{self.complete}/{self.expected} seed{'s' if self.expected != 1 else ''}" + \
            (", " + ", ".join(others) if others else "")


@dataclass(frozen=True)
class ParamsTrained:
    """Adapter parameters trained at the first step, at the last, and their mean over steps (a method that
    resizes its adapter changes them)."""

    initial: float | None
    final: float | None
    mean: float | None


@dataclass(frozen=True)
class AdapterSize:
    """The budget block of a column's first complete run."""

    rank: int | None
    budget_percent: float | None  # the budget: the reference method's adapter at this rank, % of the backbone
    adapter_params: int | None  # trainable adapter parameters (the head apart)
    params: ParamsTrained | None  # None in release 1's records
    head_params: int | None
    backbone_params: int | None
    actual_percent: float | None  # what it spent (the mean over steps where recorded), % of the backbone


@dataclass(frozen=True)
class ColumnStats:
    """One column in one cell, over its seeds."""

    seeds: SeedCount = field(metadata={"json": "flatten"})
    seeds_complete: tuple[int, ...]
    errors: Mapping[int, str]  # seed -> why it failed or could not be read
    final_by_seed: Mapping[int, float | None]
    final: MeanStd
    best: MeanStd
    best_epoch: MeanStd
    train_seconds: MeanStd
    step_seconds_median: MeanStd
    size: AdapterSize | None = field(default=None, metadata={"json": "flatten"})  # None: no complete run
    method_info: Mapping[str, Any] = field(default_factory=dict)
    final_total_rank: MeanStd | None = None
    warmup_step_seconds_median: MeanStd | None = None  # a method with a warm-up phase
    after_warmup_step_seconds_median: MeanStd | None = None
    warmup_seconds: MeanStd | None = None
    time_ratio: RatioSummary | None = None  # None for the reference, or where the reference has no run here
    step_ratio: RatioSummary | None = None
    at_majority: bool = False


@dataclass(frozen=True)
class Curve:
    """The metric per epoch, mean and std over seeds (a run without an epoch is left out of its mean)."""

    epochs: tuple[int, ...]
    mean: tuple[float | None, ...]
    std: tuple[float | None, ...]
    n: tuple[int, ...]


@dataclass(frozen=True)
class Cell:
    """One task at one budget. A cell joined from several summaries (benchmarks/pool_tasks.py) holds its
    paired differences only."""

    task: str
    budget_label: str
    higher_is_better: bool = True
    # (a, b) -> the paired differences a - b; summary.json says "pairs" (keys "a-b"), which readers use
    differences: Mapping[tuple[str, str], PairedInterval] = field(default_factory=dict,
                                                                   metadata={"json": "pairs"})
    metric: str | None = None
    majority: float | None = None  # what always predicting the majority class scores, where known
    rank: int | None = None
    budget_percent: float | None = None
    # label -> stats, in the protocol's order; summary.json says "methods", which readers use
    columns: Mapping[str, ColumnStats] = field(default_factory=dict, metadata={"json": "methods"})
    curves: Mapping[str, Curve] = field(default_factory=dict)
    matrices: MatrixStats | None = None
    verdicts: tuple[str, ...] = ()

    @property
    def title(self) -> str:
        return f"{self.task} {self.budget_label}"


# ---- one record ------------------------------------------------------------------------------------


def best_entry(rec: RunRecord) -> dict[str, Any]:
    """The best epoch by the headline metric in the record's direction (lower is better for a loss);
    the record's own `best` when its epochs do not carry the metric."""
    scored = [e for e in rec.epochs or [] if is_finite_real(e.get(rec.metric))]
    if not scored:
        return rec.best or {}
    pick = max if rec.higher_is_better else min
    return pick(scored, key=lambda e: float(e[rec.metric]))


def finite(value: Any) -> float | None:
    """A clock's reading as a float; None where not measured or not finite."""
    return float(value) if is_finite_real(value) else None


def majority_value(records: Sequence[RunRecord], metric: str | None) -> float | None:
    """What a constant majority-class predictor scores on the eval set: from the records' data
    (schema 2), else 0 for MCC (true of any constant predictor), else unknown."""
    for rec in records:
        v = ((rec.data or {}).get("majority") or {}).get(metric)
        if is_finite_real(v):
            return float(v)
    return 0.0 if metric == "mcc" else None


def task_metric(task: str) -> str | None:
    """The task's metric when no complete run says it (mcc for CoLA, accuracy otherwise)."""
    from fwlora.errors import UserError
    from fwlora.tasks import get_task

    try:
        return get_task(task).metric
    except UserError:  # an unknown task name in a hand-made directory: say nothing rather than fail
        return None


# ---- one column ------------------------------------------------------------------------------------


def complete_records(runs: Mapping[int, Run]) -> dict[int, RunRecord]:
    return {s: r.record for s, r in runs.items() if r.status == Status.COMPLETE and r.record is not None}


def _seed_count(runs: Mapping[int, Run], expected_seeds: Sequence[int]) -> SeedCount:
    counts: dict[str, int] = defaultdict(int)
    for r in runs.values():
        if r.status != Status.COMPLETE:
            status = str(r.status)
            counts[status if status in ("failed", "running", "interrupted", "pruned") else "unreadable"] += 1
    expected = sorted(set(expected_seeds) | set(runs))
    missing = len([s for s in expected if s not in runs])
    return SeedCount(len(expected), len(complete_records(runs)), missing=missing, **counts)


def _adapter_size(first: RunRecord) -> AdapterSize:
    b = first.budget
    backbone, adapter = b.backbone_params, b.adapter_trainable_params
    params = ParamsTrained(b.trained_adapter_params_initial, b.trained_adapter_params_final,
                           b.trained_adapter_params_mean)
    recorded = any(is_finite_real(v) for v in (params.initial, params.final, params.mean))
    spent = params.mean if is_finite_real(params.mean) else adapter  # the mean over steps where recorded
    usable = is_finite_real(spent) and spent and is_finite_real(backbone) and backbone
    return AdapterSize(b.rank, b.percent, adapter, params if recorded else None, b.head_params, backbone,
                       100.0 * spent / backbone if usable else None)


def column_stats(runs: Mapping[int, Run], expected_seeds: Sequence[int], reference: Mapping[int, Run] | None,
                 majority: float | None) -> ColumnStats:
    """One column's statistics. `reference`: the reference's runs in this cell (None: no time ratios)."""
    complete = complete_records(runs)
    final = {s: r.metric_value("final") for s, r in complete.items()}
    train = {s: finite(r.timing.train_seconds) for s, r in complete.items()}
    step = {s: finite(r.timing.step_seconds_median) for s, r in complete.items()}
    records = list(complete.values())
    extra: dict[str, Any] = {}
    if records:
        first = complete[min(complete)]
        extra.update(size=_adapter_size(first), method_info=first.method_info or {})
        totals = [(r.method_info or {}).get("final_total_rank") for r in records]
        if any(is_finite_real(v) for v in totals):
            extra["final_total_rank"] = mean_std(totals)
        for key in WARMUP_TIMING:
            values = [finite(getattr(r.timing, key)) for r in records]
            if any(v is not None for v in values):
                extra[key] = mean_std(values)
    if reference is not None:  # per seed, against the reference's run on the same machine (a bench resumed
        # in another session on another machine pairs only the runs each machine made)
        done = complete_records(reference)
        paired = [s for s in complete if s in done and complete[s].same_machine(done[s])]
        extra["time_ratio"] = median_ratio({s: train[s] for s in paired},
                                           {s: finite(done[s].timing.train_seconds) for s in paired})
        extra["step_ratio"] = median_ratio({s: step[s] for s in paired},
                                           {s: finite(done[s].timing.step_seconds_median) for s in paired})
    final_mean = mean_std(list(final.values()))
    return ColumnStats(
        seeds=_seed_count(runs, expected_seeds), seeds_complete=tuple(sorted(complete)),
        errors={s: r.error for s, r in runs.items() if r.error}, final_by_seed=final, final=final_mean,
        best=mean_std([best_entry(r).get(r.metric) for r in records]),
        best_epoch=mean_std([best_entry(r).get("epoch") for r in records]),
        train_seconds=mean_std(list(train.values())), step_seconds_median=mean_std(list(step.values())),
        at_majority=bool(complete) and at_majority(final_mean.mean, majority), **extra)


def curve(records: Sequence[RunRecord]) -> Curve:
    per_epoch: dict[int, list[float]] = defaultdict(list)
    for r in records:
        for e in r.epochs or []:
            v = e.get(r.metric)
            if is_finite_real(v) and e.get("epoch") is not None:
                per_epoch[int(e["epoch"])].append(float(v))
    epochs = sorted(per_epoch)
    stats = [mean_std(per_epoch[e]) for e in epochs]
    return Curve(tuple(epochs), tuple(s.mean for s in stats), tuple(s.std for s in stats),
                 tuple(s.n for s in stats))


# ---- one cell --------------------------------------------------------------------------------------


def build_cell(p: Protocol, cols: Columns, task: str, budget: str,
               runs: Mapping[str, Mapping[int, Run]]) -> Cell:
    """The cell's numbers; its verdict lines are added by the caller (verdicts.py reads the whole cell)."""
    seeds = {s for m in runs.values() for s in m} | {e[3] for e in p.expected if e[:2] == (task, budget)}
    reference = runs.get(cols.reference) if cols.reference in cols.labels else None
    done = {lb: complete_records(runs.get(lb, {})) for lb in cols.labels}
    records = [r for d in done.values() for r in d.values()]
    metric = records[0].metric if records else task_metric(task)
    majority = majority_value(records, metric)
    stats = {}
    for lb in cols.labels:
        expected = {e[3] for e in p.expected if e[:3] == (task, budget, lb)} if p.expected else seeds
        if runs.get(lb) or expected:
            stats[lb] = column_stats(runs.get(lb, {}), sorted(expected),
                                     reference if lb != cols.reference else None, majority)
    differences = {}
    for a, b in cols.pairs():
        common = sorted(set(done[a]) & set(done[b]))
        diffs = [done[a][s].metric_value("final") - done[b][s].metric_value("final") for s in common]
        differences[(a, b)] = paired_ci(diffs, common)
    size = [s.size for s in stats.values() if s.size]
    return Cell(task=task, budget_label=budget, metric=metric, majority=majority,
                higher_is_better=records[0].higher_is_better if records else True,
                rank=next((z.rank for z in size if z.rank), None),
                budget_percent=next((z.budget_percent for z in size if z.budget_percent), None),
                columns=stats, differences=differences,
                curves={lb: curve(list(done[lb].values())) for lb in cols.labels if done[lb]},
                matrices=matrix_stats(done, cols))


def with_verdicts(cell: Cell, verdicts: Sequence[str]) -> Cell:
    return replace(cell, verdicts=tuple(verdicts))
