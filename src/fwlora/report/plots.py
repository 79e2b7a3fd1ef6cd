"""The report's PNGs. matplotlib is imported inside the functions that draw (no pyplot, no global state),
so that reading and aggregating runs never needs it.

Heatmaps are laid out layer x matrix type for any architecture: the type ("kind") is the module name
after the layer index, ordered as a known architecture orders it (BERT, DeBERTa, MPNet, LLaMA-style,
GPT-2), else as first seen.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fwlora import analysis, methods
from fwlora.records import RunRecord
from fwlora.report.load import Protocol
from fwlora.report.matrices import first_label
from fwlora.report.text import ok, slug

# colours and line styles of columns whose method does not set its own (a variant's, a plug-in's without one);
# a method's own column takes its registry colour and style, so that two columns with equal numbers stay visible
_PALETTE = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray", "tab:blue",
            "tab:orange", "tab:green")
_STYLES = (("-.", "D"), ("-", "v"), ("--", "P"), (":", "X"), ("-.", "*"), ("-", "o"), ("--", "s"), (":", "^"))

def matrix_means(records: Sequence[RunRecord], key: str) -> dict[tuple[int | None, str], float]:
    """Mean over runs of one per-matrix column, by (layer, kind), in the records' matrix order."""
    acc: dict[tuple[int | None, str], list[float]] = defaultdict(list)
    for r in records:
        for m in r.matrices or []:
            v = m.get(key)
            if ok(v):
                layer, kind = (m.get("layer"), m.get("kind")) if m.get("kind") else analysis.split_matrix_name(str(m.get("name")))
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


# ---- drawing -----------------------------------------------------------------------------------------


def _save(fig: Any, path: Path) -> Path:
    """Save a PNG atomically: a temporary name in the same directory, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _figure(w: float, h: float) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global figure state, Agg canvas for PNGs

    return Figure(figsize=(w, h), layout="constrained")


def _own(label: str, attribute: str) -> Any:
    """The registry's colour or line style of a method's own column (a column named after its method)."""
    cls = methods.method_class(label)
    return getattr(cls, attribute) if cls is not None else None


def _pick(label: str, labels: Sequence[str], attribute: str, choices: Sequence[Any]) -> Any:
    """The column's own value, else the next of `choices` not taken by another column's own."""
    own = _own(label, attribute)
    if own is not None:
        return own
    taken = {_own(lb, attribute) for lb in labels} - {None}
    free = [c for c in choices if c not in taken] or list(choices)
    others = [lb for lb in labels if _own(lb, attribute) is None]
    return free[others.index(label) % len(free) if label in others else 0]


def _colour(label: str, labels: Sequence[str]) -> str:
    return _pick(label, labels, "colour", _PALETTE)


def _style(label: str, labels: Sequence[str]) -> tuple[str, str]:
    return tuple(_pick(label, labels, "line_style", _STYLES))


def _name(summary: dict[str, Any], label: str) -> str:
    return (summary.get("names") or {}).get(label, label)


def _budget_tick(cell: dict[str, Any]) -> str:
    pct = cell.get("lora_percent")
    return cell["budget_label"] + (f"\n{pct:.2f} %" if ok(pct) else "")


def _direction(cells: Sequence[dict[str, Any]]) -> str:
    return "" if all(c.get("higher_is_better", True) for c in cells) else ", lower is better"


def plot_metric_vs_budget(summary: dict[str, Any], path: Path) -> Path | None:
    tasks, labels = summary["tasks"], summary["methods"]
    if not any(c["curves"] for c in summary["cells"]):
        return None
    fig = _figure(max(5.5, 4.2 * len(tasks)), 3.4)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        cells = [c for c in summary["cells"] if c["task"] == task]
        x = np.arange(len(cells))
        for k, m in enumerate(labels):
            ys = [((c["methods"].get(m) or {}).get("final") or {}) for c in cells]
            mean = np.array([s.get("mean") if s.get("mean") is not None else np.nan for s in ys], float)
            err = np.array([s.get("std") or 0.0 for s in ys], float)
            if np.isfinite(mean).any():
                ls, marker = _style(m, labels)
                ax.errorbar(x + (k - (len(labels) - 1) / 2) * 0.06, mean, yerr=err, marker=marker, ls=ls, capsize=3,
                            label=_name(summary, m), color=_colour(m, labels))
        ax.set_xticks(x, [_budget_tick(c) for c in cells])
        ax.set_xlabel("budget (rank, LoRA % of backbone)")
        ax.set_ylabel(f"final {cells[0]['metric'] or 'metric'} (mean ± std over seeds{_direction(cells)})")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{summary['label']}: task metric at the final epoch vs budget", fontsize=10)
    return _save(fig, path)


def plot_time_ratios(summary: dict[str, Any], path: Path) -> Path | None:
    cells, labels, ref = summary["cells"], summary["methods"], summary.get("reference") or methods.reference_name()
    others = [m for m in labels if m != ref]
    if not cells or not others or not any((c["methods"].get(m) or {}).get("time_ratio", {}).get("median")
                                          for c in cells for m in others):
        return None
    fig = _figure(max(7.0, 1.1 * len(cells) + 2), 6.4)
    axes = fig.subplots(2, 1, squeeze=False)[:, 0]
    x = np.arange(len(cells))
    width = 0.8 / len(others)
    method_of = summary.get("method_of") or {}
    hypotheses = {}  # one dashed line per method claim among the columns, in its method's colour
    for m in others:
        hyp = methods.time_hypothesis(method_of.get(m, m))
        if hyp is not None:
            hypotheses.setdefault(hyp.ratio, (method_of.get(m, m), hyp))
    for ax, kind, what in ((axes[0], "time_ratio", "training time"), (axes[1], "step_ratio", "median step time")):
        for k, m in enumerate(others):
            rs = [(c["methods"].get(m) or {}).get(kind) or {} for c in cells]
            med = np.array([r.get("median") or np.nan for r in rs], float)
            lo = np.array([r.get("min") or np.nan for r in rs], float)
            hi = np.array([r.get("max") or np.nan for r in rs], float)
            pos = x + (k - (len(others) - 1) / 2) * width
            ax.bar(pos, med, width, color=_colour(m, labels), label=_name(summary, m), alpha=0.85)
            good = np.isfinite(med) & np.isfinite(lo) & np.isfinite(hi)
            ax.errorbar(pos[good], med[good], yerr=[med[good] - lo[good], hi[good] - med[good]], fmt="none",
                        ecolor="black", capsize=3)
        ax.axhline(1.0, color=_colour(ref, labels), lw=1, label=_name(summary, ref))
        for ratio, (method, hyp) in sorted(hypotheses.items()):
            ax.axhline(ratio, color=_own(method, "colour") or "tab:gray", ls="--", lw=1,
                       label=f"{methods.label(method)} hypothesis {ratio:g}x")
        ax.set_xticks(x, [f"{c['task']}\n{c['budget_label']}" for c in cells])
        ax.set_ylabel(f"{what} / {_name(summary, ref)}'s")
        ax.set_title(f"{what}: median of per-seed ratios to {_name(summary, ref)}\n(black bars: min to max over seeds)",
                     fontsize=9)
        finite = [v for c in cells for m in others for v in [((c["methods"].get(m) or {}).get(kind) or {}).get("max")] if ok(v)]
        ax.set_ylim(min(0.9, 0.95 * min(finite, default=1.0)), max(1.2, 1.05 * max(finite, default=1.0)))
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{summary['label']}: time relative to {_name(summary, ref)}", fontsize=10)
    return _save(fig, path)


def _heatmap(fig: Any, ax: Any, values: dict, title: str, cmap: str = "viridis", vmin: float | None = None,
             vmax: float | None = None, annotate: str | None = None, norm: Any = None) -> None:
    if not values:
        ax.set_axis_off()
        ax.set_title(title + "\n(no data)", fontsize=9)
        return
    layers, kinds, grid = analysis.layer_kind_grid(values)
    im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=None if norm else vmin, vmax=None if norm else vmax, norm=norm)
    ax.set_xticks(range(len(kinds)), [analysis.kind_label(k) for k in kinds], rotation=45, ha="right", fontsize=8)
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


def _middle_cell(cells: list[dict[str, Any]], task: str, need: Sequence[str] = ()) -> dict[str, Any] | None:
    """The middle budget of a task (the brief's 'one budget per task'), preferring one with `need` runs."""
    mine = [c for c in cells if c["task"] == task]
    if need:
        mine = [c for c in mine if all((c["methods"].get(n) or {}).get("complete") for n in need)] or mine
    return mine[len(mine) // 2] if mine else None


def _penalty_label(method_of: dict[str, str]) -> str | None:
    """The column of the method whose penalty the open question is about (the registry's penalty_question)."""
    return next((lb for lb in (first_label(method_of, m) for m in methods.with_figure("penalty_question")) if lb), None)


def plot_importance(cell: dict[str, Any], fw: Sequence[RunRecord], label: str, path: Path, name: str,
                    column: str = "importance") -> Path | None:
    values = matrix_means(fw, column)
    if not values:
        return None
    from matplotlib.colors import LogNorm

    layers, kinds, _ = analysis.layer_kind_grid(values)
    fig = _figure(1.0 * len(kinds) + 3.0, 0.45 * len(layers) + 2.2)
    ax = fig.subplots()
    pct = {k: 100 * v for k, v in values.items()}
    low, high = min(pct.values()), max(pct.values())
    log_scale = low > 0 and high / low > 20  # a few large scores would leave every other cell black
    _heatmap(fig, ax, pct, f"{name} importance I_m in % (mean over {len(fw)} seed(s)); uniform = "
             f"{100 / len(values):.2f} %" + ("; log colour scale" if log_scale else ""),
             cmap="magma", annotate=".2f", norm=LogNorm(low, high) if log_scale else None)
    fig.suptitle(f"{label}: {cell['task']} {cell['budget_label']}", fontsize=10)
    return _save(fig, path)


def plot_matrices(cell: dict[str, Any], done: dict[str, list[RunRecord]], summary: dict[str, Any], path: Path) -> Path | None:
    """‖dW‖ and effective rank per matrix for every column side by side (shared colour scale per row when
    comparable), the rival's final rank pattern (AdaLoRA's), and the penalty method's (FW-LoRA's) ‖dW‖ over the
    reference's per matrix."""
    from matplotlib.colors import TwoSlopeNorm

    labels = [lb for lb in summary["methods"] if done.get(lb)]
    if not labels:
        return None
    method_of, ref = summary.get("method_of") or {}, summary.get("reference") or methods.reference_name()
    norms = {m: matrix_means(done[m], "fro_norm") for m in labels}
    ranks = {m: matrix_means(done[m], "effective_rank") for m in labels}
    layers, _, _ = analysis.layer_kind_grid(next(iter(norms.values())) or {(0, "?"): 0.0})
    n = len(labels)
    fig = _figure((n + 1) * 3.3, 2 * (0.3 * len(layers) + 2.0))
    axes = fig.subplots(2, n + 1, squeeze=False)
    nv = [v for d in norms.values() for v in d.values()]
    rv = [v for d in ranks.values() for v in d.values()]
    # one colour scale when the sizes are comparable; else each its own, or the smaller method's pattern
    # would be one flat colour (AdaLoRA's updates can be far smaller than LoRA's)
    medians = [statistics.median(d.values()) for d in norms.values() if d]
    shared = bool(medians) and min(medians) > 0 and max(medians) / min(medians) <= 3
    for j, m in enumerate(labels):
        _heatmap(fig, axes[0, j], norms[m], f"{_name(summary, m)}: ‖dW‖_F ({len(done[m])} seed(s))"
                 + ("" if shared else "\n(own colour scale)"),
                 vmin=min(nv, default=0) if shared else None, vmax=max(nv, default=1) if shared else None)
        _heatmap(fig, axes[1, j], ranks[m], f"{_name(summary, m)}: effective rank", cmap="cividis",
                 vmin=0, vmax=max(rv, default=1))
    rival = methods.rival_name()
    ada = first_label(method_of, rival) if rival else None
    rank_col = getattr(methods.method_class(rival), "rank_column", None) if rival else None
    _heatmap(fig, axes[0, n], matrix_means(done.get(ada) or [], rank_col) if ada and rank_col else {},
             f"{methods.label(rival) if rival else 'the rival'}: final rank "
             f"({getattr(methods.method_class(rival), 'rank_unit', 'rank')})", cmap="Oranges", annotate=".1f")
    fw = _penalty_label(method_of)
    ratio = {}
    if fw in norms and ref in norms:
        a, b = norms[fw], norms[ref]
        ratio = {k: math.log2(a[k] / b[k]) for k in a if k in b and a[k] > 0 and b[k] > 0}
    span = max((abs(v) for v in ratio.values()), default=1.0) or 1.0
    _heatmap(fig, axes[1, n], ratio, f"log2(‖dW‖ {_name(summary, fw) if fw else 'penalty'} / {_name(summary, ref)})\n"
             "(mean ‖dW‖ over seeds)", cmap="coolwarm", norm=TwoSlopeNorm(0.0, -span, span),
             annotate=".2f" if span >= 0.05 else None)  # else: read the colour bar
    fig.suptitle(f"{summary['label']}: {cell['task']} {cell['budget_label']}: final update per matrix", fontsize=10)
    return _save(fig, path)


def plot_rank_allocation(cell: dict[str, Any], fwrank: Sequence[RunRecord], ada: Sequence[RunRecord], names: tuple[str, str],
                         label: str, path: Path, columns: tuple[str, str]) -> Path | None:
    """Three layer x matrix-type heatmaps side by side: a rank-allocating method's final ranks (fwrank's), the
    rival's final rank pattern (AdaLoRA's; one colour scale for the two), and the importance it allocated by.
    columns: the per-matrix rank columns of the two (the registry's rank_column)."""
    mine, theirs = matrix_means(fwrank, columns[0]), matrix_means(ada, columns[1])
    if not mine and not theirs:
        return None
    importance = {k: 100 * v for k, v in importance_means(fwrank).items()}
    layers, kinds, _ = analysis.layer_kind_grid({**mine, **theirs, **importance} or {(0, "?"): 0.0})
    fig = _figure(3 * (0.5 * len(kinds) + 2.0), 0.45 * len(layers) + 2.4)
    axes = fig.subplots(1, 3, squeeze=False)[0]
    top = max([*mine.values(), *theirs.values()], default=1.0) or 1.0
    _heatmap(fig, axes[0], mine, f"{names[0]}: final rank ({len(fwrank)} seed(s))", cmap="Greens", vmin=0, vmax=top,
             annotate=".1f")
    _heatmap(fig, axes[1], theirs, f"{names[1]}: final rank ({len(ada)} seed(s))", cmap="Greens", vmin=0, vmax=top,
             annotate=".1f")
    _heatmap(fig, axes[2], importance, f"Fisher importance I_m in % ({names[0]}'s runs)", cmap="magma", annotate=".1f")
    fig.suptitle(f"{label}: {cell['task']} {cell['budget_label']}: rank allocation and importance", fontsize=10)
    return _save(fig, path)


def plot_curves(summary: dict[str, Any], task: str, path: Path) -> Path | None:
    from matplotlib.ticker import MaxNLocator

    cells, labels = [c for c in summary["cells"] if c["task"] == task and c["curves"]], summary["methods"]
    if not cells:
        return None
    fig = _figure(max(5.5, 3.6 * len(cells)), 3.4)
    axes = fig.subplots(1, len(cells), squeeze=False)[0]
    for ax, c in zip(axes, cells):
        for m, cur in c["curves"].items():
            mean = np.array([np.nan if v is None else v for v in cur["mean"]], float)
            std = np.array([0.0 if v is None else v for v in cur["std"]], float)
            ls, marker = _style(m, labels)
            ax.plot(cur["epoch"], mean, marker=marker, ls=ls, label=f"{_name(summary, m)} (n={max(cur['n'], default=0)})",
                    color=_colour(m, labels))
            ax.fill_between(cur["epoch"], mean - std, mean + std, alpha=0.15, color=_colour(m, labels))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel((c["metric"] or "metric") + (" (lower is better)" if not c.get("higher_is_better", True) else ""))
        ax.set_title(f"{task} {c['budget_label']}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{summary['label']}: {task}: metric per epoch (mean ± std over seeds)", fontsize=10)
    return _save(fig, path)


def write_plots(p: Protocol, summary: dict[str, Any], out_dir: Path, prefix: str) -> dict[str, list[str]]:
    """All plots of one protocol; returns {kind: [file names]} (relative to out_dir)."""
    plots: dict[str, list[str]] = defaultdict(list)
    method_of = summary.get("method_of") or {}

    def keep(kind: str, path: Path | None) -> None:
        if path is not None:
            plots[kind].append(path.name)

    def records(task: str, budget: str, label: str | None) -> list[RunRecord]:
        return [r.result for r in p.runs if r.result and r.task == task and r.budget_label == budget and r.label == label]

    keep("metric_vs_budget", plot_metric_vs_budget(summary, out_dir / f"{prefix}_metric_vs_budget.png"))
    keep("time_ratios", plot_time_ratios(summary, out_dir / f"{prefix}_time_ratios.png"))
    drawn = [first_label(method_of, m) for m in methods.with_figure("importance")]
    fw = next((lb for lb in drawn if lb), None)
    rival = methods.rival_name()
    ada = first_label(method_of, rival) if rival else None
    rival_column = getattr(methods.method_class(rival), "rank_column", None) if rival else None
    allocating = set(methods.with_figure("ranks"))
    fwranks = [lb for lb in summary["methods"] if method_of.get(lb) in allocating]
    for task in summary["tasks"]:
        t = slug(task)
        cell = _middle_cell(summary["cells"], task, need=[fw] if fw else ())
        if cell is not None:
            budget = cell["budget_label"]
            done = {lb: records(task, budget, lb) for lb in summary["methods"]}
            if fw:
                column = methods.method_class(method_of.get(fw, fw)).importance_column
                keep("importance", plot_importance(cell, done[fw], summary["label"],
                                                   out_dir / f"{prefix}_{t}_{budget}_importance.png", _name(summary, fw),
                                                   column))
            keep("matrices", plot_matrices(cell, done, summary, out_dir / f"{prefix}_{t}_{budget}_matrices.png"))
        for lb in fwranks if ada and rival_column else []:
            rc = _middle_cell(summary["cells"], task, need=[lb, ada])
            mine, theirs = (records(task, rc["budget_label"], lb), records(task, rc["budget_label"], ada)) if rc else ([], [])
            if mine and theirs:
                keep("ranks", plot_rank_allocation(rc, mine, theirs, (_name(summary, lb), _name(summary, ada)),
                                                   summary["label"],
                                                   out_dir / f"{prefix}_{t}_{rc['budget_label']}_{slug(lb)}_ranks.png",
                                                   (methods.method_class(method_of[lb]).rank_column, rival_column)))
        keep("curves", plot_curves(summary, task, out_dir / f"{prefix}_{t}_curves.png"))
    return dict(plots)
