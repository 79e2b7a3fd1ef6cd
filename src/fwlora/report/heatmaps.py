"""The report's per-matrix heatmaps, laid out layer x matrix type for any architecture: the type ("kind")
is the module name after the layer index, ordered as a known architecture orders it (BERT, DeBERTa, MPNet,
LLaMA-style, GPT-2), else as first seen."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fwlora import analysis, methods
from fwlora.checks import is_finite_real
from fwlora.records import RunRecord
from fwlora.report.cells import Cell
from fwlora.report.plots import new_figure, save_png
from fwlora.report.summary import ProtocolReport


def matrix_means(records: Sequence[RunRecord], key: str) -> dict[tuple[int | None, str], float]:
    """Mean over runs of one per-matrix column, by (layer, kind), in the records' matrix order."""
    acc: dict[tuple[int | None, str], list[float]] = defaultdict(list)
    for r in records:
        for m in r.matrices or []:
            v = m.get(key)
            if is_finite_real(v):
                layer, kind = (m.get("layer"), m.get("kind")) if m.get("kind") else \
                    analysis.split_matrix_name(str(m.get("name")))
                acc[(layer, kind)].append(float(v))
    return {k: statistics.fmean(v) for k, v in acc.items()}


def importance_means(records: Sequence[RunRecord]) -> dict[tuple[int | None, str], float]:
    """I_m by (layer, kind): the records' importance column, else their Fisher scores over their sum."""
    values = matrix_means(records, "importance")
    if values:
        return values
    fisher = matrix_means(records, "fisher")
    total = sum(fisher.values())
    return {k: v / total for k, v in fisher.items()} if total > 0 else {}



def _heatmap(fig: Any, ax: Any, values: dict, title: str, cmap: str = "viridis", vmin: float | None = None,
             vmax: float | None = None, annotate: str | None = None, norm: Any = None) -> None:
    if not values:
        ax.set_axis_off()
        ax.set_title(title + "\n(no data)", fontsize=9)
        return
    layers, kinds, grid = analysis.layer_kind_grid(values)
    im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=None if norm else vmin, vmax=None if norm else vmax,
                   norm=norm)
    ax.set_xticks(range(len(kinds)), [analysis.kind_label(k) for k in kinds], rotation=45, ha="right",
                  fontsize=8)
    ax.set_yticks(range(len(layers)), ["—" if v is None else str(v) for v in layers], fontsize=8)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.85)
    if annotate and grid.size <= 120:
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if np.isfinite(grid[i, j]):
                    r, g, b, _ = im.cmap(im.norm(grid[i, j]))
                    ax.text(j, i, format(grid[i, j], annotate), ha="center", va="center", fontsize=7,
                            color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")


def plot_importance(cell: Cell, records: Sequence[RunRecord], label: str, path: Path, name: str,
                    column: str = "importance") -> Path | None:
    values = matrix_means(records, column)
    if not values:
        return None
    from matplotlib.colors import LogNorm

    layers, kinds, _ = analysis.layer_kind_grid(values)
    fig = new_figure(1.0 * len(kinds) + 3.0, 0.45 * len(layers) + 2.2)
    ax = fig.subplots()
    pct = {k: 100 * v for k, v in values.items()}
    low, high = min(pct.values()), max(pct.values())
    log_scale = low > 0 and high / low > 20  # a few large scores would leave every other cell black
    _heatmap(fig, ax, pct, f"{name} importance I_m in % (mean over {len(records)} seed(s)); uniform = "
             f"{100 / len(values):.2f} %" + ("; log colour scale" if log_scale else ""),
             cmap="magma", annotate=".2f", norm=LogNorm(low, high) if log_scale else None)
    fig.suptitle(f"{label}: {cell.title}", fontsize=10)
    return save_png(fig, path)


def plot_matrices(cell: Cell, done: dict[str, list[RunRecord]], r: ProtocolReport, path: Path) -> Path | None:
    """‖dW‖ and effective rank per matrix for every column side by side (shared colour scale per row when
    comparable), the rival's final rank pattern, and the penalty method's ‖dW‖ over the reference's per
    matrix."""
    from matplotlib.colors import TwoSlopeNorm

    cols = r.columns
    labels = [lb for lb in cols.labels if done.get(lb)]
    if not labels:
        return None
    ref, name = cols.reference, cols.name
    norms = {m: matrix_means(done[m], "fro_norm") for m in labels}
    ranks = {m: matrix_means(done[m], "effective_rank") for m in labels}
    layers, _, _ = analysis.layer_kind_grid(next(iter(norms.values())) or {(0, "?"): 0.0})
    n = len(labels)
    fig = new_figure((n + 1) * 3.3, 2 * (0.3 * len(layers) + 2.0))
    axes = fig.subplots(2, n + 1, squeeze=False)
    nv = [v for d in norms.values() for v in d.values()]
    rv = [v for d in ranks.values() for v in d.values()]
    # one colour scale when the sizes are comparable; else each its own, or the smaller column's pattern
    # would be one flat colour (a rank-pruning method's updates can be far smaller than the reference's)
    medians = [statistics.median(d.values()) for d in norms.values() if d]
    shared = bool(medians) and min(medians) > 0 and max(medians) / min(medians) <= 3
    for j, m in enumerate(labels):
        _heatmap(fig, axes[0, j], norms[m], f"{name(m)}: ‖dW‖_F ({len(done[m])} seed(s))"
                 + ("" if shared else "\n(own colour scale)"),
                 vmin=min(nv, default=0) if shared else None, vmax=max(nv, default=1) if shared else None)
        _heatmap(fig, axes[1, j], ranks[m], f"{name(m)}: effective rank", cmap="cividis",
                 vmin=0, vmax=max(rv, default=1))
    rival = methods.rival_name()
    rival_cls = methods.method_class(rival) if rival else None
    rival_column = cols.column_of(rival) if rival else None
    rank_column = rival_cls.rank_column if rival_cls else None
    rival_ranks = matrix_means(done.get(rival_column) or [], rank_column) \
        if rival_column and rank_column else {}
    _heatmap(fig, axes[0, n], rival_ranks, f"{methods.label(rival) if rival else 'the rival'}: final rank "
             f"({rival_cls.rank_unit if rival_cls else 'rank'})", cmap="Oranges", annotate=".1f")
    penalty = cols.drawing("penalty_question")
    ratio = {}
    if penalty in norms and ref in norms:
        a, b = norms[penalty], norms[ref]
        ratio = {k: math.log2(a[k] / b[k]) for k in a if k in b and a[k] > 0 and b[k] > 0}
    span = max((abs(v) for v in ratio.values()), default=1.0) or 1.0
    _heatmap(fig, axes[1, n], ratio, f"log2(‖dW‖ {name(penalty) if penalty else 'penalty'} / {name(ref)})\n"
             "(mean ‖dW‖ over seeds)", cmap="coolwarm", norm=TwoSlopeNorm(0.0, -span, span),
             annotate=".2f" if span >= 0.05 else None)  # else: read the colour bar
    fig.suptitle(f"{r.label}: {cell.title}: final update per matrix", fontsize=10)
    return save_png(fig, path)


def plot_rank_allocation(cell: Cell, allocating: Sequence[RunRecord], rival: Sequence[RunRecord],
                         names: tuple[str, str], label: str, path: Path,
                         columns: tuple[str, str]) -> Path | None:
    """Three layer x matrix-type heatmaps side by side: a rank-allocating method's final ranks, the rival's
    final rank pattern (one colour scale for the two), and the importance it allocated by. columns: the
    per-matrix rank columns of the two (the registry's rank_column)."""
    mine, theirs = matrix_means(allocating, columns[0]), matrix_means(rival, columns[1])
    if not mine and not theirs:
        return None
    importance = {k: 100 * v for k, v in importance_means(allocating).items()}
    layers, kinds, _ = analysis.layer_kind_grid({**mine, **theirs, **importance} or {(0, "?"): 0.0})
    fig = new_figure(3 * (0.5 * len(kinds) + 2.0), 0.45 * len(layers) + 2.4)
    axes = fig.subplots(1, 3, squeeze=False)[0]
    top = max([*mine.values(), *theirs.values()], default=1.0) or 1.0
    _heatmap(fig, axes[0], mine, f"{names[0]}: final rank ({len(allocating)} seed(s))", cmap="Greens", vmin=0,
             vmax=top, annotate=".1f")
    _heatmap(fig, axes[1], theirs, f"{names[1]}: final rank ({len(rival)} seed(s))", cmap="Greens", vmin=0,
             vmax=top, annotate=".1f")
    _heatmap(fig, axes[2], importance, f"Fisher importance I_m in % ({names[0]}'s runs)", cmap="magma",
             annotate=".1f")
    fig.suptitle(f"{label}: {cell.title}: rank allocation and importance", fontsize=10)
    return save_png(fig, path)
