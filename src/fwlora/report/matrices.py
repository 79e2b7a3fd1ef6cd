"""Per-matrix numbers of one cell that any method's runs give: the final rank pattern of each column whose
method allocates ranks (its rank_column, from the registry), and where each column's update goes beside where
an importance statistic points. (A method's own per-matrix question is its report section, methods/base.py.)
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fwlora import analysis, methods
from fwlora.records import RunRecord
from fwlora.report.columns import Columns
from fwlora.markdown import finite_values

Done = Mapping[str, Mapping[int, RunRecord]]  # column label -> seed -> a complete run's record


@dataclass(frozen=True)
class RankPattern:
    """A final-rank column's spread over matrices and seeds, the share of matrices pruned to rank 0, and the
    mean total rank of a run."""

    column: str  # the per-matrix column it was read from
    min: float
    q1: float
    median: float
    q3: float
    max: float
    mean: float
    std: float
    n: int
    zero_fraction: float
    total_mean: float
    matrices: int  # matrices per run


@dataclass(frozen=True)
class ImportanceVsUpdate:
    """Where an importance statistic points against where training puts its update: the importance's share on
    each matrix type (`source`'s runs), each column's share of ||dW_m||^2 on each type, and per column the
    Spearman correlation of I_m and ||dW_m|| over matrices (same seed), each a mean over seeds."""

    source: str  # the column whose runs give the importance
    seeds: int
    importance_share: Mapping[str, float]  # matrix type -> share
    update_share: Mapping[str, Mapping[str, float]]  # column -> matrix type -> share
    spearman: Mapping[str, float]  # column -> rho


@dataclass(frozen=True)
class MatrixStats:
    ranks: Mapping[str, RankPattern]  # column -> its final rank pattern (methods with a rank_column)
    importance_vs_update: ImportanceVsUpdate | None


def importance_sources(cols: Columns) -> list[str]:
    """Columns whose runs record an importance per matrix, in registry order (a method's own column first)."""
    out = []
    for name, cls in methods.REGISTRY.items():
        label = cols.column_of(name) if cls.importance_column else None
        if label:
            out.append(label)
    return out


def rank_pattern(records: Sequence[RunRecord], column: str) -> RankPattern | None:
    ranks = [finite_values([m.get(column) for m in r.matrices or []]) for r in records]
    ranks = [r for r in ranks if r]
    if not ranks:
        return None
    flat = [v for r in ranks for v in r]
    return RankPattern(column=column, **analysis.spread(flat),
                       zero_fraction=sum(v == 0 for v in flat) / len(flat),
                       total_mean=statistics.fmean(sum(r) for r in ranks), matrices=len(ranks[0]))


def _mean_shares(per_seed: list[dict[str, float]]) -> dict[str, float]:
    kinds = dict.fromkeys(k for s in per_seed for k in s)  # as first seen: an unknown kind keeps its place
    return {k: statistics.fmean(finite_values([s.get(k) for s in per_seed]) or [float("nan")]) for k in kinds}


def importance_vs_update(done: Done, cols: Columns) -> ImportanceVsUpdate | None:
    """A rank-allocation rule driven by I_m is only as good as the agreement this measures."""
    source = next((lb for lb in importance_sources(cols) if lb in done), None)
    if source is None:
        return None
    importance = {seed: {n: m.get("importance") for n, m in rec.matrices_by_name().items()}
                  for seed, rec in done[source].items()}
    importance = {seed: v for seed, v in importance.items() if any(x is not None for x in v.values())}
    if not importance:
        return None
    update_share, spearman = {}, {}
    for label, runs in done.items():
        shares, rhos = [], []
        for seed, rec in runs.items():
            norms = {n: (m.get("fro_norm") or 0.0) ** 2 for n, m in rec.matrices_by_name().items()}
            shares.append(analysis.share_by_kind(norms))
            if seed in importance:
                names = [n for n in norms if n in importance[seed]]
                rhos.append(analysis.rank_correlation([importance[seed][n] for n in names],
                                                      [norms[n] for n in names]))
        if shares:
            update_share[label] = _mean_shares(shares)
        if finite_values(rhos):
            spearman[label] = statistics.fmean(finite_values(rhos))
    return ImportanceVsUpdate(source, len(importance),
                              _mean_shares([analysis.share_by_kind(v) for v in importance.values()]),
                              update_share, spearman)


def matrix_stats(done: Done, cols: Columns) -> MatrixStats:
    """`done` holds every column of the protocol (an empty mapping where it has no complete run here)."""
    ranks = {}
    for label, runs in done.items():
        cls = cols.method_class(label)
        pattern = rank_pattern(list(runs.values()), cls.rank_column) if cls and cls.rank_column else None
        if pattern:
            ranks[label] = pattern
    return MatrixStats(ranks, importance_vs_update(done, cols))
