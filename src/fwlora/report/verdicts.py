"""The verdict lines of a report and its pooled views (over budgets, over tasks): each computed from the
intervals and ratios of the cells, each method's claim on time from the registry."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from fwlora import methods
from fwlora.methods.base import TimeHypothesis
from fwlora.report.cells import Cell
from fwlora.report.columns import Columns
from fwlora.report.stats import PairedInterval, difference_verdict, paired_ci
from fwlora.report.text import fmt, fmt_ci, fmt_ratio

Pair = tuple[str, str]  # (a, b): the difference a - b


@dataclass(frozen=True)
class PooledDifference:
    interval: PairedInterval
    verdict: str


@dataclass(frozen=True)
class PooledRatio:
    median: float
    n: int  # budget x seed pairs


@dataclass(frozen=True)
class BudgetPool:
    """One task over all its budgets: pairs are budget x seed."""

    budgets: tuple[str, ...]
    differences: Mapping[Pair, PooledDifference]
    time_ratio: Mapping[str, PooledRatio]  # column -> the median of every per-(budget, seed) ratio
    step_ratio: Mapping[str, PooledRatio]
    at_majority: Mapping[str, tuple[str, ...]]  # column -> the budgets where it did not learn
    verdicts: tuple[str, ...]


@dataclass(frozen=True)
class TaskPool:
    """Every task and budget at once: per seed the mean over cells of a paired difference, an interval over
    seeds."""

    tasks: tuple[str, ...]
    cells: tuple[str, ...]  # "task budget"
    differences: Mapping[Pair, PooledDifference]
    verdicts: tuple[str, ...]


def majority_words(names: Sequence[str], where: str = "") -> str:
    """'Mine at the majority class: did not learn' ('where' narrows it: ' at r1, r2')."""
    return f"{', '.join(names)} at the majority class{where}: did not learn"


def _flag(cell: Cell, cols: Columns, *labels: str | None) -> str:
    """' (X at the majority class: did not learn)' for the columns that did not learn; '' for none."""
    flagged = [cols.name(lb) for lb in dict.fromkeys(x for x in labels if x)
               if lb in cell.columns and cell.columns[lb].at_majority]
    return f" ({majority_words(flagged)})" if flagged else ""


def time_claim(hypothesis: TimeHypothesis | None) -> str:
    """'; hypothesis: ~1.01x, met if <= 1.02x': a method's claim on time as verdict lines state it ('' for
    none)."""
    return f"; hypothesis: {hypothesis.describe()}" if hypothesis is not None else ""


def _difference_line(cols: Columns, a: str, b: str, ci: PairedInterval, verdict: str) -> str:
    return f"{cols.name(a)} − {cols.name(b)}: {fmt_ci(ci)}: {verdict}"


def cell_verdicts(cell: Cell, cols: Columns) -> list[str]:
    """One line per comparison and per time hypothesis; a column at the majority class is flagged in every
    line that names it. The rival's own time line comes last."""
    lines = []
    hib, name, ref = cell.higher_is_better, cols.name, cols.reference
    rival_method = methods.rival_name()
    rival = cols.rival or (rival_method if ref == rival_method else None)
    rival_name = name(rival_method) if rival_method else "the rival"
    for a, b in cols.pairs():
        ci = cell.differences.get((a, b))
        if ci is not None:
            verdict = difference_verdict(ci, name(a), name(b), higher_is_better=hib)
            lines.append(_difference_line(cols, a, b, ci, verdict) + _flag(cell, cols, a, b))
    for lb in cols.labels:
        st = cell.columns.get(lb)
        vs_rival = cell.differences.get((lb, rival)) if rival else None
        if lb == ref or cols.is_rival(lb) or (vs_rival is None and (st is None or st.time_ratio is None)):
            continue
        ratio = st.time_ratio.median if st and st.time_ratio else None
        step = st.step_ratio.median if st and st.step_ratio else None
        head = (f"{name(lb)} vs {rival_name}: {fmt_ci(vs_rival)}: "
                f"{difference_verdict(vs_rival, name(lb), rival_name, higher_is_better=hib)}"
                if vs_rival is not None else f"{name(lb)} vs {rival_name}: no {rival_name} runs")
        hyp = cols.hypothesis(lb)
        verdict = f": {hyp.verdict(ratio, reference=name(ref))}" if hyp else ""
        lines.append(f"**Verdict**: {head}; {name(lb)} time {fmt_ratio(ratio, 3)} {name(ref)} (median step "
                     f"{fmt_ratio(step, 3)}{time_claim(hyp)}){verdict}"
                     + _flag(cell, cols, lb, rival if vs_rival is not None else None, ref))
        warmup = st.warmup_step_seconds_median if st and st.seeds.complete else None
        if warmup and warmup.mean is not None:
            after = st.after_warmup_step_seconds_median
            ref_stats = cell.columns.get(ref)
            ref_step = ref_stats.step_seconds_median.mean if ref_stats else None
            lines.append(f"{name(lb)} median step: {fmt(warmup.mean, 4)} s during "
                         f"{cols.warmup_phase(lb)}, {fmt(after.mean if after else None, 4)} "
                         f"s after it ({name(ref)}: {fmt(ref_step, 4)} s)")
    for lb in cols.labels:
        st = cell.columns.get(lb)
        if lb != ref and cols.is_rival(lb) and st is not None and st.time_ratio is not None:
            ratio, hyp = st.time_ratio.median, cols.hypothesis(lb)
            step = st.step_ratio.median if st.step_ratio else None
            verdict = f": {hyp.verdict(ratio, reference=name(ref))}" if hyp else ""
            lines.append(f"{name(lb)} time {fmt_ratio(ratio, 3)} {name(ref)} (median step "
                         f"{fmt_ratio(step, 3)}{time_claim(hyp)}){verdict}" + _flag(cell, cols, lb, ref))
    return lines


def _pooled_ratio(cells: Sequence[Cell], label: str, kind: str) -> PooledRatio | None:
    ratios = []
    for c in cells:
        summary = getattr(c.columns[label], kind) if label in c.columns else None
        ratios += list(summary.ratios.values()) if summary else []
    return PooledRatio(statistics.median(ratios), len(ratios)) if ratios else None


def pool_over_budgets(cells: Sequence[Cell], cols: Columns) -> dict[str, BudgetPool]:
    """Per task, over all its budgets: paired differences with pairs = budget x seed, the median of all
    per-(budget, seed) time ratios, and the verdict lines."""
    out = {}
    for task in dict.fromkeys(c.task for c in cells):
        mine = [c for c in cells if c.task == task]
        hib = mine[0].higher_is_better
        differences = {}
        for a, b in cols.pairs():
            ci = paired_ci([d for c in mine if (a, b) in c.differences for d in c.differences[(a, b)].diffs])
            verdict = difference_verdict(ci, cols.name(a), cols.name(b), unit="pairs", higher_is_better=hib)
            differences[(a, b)] = PooledDifference(ci, verdict)
        timed = [lb for lb in cols.labels if lb != cols.reference]
        ratios = {kind: {lb: r for lb in timed if (r := _pooled_ratio(mine, lb, kind))}
                  for kind in ("time_ratio", "step_ratio")}
        majority = {lb: tuple(c.budget_label for c in mine if lb in c.columns and c.columns[lb].at_majority)
                    for lb in cols.labels}
        pool = BudgetPool(tuple(c.budget_label for c in mine), differences, ratios["time_ratio"],
                          ratios["step_ratio"], {lb: where for lb, where in majority.items() if where}, ())
        out[task] = replace(pool, verdicts=tuple(_budget_pool_lines(pool, cols)))
    return out


def _budget_pool_lines(pool: BudgetPool, cols: Columns) -> list[str]:
    name, ref = cols.name, cols.reference

    def flag(*labels: str) -> str:
        notes = []
        for lb in dict.fromkeys(labels):
            where = pool.at_majority.get(lb)
            if where:
                at = "" if len(where) == len(pool.budgets) else f" at {', '.join(where)}"
                notes.append(majority_words([name(lb)], at))
        return f" ({'; '.join(notes)})" if notes else ""

    lines = [_difference_line(cols, a, b, d.interval, d.verdict) + flag(a, b)
             for (a, b), d in pool.differences.items()]
    for rival_pass in (False, True):  # the rival's time line last, as in a cell
        for lb in cols.labels:
            tr = pool.time_ratio.get(lb)
            if lb == ref or not tr or cols.is_rival(lb) != rival_pass:
                continue
            hyp = cols.hypothesis(lb)
            verdict = f": {hyp.verdict(tr.median, reference=name(ref))}" if hyp else ""
            claim = f"hypothesis ~{hyp.ratio:g}x" if hyp else ""
            head = f"{name(lb)} time {fmt_ratio(tr.median, 3)} {name(ref)} over {tr.n} pairs"
            if rival_pass:
                lines.append(head + (f" ({claim})" if hyp else "") + verdict + flag(lb, ref))
            else:
                step = pool.step_ratio.get(lb)
                lines.append(head + f" (median step {fmt_ratio(step.median if step else None, 3)}"
                             + (f"; {claim}" if hyp else "") + ")" + verdict + flag(lb, ref))
    return lines


def pool_over_tasks(cells: Sequence[Cell], cols: Columns) -> TaskPool | None:
    """Every task and budget at once, as the GLUE score averages its tasks' metrics: per seed, the mean
    over cells of (a - b) in each cell's own metric, then a Student t interval over seeds. Only seeds
    that every cell has a pair for count (each seed averages the same tasks); only for two or more
    tasks whose metrics all rise with quality."""
    tasks = tuple(dict.fromkeys(c.task for c in cells))
    if len(tasks) < 2 or not all(c.higher_is_better for c in cells):
        return None
    differences = {}
    for a, b in cols.pairs():
        per_cell = [dict(zip(d.seeds, d.diffs)) if (d := c.differences.get((a, b))) else {} for c in cells]
        seeds = sorted(set.intersection(*(set(d) for d in per_cell))) if per_cell else []
        means = [statistics.fmean(d[s] for d in per_cell) for s in seeds]
        ci = paired_ci(means, seeds)
        differences[(a, b)] = PooledDifference(ci, difference_verdict(ci, cols.name(a), cols.name(b)))
    lines = [_difference_line(cols, a, b, d.interval, d.verdict) for (a, b), d in differences.items()]
    return TaskPool(tasks, tuple(c.title for c in cells), differences, tuple(lines))
