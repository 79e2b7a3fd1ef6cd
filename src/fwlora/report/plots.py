"""The report's line and bar charts (final metric against budget, time ratios, learning curves), and what
every figure shares: a figure without pyplot, an atomic PNG save, each column's colour and line style.
matplotlib is imported inside the functions that draw (no pyplot, no global state), so that reading and
aggregating runs never needs it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fwlora import methods
from fwlora.checks import is_finite_real
from fwlora.files import write_atomic
from fwlora.report.cells import Cell
from fwlora.report.columns import budget_method_name
from fwlora.report.summary import ProtocolReport

# colours and line styles of columns whose method does not set its own (a variant's, a plug-in's without
# one); a method's own column takes its registry colour and style, so that two columns with equal numbers
# stay visible
_PALETTE = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray", "tab:blue",
            "tab:orange", "tab:green")
_STYLES = (("-.", "D"), ("-", "v"), ("--", "P"), (":", "X"), ("-.", "*"), ("-", "o"), ("--", "s"), (":", "^"))


# ---- drawing -----------------------------------------------------------------------------------------


def save_png(fig: Any, path: Path) -> Path:
    """Save a PNG atomically (a reader never sees half a figure)."""
    return write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))


def new_figure(w: float, h: float) -> Any:
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


def _budget_tick(cell: Cell) -> str:
    pct = cell.budget_percent
    return cell.budget_label + (f"\n{pct:.2f} %" if is_finite_real(pct) else "")


def _direction(cells: Sequence[Cell]) -> str:
    return "" if all(c.higher_is_better for c in cells) else ", lower is better"


def plot_metric_vs_budget(r: ProtocolReport, path: Path) -> Path | None:
    tasks, labels, name = r.tasks, r.columns.labels, r.columns.name
    if not any(c.curves for c in r.cells):
        return None
    fig = new_figure(max(5.5, 4.2 * len(tasks)), 3.4)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        cells = [c for c in r.cells if c.task == task]
        x = np.arange(len(cells))
        for k, m in enumerate(labels):
            finals = [c.columns[m].final if m in c.columns else None for c in cells]
            mean = np.array([s.mean if s and s.mean is not None else np.nan for s in finals], float)
            err = np.array([(s.std or 0.0) if s else 0.0 for s in finals], float)
            if np.isfinite(mean).any():
                ls, marker = _style(m, labels)
                ax.errorbar(x + (k - (len(labels) - 1) / 2) * 0.06, mean, yerr=err, marker=marker, ls=ls,
                            capsize=3, label=name(m), color=_colour(m, labels))
        ax.set_xticks(x, [_budget_tick(c) for c in cells])
        ax.set_xlabel(f"budget (rank, {budget_method_name()} % of backbone)")
        ax.set_ylabel(f"final {cells[0].metric or 'metric'} (mean ± std over seeds{_direction(cells)})")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{r.label}: task metric at the final epoch vs budget", fontsize=10)
    return save_png(fig, path)


def _ratio(cell: Cell, label: str, kind: str) -> Any:
    """The column's time or step ratio summary in this cell, or None."""
    return getattr(cell.columns[label], kind) if label in cell.columns else None


def plot_time_ratios(r: ProtocolReport, path: Path) -> Path | None:
    cols = r.columns
    cells, labels, ref, name = r.cells, cols.labels, cols.reference, cols.name
    others = [m for m in labels if m != ref]
    if not cells or not others or not any((t := _ratio(c, m, "time_ratio")) and t.median
                                          for c in cells for m in others):
        return None
    fig = new_figure(max(7.0, 1.1 * len(cells) + 2), 6.4)
    axes = fig.subplots(2, 1, squeeze=False)[:, 0]
    x = np.arange(len(cells))
    width = 0.8 / len(others)
    hypotheses = {}  # one dashed line per method claim among the columns, in its method's colour
    for m in others:
        hyp = cols.hypothesis(m)
        if hyp is not None:
            hypotheses.setdefault(hyp.ratio, (cols.method(m), hyp))
    for ax, kind, what in ((axes[0], "time_ratio", "training time"),
                           (axes[1], "step_ratio", "median step time")):
        for k, m in enumerate(others):
            rs = [_ratio(c, m, kind) for c in cells]
            med, lo, hi = (np.array([getattr(q, a) or np.nan if q else np.nan for q in rs], float)
                           for a in ("median", "min", "max"))
            pos = x + (k - (len(others) - 1) / 2) * width
            ax.bar(pos, med, width, color=_colour(m, labels), label=name(m), alpha=0.85)
            good = np.isfinite(med) & np.isfinite(lo) & np.isfinite(hi)
            ax.errorbar(pos[good], med[good], yerr=[med[good] - lo[good], hi[good] - med[good]], fmt="none",
                        ecolor="black", capsize=3)
        ax.axhline(1.0, color=_colour(ref, labels), lw=1, label=name(ref))
        for ratio, (method, hyp) in sorted(hypotheses.items()):
            ax.axhline(ratio, color=_own(method, "colour") or "tab:gray", ls="--", lw=1,
                       label=f"{methods.label(method)} hypothesis {ratio:g}x")
        ax.set_xticks(x, [f"{c.task}\n{c.budget_label}" for c in cells])
        ax.set_ylabel(f"{what} / {name(ref)}'s")
        ax.set_title(f"{what}: median of per-seed ratios to {name(ref)}\n(black bars: min to max over seeds)",
                     fontsize=9)
        tops = [q.max for c in cells for m in others if (q := _ratio(c, m, kind)) and is_finite_real(q.max)]
        ax.set_ylim(min(0.9, 0.95 * min(tops, default=1.0)), max(1.2, 1.05 * max(tops, default=1.0)))
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{r.label}: time relative to {name(ref)}", fontsize=10)
    return save_png(fig, path)


def plot_curves(r: ProtocolReport, task: str, path: Path) -> Path | None:
    from matplotlib.ticker import MaxNLocator

    cells, labels = [c for c in r.cells if c.task == task and c.curves], r.columns.labels
    if not cells:
        return None
    fig = new_figure(max(5.5, 3.6 * len(cells)), 3.4)
    axes = fig.subplots(1, len(cells), squeeze=False)[0]
    for ax, c in zip(axes, cells):
        for m, cur in c.curves.items():
            mean = np.array([np.nan if v is None else v for v in cur.mean], float)
            std = np.array([0.0 if v is None else v for v in cur.std], float)
            ls, marker = _style(m, labels)
            ax.plot(cur.epochs, mean, marker=marker, ls=ls, color=_colour(m, labels),
                    label=f"{r.columns.name(m)} (n={max(cur.n, default=0)})")
            ax.fill_between(cur.epochs, mean - std, mean + std, alpha=0.15, color=_colour(m, labels))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel((c.metric or "metric") + ("" if c.higher_is_better else " (lower is better)"))
        ax.set_title(c.title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{r.label}: {task}: metric per epoch (mean ± std over seeds)", fontsize=10)
    return save_png(fig, path)
