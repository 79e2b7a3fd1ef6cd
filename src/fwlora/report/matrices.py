"""Per-matrix numbers of one cell: the first open question of docs/method.md (does a penalty method's (1 - I_m)
weighting reallocate the budget, or is it a near-uniform decay on dW?), where each column's update goes, and
the final rank patterns of the methods that allocate ranks (each method's rank_column, from the registry)."""

from __future__ import annotations

import statistics
import warnings
from typing import Any

from fwlora import analysis, methods
from fwlora.records import RunRecord
from fwlora.report.stats import finite



def rank_column(method: str) -> str | None:
    """The per-matrix column holding the method's final ranks (the registry's), or None."""
    cls = methods.method_class(method)
    return cls.rank_column if cls else None


def importance_sources(method_of: dict[str, str]) -> list[str]:
    """Columns whose runs record an importance per matrix, in registry order (a method's own column first)."""
    out = []
    for name, cls in methods.REGISTRY.items():
        if cls.importance_column:
            label = first_label(method_of, name)
            if label:
                out.append(label)
    return out


def _by_name(rec: RunRecord) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in rec.matrices or [] if m.get("name")}


def first_label(method_of: dict[str, str], method: str) -> str | None:
    """The column of a method's own runs (its name) or else its first variant."""
    if method_of.get(method) == method:
        return method
    return next((lb for lb, m in method_of.items() if m == method), None)


def _shifts(base: dict[int, RunRecord], other: dict[int, RunRecord], with_importance: bool) -> dict[str, Any]:
    """log(‖dW‖ other / ‖dW‖ base) per matrix, matched by name within a seed, summarised per seed."""
    rows = []
    for seed in sorted(set(other) & set(base)):
        a, b = _by_name(base[seed]), _by_name(other[seed])
        names = [n for n in a if n in b]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = analysis.log_norm_shift([a[n].get("fro_norm") or 0.0 for n in names],
                                        [b[n].get("fro_norm") or 0.0 for n in names])
        s["seed"] = seed
        if with_importance:
            s.update({f"importance_{k}": v for k, v in analysis.importance_shrink_correlation(
                [b[n].get("importance") for n in names], [a[n].get("fro_norm") for n in names],
                [b[n].get("fro_norm") for n in names]).items()})
        rows.append(s)
    if not rows:
        return {"pairs": 0}
    agg: dict[str, Any] = {"pairs": len(rows), "by_seed": rows}
    for k in ("mean_log_ratio", "std_log_ratio", "geometric_mean_ratio", "spearman", "importance_spearman"):
        vals = finite([r.get(k) for r in rows])
        if vals:
            agg[k] = statistics.fmean(vals)
    return agg


def rank_pattern(records: list[RunRecord], column: str) -> dict[str, Any] | None:
    """Spread of a final-rank column over matrices and seeds, the share pruned to 0, the mean total."""
    ranks = [finite([m.get(column) for m in r.matrices or []]) for r in records]
    ranks = [r for r in ranks if r]
    if not ranks:
        return None
    flat = [v for r in ranks for v in r]
    return analysis.spread(flat) | {"zero_fraction": sum(v == 0 for v in flat) / len(flat), "column": column,
                                    "total_mean": statistics.fmean(sum(r) for r in ranks), "matrices": len(ranks[0])}


def importance_vs_update(done: dict[str, dict[int, RunRecord]], method_of: dict[str, str]) -> dict[str, Any] | None:
    """Where the Fisher statistic points against where training puts its update: the share of the
    importance I_m on each matrix type (FW-LoRA's runs, else fwrank's), the share of ||dW_m||^2 on each
    type for every column, and Spearman(I_m, ||dW_m||) against each column's run of the same seed.
    A rank-allocation rule driven by I_m is only as good as this agreement."""
    source = next((lb for lb in importance_sources(method_of) if lb in done), None)
    if source is None:
        return None
    importance = {seed: {n: m.get("importance") for n, m in _by_name(rec).items()} for seed, rec in done[source].items()}
    importance = {seed: v for seed, v in importance.items() if any(x is not None for x in v.values())}
    if not importance:
        return None

    def mean_shares(per_seed: list[dict[str, float]]) -> dict[str, float]:
        kinds = {k for s in per_seed for k in s}
        return {k: statistics.fmean(finite([s.get(k) for s in per_seed]) or [float("nan")]) for k in kinds}

    out: dict[str, Any] = {"source": source, "seeds": len(importance),
                           "importance_share": mean_shares([analysis.share_by_kind(v) for v in importance.values()]),
                           "update_share": {}, "spearman": {}}
    for label, runs in done.items():
        shares, rhos = [], []
        for seed, rec in runs.items():
            norms = {n: (m.get("fro_norm") or 0.0) ** 2 for n, m in _by_name(rec).items()}
            shares.append(analysis.share_by_kind(norms))
            if seed in importance:
                names = [n for n in norms if n in importance[seed]]
                rhos.append(analysis.rank_correlation([importance[seed][n] for n in names], [norms[n] for n in names]))
        if shares:
            out["update_share"][label] = mean_shares(shares)
        if finite(rhos):
            out["spearman"][label] = statistics.fmean(finite(rhos))
    return out


def matrix_question(done: dict[str, dict[int, RunRecord]], method_of: dict[str, str], reference: str) -> dict[str, Any]:
    """The open question for one (task, budget): numbers from FW-LoRA's I_m and from ‖dW_m‖ matched by
    matrix name with the reference's run of the same seed (AdaLoRA's shift given as the scale of a
    method that does reallocate); effective ranks of every column; final rank patterns."""
    penalty = methods.with_figure("penalty_question")
    rival = methods.rival_name()
    fw_label = next((lb for lb in (first_label(method_of, m) for m in penalty) if lb), None)
    ada_label = first_label(method_of, rival) if rival else None
    fw = done.get(fw_label, {}) if fw_label else {}
    base = done.get(reference, {})
    ada = done.get(ada_label, {}) if ada_label else {}
    out: dict[str, Any] = {"fw_runs": len(fw), "fw_label": fw_label}
    per_run_i, per_run_w = [], []
    for rec in fw.values():
        imp = finite([m.get("importance") for m in rec.matrices or []])
        if imp:
            per_run_i.append(analysis.spread(imp) | {"max_over_min": max(imp) / min(imp) if min(imp) > 0 else None,
                                                     "matrices": len(imp)})
            per_run_w.append(analysis.uniformity_of_weights(imp))
    if per_run_i:
        keys_i = ("min", "median", "max", "max_over_min", "matrices")
        out["importance"] = {k: statistics.fmean(finite([s.get(k) for s in per_run_i]) or [float("nan")]) for k in keys_i}
        out["importance"]["uniform"] = 1.0 / out["importance"]["matrices"] if out["importance"]["matrices"] else None
        out["weights"] = {k: statistics.fmean(finite([s.get(k) for s in per_run_w]) or [float("nan")])
                          for k in ("min", "median", "max", "relative_range")}
        out["weights"]["relative_range_by_seed"] = [s.get("relative_range") for s in per_run_w]
    out["fw_vs_lora"] = _shifts(base, fw, with_importance=True)
    out["adalora_vs_lora"] = _shifts(base, ada, with_importance=False)
    out["effective_rank"] = {}
    for label, runs in done.items():
        vals = finite([m.get("effective_rank") for r in runs.values() for m in r.matrices or []])
        if vals:
            out["effective_rank"][label] = analysis.spread(vals)
    out["ranks"] = {}
    for label, runs in done.items():
        column = rank_column(method_of.get(label, label))
        pattern = rank_pattern(list(runs.values()), column) if column else None
        if pattern:
            out["ranks"][label] = pattern
    out["importance_vs_update"] = importance_vs_update(done, method_of)
    if ada_label in out["ranks"]:
        out["adalora_rank"] = out["ranks"][ada_label]
    return out
