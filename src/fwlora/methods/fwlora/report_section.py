"""FW-LoRA's own section of a report: the first open question of docs/method.md. Does the penalty's
(1 - I_m) weighting reallocate the budget between matrices, or is it a near-uniform decay on dW?

The numbers come from FW-LoRA's per-matrix importance I_m and from its final ‖dW_m‖ matched by matrix name
with the reference column's run of the same seed; the rival's shift against the reference is given as the
scale of a method that does reallocate. Every statistic is computed per seed, then averaged.
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fwlora import analysis
from fwlora.checks import is_finite_real
from fwlora.markdown import finite_values, fmt, fmt_signed, markdown_table
from fwlora.methods.base import ReportCell, ReportView
from fwlora.methods.registry import label as method_label
from fwlora.methods.registry import rival_name
from fwlora.records import RunRecord

HEADING = "### Open question 1: reallocation or uniform decay?"
READING = ("Reading: the relative range of (1 − I_m) is (max − min) / mean, 0 for a uniform weight decay on "
           "dW. The log ratio compares the final ‖dW_m‖ of {name} with {ref}'s run of the same seed, matrix "
           "by matrix: a mean below 0 is shrinkage; a spread near 0 with a Spearman near 1 means every "
           "matrix was scaled alike (a uniform decay), not reallocated. Spearman(I_m, ratio) > 0 means the "
           "low-importance matrices were shrunk more, as the method intends. {rival}'s shift against {ref} "
           "is given as the scale of a method that does reallocate. Statistics are computed per seed and "
           "averaged.")
SHRINKAGE = ("- {where}: {name}'s final ‖dW_m‖ is on average {size:.2g} % {direction} than {ref}'s "
             "(geometric mean over matrices and {pairs} seed(s)); the log ratio varies by {spread} (std) "
             "across matrices")
SHIFT_MEANS = ("mean_log_ratio", "std_log_ratio", "geometric_mean_ratio", "spearman", "importance_spearman")


@dataclass(frozen=True)
class SeedShift:
    """One seed: log(‖dW_m‖ column / ‖dW_m‖ reference) over the matrices both runs have."""

    seed: int
    mean_log_ratio: float
    std_log_ratio: float
    geometric_mean_ratio: float
    spearman: float  # of the two columns' ‖dW_m‖ orderings
    n: int
    # Spearman(I_m, ratio): > 0 when the low-importance matrices shrink more
    importance_spearman: float | None = None
    importance_n: int | None = None


@dataclass(frozen=True)
class NormShift:
    """A column's per-matrix update against the reference's, per seed and as means over seeds (None: no finite
    value in any seed)."""

    pairs: int  # seeds with both runs
    by_seed: tuple[SeedShift, ...] = ()
    mean_log_ratio: float | None = None
    std_log_ratio: float | None = None
    geometric_mean_ratio: float | None = None
    spearman: float | None = None
    importance_spearman: float | None = None


@dataclass(frozen=True)
class ImportanceSpread:
    """I_m over the matrices of one run, averaged over runs."""

    min: float
    median: float
    max: float
    max_over_min: float
    matrices: float
    uniform: float | None  # 1 / matrices: every matrix equally important


@dataclass(frozen=True)
class WeightSpread:
    """The penalty weights (1 - I_m): their spread, and their relative range (max - min) / mean: 0 for a
    uniform decay."""

    min: float
    median: float
    max: float
    relative_range: float
    relative_range_by_seed: tuple[float | None, ...]


@dataclass(frozen=True)
class PenaltyQuestion:
    """The open question's numbers in one cell."""

    runs: int  # FW-LoRA's complete runs
    importance: ImportanceSpread | None
    weights: WeightSpread | None
    shift: NormShift  # FW-LoRA against the reference
    rival_shift: NormShift  # the rival against the reference
    effective_rank: Mapping[str, float]  # column -> mean effective rank over matrices and seeds


def _mean(values: Sequence[object]) -> float:
    return statistics.fmean(finite_values(values) or [float("nan")])


def norm_shift(base: Mapping[int, RunRecord], other: Mapping[int, RunRecord],
               with_importance: bool) -> NormShift:
    """log(‖dW‖ other / ‖dW‖ base) per matrix, matched by name within a seed, summarised per seed."""
    rows = []
    for seed in sorted(set(other) & set(base)):
        a, b = base[seed].matrices_by_name(), other[seed].matrices_by_name()
        names = [n for n in a if n in b]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a constant ordering gives no correlation: NaN is the answer
            shift = analysis.log_norm_shift([a[n].get("fro_norm") or 0.0 for n in names],
                                            [b[n].get("fro_norm") or 0.0 for n in names])
        if with_importance:
            rho = analysis.importance_shrink_correlation([b[n].get("importance") for n in names],
                                                         [a[n].get("fro_norm") for n in names],
                                                         [b[n].get("fro_norm") for n in names])
            shift |= {"importance_spearman": rho["spearman"], "importance_n": rho["n"]}
        rows.append(SeedShift(seed=seed, **shift))
    if not rows:
        return NormShift(0)
    means = {k: statistics.fmean(v) if (v := finite_values([getattr(r, k) for r in rows])) else None
             for k in SHIFT_MEANS}
    return NormShift(len(rows), tuple(rows), **means)


def _importance(runs: Mapping[int, RunRecord]) -> tuple[ImportanceSpread | None, WeightSpread | None]:
    """I_m's spread over the matrices of each run and the weights' (1 - I_m), averaged over runs."""
    spreads, weights = [], []
    for rec in runs.values():
        imp = finite_values([m.get("importance") for m in rec.matrices or []])
        if imp:
            ratio = max(imp) / min(imp) if min(imp) > 0 else None
            spreads.append(analysis.spread(imp) | {"max_over_min": ratio, "matrices": len(imp)})
            weights.append(analysis.uniformity_of_weights(imp))
    if not spreads:
        return None, None
    mean = {k: _mean([s.get(k) for s in spreads])
            for k in ("min", "median", "max", "max_over_min", "matrices")}
    importance = ImportanceSpread(**mean, uniform=1.0 / mean["matrices"] if mean["matrices"] else None)
    means = [_mean([w.get(k) for w in weights]) for k in ("min", "median", "max", "relative_range")]
    weight = WeightSpread(*means, tuple(w.get("relative_range") for w in weights))
    return importance, weight


def penalty_question(cell: ReportCell, view: ReportView, method: str) -> PenaltyQuestion:
    """`method`: FW-LoRA's registered name; its column is its own, else its first variant."""
    column, rival = view.column_of(method), rival_name()
    rival_column = view.column_of(rival) if rival else None
    runs = cell.runs.get(column, {}) if column else {}
    base = cell.runs.get(view.reference, {})
    effective = {}
    for label, by_seed in cell.runs.items():
        values = finite_values([m.get("effective_rank") for r in by_seed.values() for m in r.matrices or []])
        if values:
            effective[label] = float(analysis.spread(values)["mean"])
    rival_runs = cell.runs.get(rival_column, {}) if rival_column else {}
    return PenaltyQuestion(len(runs), *_importance(runs), norm_shift(base, runs, with_importance=True),
                           norm_shift(base, rival_runs, with_importance=False), effective)


def _row(cell: ReportCell, q: PenaltyQuestion, labels: Sequence[str]) -> list:
    imp, w, fw, rival = q.importance, q.weights, q.shift, q.rival_shift
    return [f"{cell.task} {cell.budget_label}", q.runs,
            f"{fmt(imp.min * 100, 2)} / {fmt(imp.median * 100, 2)} / {fmt(imp.max * 100, 2)} "
            f"(uniform {fmt(100 * (imp.uniform or float('nan')), 2)})" if imp else "—",
            fmt(imp.max_over_min, 1) if imp else "—",
            f"{fmt(w.min, 4)} / {fmt(w.median, 4)} / {fmt(w.max, 4)}" if w else "—",
            fmt(w.relative_range, 4) if w else "—",
            f"{fmt_signed(fw.mean_log_ratio)} ± {fmt(fw.std_log_ratio)} (n={fw.pairs})" if fw.pairs else "—",
            fmt(fw.spearman, 2) if fw.pairs else "—",
            fmt(fw.importance_spearman, 2) if fw.pairs else "—",
            f"{fmt_signed(rival.mean_log_ratio)} ± {fmt(rival.std_log_ratio)}" if rival.pairs else "—",
            " / ".join(fmt(q.effective_rank.get(lb), 2) for lb in labels)]


def section(view: ReportView, method: str) -> str:
    """The heading, a table with a row per cell where FW-LoRA has runs, how to read it, and per cell the
    size of the shrinkage; or why the question cannot be answered from this protocol."""
    own = method_label(method)
    column, rival = view.column_of(method), rival_name()
    name = view.names.get(column, column) if column and view.cells else own
    ref = view.names.get(view.reference, view.reference)
    rival = method_label(rival) if rival else "the rival"
    questions = [(cell, penalty_question(cell, view, method)) for cell in view.cells]
    answered = [(cell, q) for cell, q in questions if q.importance or q.shift.pairs]
    if not answered:
        why = (f"No {own} run is complete in this protocol: the question cannot be answered from it."
               if column and view.cells else
               f"No {own} runs in this protocol: the question ({own}'s) cannot be answered from it.")
        return "\n".join([HEADING, "", why])
    header = ["task budget", "FW seeds", "I_m in %: min / median / max", "I max/min",
              "(1 − I_m): min / median / max", "(1 − I) relative range",
              f"log(‖dW‖ FW / {ref}): mean ± spread",
              f"Spearman ‖dW‖ FW vs {ref}", f"Spearman(I_m, ‖dW‖ FW/{ref})", f"log(‖dW‖ {rival} / {ref})",
              "mean effective rank " + " / ".join(view.names.get(lb, lb) for lb in view.labels)]
    lines = [HEADING, "", markdown_table(header, [_row(cell, q, view.labels) for cell, q in answered]), "",
             READING.format(name=name, ref=ref, rival=rival)]
    for cell, q in questions:
        g, where = q.shift.geometric_mean_ratio, f"{cell.task} {cell.budget_label}"
        if is_finite_real(g):
            lines.append(SHRINKAGE.format(where=where, name=name, size=abs(1 - g) * 100, ref=ref,
                                          direction="smaller" if g < 1 else "larger", pairs=q.shift.pairs,
                                          spread=fmt(q.shift.std_log_ratio, 3)))
        if q.shift.pairs > 1:
            per = ", ".join(f"seed {x.seed}: {fmt(x.importance_spearman, 2)}" for x in q.shift.by_seed)
            lines.append(f"- {where}: Spearman(I_m, ratio) by seed: {per}")
    return "\n".join(lines)
