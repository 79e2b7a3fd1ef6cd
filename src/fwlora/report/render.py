"""report.md: the tables and text of a protocol, as a view over its ProtocolReport (summary.py). Every number
printed is computed from the runs' records; the registry names the methods."""

from __future__ import annotations

from collections.abc import Sequence

from fwlora import analysis, methods
from fwlora.checks import is_finite_real
from fwlora.methods.base import Method
from fwlora.report.cells import Cell, ColumnStats
from fwlora.report.columns import Columns, budget_method_name
from fwlora.report.header import header_lines
from fwlora.report.stats import MAJORITY_TOLERANCE, RatioSummary
from fwlora.report.summary import ProtocolReport
from fwlora.report.text import fmt, fmt_ci, fmt_count, fmt_mean_std, fmt_ratio, markdown_table

MAJORITY_MARK = "at majority class"
FIGURE_KINDS = ("metric_vs_budget", "time_ratios", "importance", "matrices", "curves")
DETAIL_HEADER = ("best epoch", "adapter params trained (initial → final, mean over steps)", "head params",
                 "adapter % of backbone", "train s (mean)", "time ratio", "step-time ratio", "median step s")


def _time_columns(cols: Columns) -> list[str]:
    """Columns with a time ratio: the methods under test first, the rival's last."""
    others = [lb for lb in cols.labels if lb != cols.reference]
    return [lb for lb in others if not cols.is_rival(lb)] + [lb for lb in others if cols.is_rival(lb)]


def _median(ratio: RatioSummary | None) -> float | None:
    return ratio.median if ratio else None


def method_cell_text(stat: ColumnStats | None) -> str:
    """'0.512 ± 0.010', with the seed count when not every expected seed is done, and the majority mark."""
    if stat is None:
        return "not run"
    seeds = stat.seeds
    text = fmt_mean_std(stat.final) if seeds.complete else "—"
    if seeds.complete < seeds.expected or seeds.complete == 0:
        text += f" ({seeds.text})"
    return text + (f" ({MAJORITY_MARK})" if stat.at_majority else "")


def ratio_cell_text(stat: ColumnStats | None) -> str:
    if stat is None or stat.time_ratio is None or not stat.time_ratio.n:
        return "—"
    return f"{fmt_ratio(stat.time_ratio.median)} (step {fmt_ratio(_median(stat.step_ratio))})"


def _metric_heading(cell: Cell) -> str:
    return f"{cell.task} ({cell.metric or '?'}" + ("" if cell.higher_is_better else ", lower is better") + ")"


def main_table(r: ProtocolReport) -> str:
    """One row per task x budget: every column's final metric, the time ratios to the reference, and each
    column's paired difference with the rival (with the reference when there is no rival)."""
    cols = r.columns
    labels, ref, timed = cols.labels, cols.reference, _time_columns(cols)
    other = cols.rival or (ref if ref in labels else None)
    compared = [lb for lb in labels if lb not in (ref, other)] if other else []
    rows = []
    for c in r.cells:
        percent = f", {c.budget_percent:.3f} %" if is_finite_real(c.budget_percent) else ""
        rows.append([_metric_heading(c), f"{c.budget_label}{percent}",
                     *[method_cell_text(c.columns.get(lb)) for lb in labels],
                     *[ratio_cell_text(c.columns.get(lb)) for lb in timed],
                     *[fmt_ci(c.differences.get((lb, other))) for lb in compared]])
    header = ["task (metric)", f"budget (rank, {budget_method_name()} %)", *[cols.name(lb) for lb in labels],
              *[f"{cols.name(lb)} time / {cols.name(ref)}" for lb in timed],
              *[f"{cols.name(lb)} − {cols.name(other)} [95 % CI]" for lb in compared]]
    return markdown_table(header, rows)


def params_text(stat: ColumnStats) -> str:
    """Adapter parameters trained: 'initial → final (mean over steps)' where they change, else the one
    count (release 1 recorded only the trainable count)."""
    p = stat.size.params if stat.size else None
    if p and is_finite_real(p.initial):
        text = fmt_count(p.initial)
        changed = is_finite_real(p.final) and p.final != p.initial
        if changed:
            text += f" → {fmt_count(p.final)}"
        if is_finite_real(p.mean) and (changed or round(p.mean) != round(p.initial)):
            text += f" (mean {fmt_count(p.mean)})"
        return text
    return f"{stat.size.adapter_params:,}" if stat.size and stat.size.adapter_params else "—"


def detail_table(cell: Cell, cols: Columns) -> str:
    rows = []
    for label, s in cell.columns.items():
        head, actual = (s.size.head_params, s.size.actual_percent) if s.size else (None, None)
        ratios = ["1 (reference)" if label == cols.reference else
                  f"{fmt_ratio(x.median)} (n={x.n})" if x else "—" for x in (s.time_ratio, s.step_ratio)]
        final = fmt_mean_std(s.final) + (f" ({MAJORITY_MARK})" if s.at_majority else "")
        rows.append([cols.name(label), s.seeds.text, final, fmt_mean_std(s.best), fmt(s.best_epoch.mean, 1),
                     params_text(s), f"{head:,}" if head is not None else "—",
                     f"{actual:.3f} %" if is_finite_real(actual) else "—", fmt(s.train_seconds.mean, 1),
                     *ratios, fmt(s.step_seconds_median.mean, 4)])
    best = "best" + ("" if cell.higher_is_better else " (lowest)")
    metric = cell.metric or ""
    return markdown_table(["method", "seeds", f"final {metric}", f"{best} {metric}", *DETAIL_HEADER], rows)


def rank_pattern_lines(r: ProtocolReport) -> list[str]:
    """Each rank-allocating column's final ranks per matrix beside the budget's total."""
    lines = []
    header = ["task budget", "total rank (mean)", f"{budget_method_name()}'s total (r × matrices)",
              "per matrix min / median / max", "matrices pruned to rank 0"]
    for label in r.columns.labels:
        rows = []
        for c in r.cells:
            pattern = c.matrices.ranks.get(label) if c.matrices else None
            if pattern:
                rows.append([c.title, fmt(pattern.total_mean, 1), f"{(c.rank or 0) * pattern.matrices}",
                             f"{fmt(pattern.min, 0)} / {fmt(pattern.median, 1)} / {fmt(pattern.max, 0)}",
                             f"{100 * pattern.zero_fraction:.0f} %"])
        if rows:
            cls = r.columns.method_class(label)
            unit = cls.rank_unit if cls else Method.rank_unit
            title = f"{r.columns.name(label)}'s final rank pattern ({unit} per matrix, over its seeds):"
            lines += ["", title, "", markdown_table(header, rows)]
    return lines


def importance_vs_update_lines(r: ProtocolReport) -> list[str]:
    """The importance's share per matrix type beside each column's share of ||dW||^2."""
    lines: list[str] = []
    name = r.columns.name
    for c in r.cells:
        q = c.matrices.importance_vs_update if c.matrices else None
        if not q:
            continue
        kinds = analysis.order_kinds(list(q.importance_share))
        rows = [[f"Fisher importance I_m ({name(q.source)}'s runs)"]
                + [fmt(100 * q.importance_share.get(k, float("nan")), 1) for k in kinds] + ["—"]]
        for label in r.columns.labels:
            share = q.update_share.get(label)
            if share:
                rows.append([f"‖dW‖², {name(label)}"] + [fmt(100 * share.get(k, 0.0), 1) for k in kinds]
                            + [fmt(q.spearman.get(label), 2)])
        header = ["quantity", *[analysis.kind_label(k) for k in kinds], "Spearman(I_m, ‖dW_m‖)"]
        lines += ["", f"{c.title}: where the Fisher statistic points and where each method's update "
                      "ends up (share per matrix type in %, mean over seeds; last column: Spearman of I_m "
                      "and ‖dW_m‖ over matrices, same seed, averaged over seeds):", "",
                  markdown_table(header, rows)]
    if lines:
        rival = methods.rival_name()
        sensitivity = f"{methods.label(rival) if rival else 'the rival'}'s own sensitivity"
        lines += ["", "Reading: a rule that allocates ranks by I_m gives the adapter to the matrix types in "
                      f"the first row; the other rows show where plain training ({budget_method_name()}) and "
                      f"{sensitivity} put their update. Where the two disagree, allocating by the Fisher "
                      "statistic takes capacity from matrices that training uses."]
    return lines


def plot_titles(present: Sequence[str] | None = None) -> tuple[tuple[str, str], ...]:
    """Each figure's title, naming the methods the registry says draw it (of those present, when given: a
    report names only the methods it has runs of)."""
    importance = [m for m in methods.with_figure("importance") if present is None or m in present]
    ranks = [m for m in methods.with_figure("ranks") if present is None or m in present]
    rival = methods.rival_name()
    allocating = ", ".join(f"{methods.label(m)}'s" for m in ranks) or "the"
    rival_ranks = f"{methods.label(rival)}'s" if rival else "the rival"
    return (("importance", f"{methods.label(importance[0]) if importance else 'The'} importance per matrix"),
            ("matrices", "Final update per matrix"),
            ("ranks", f"Rank allocation: {allocating} final ranks, {rival_ranks}, and the Fisher importance"),
            ("curves", "Learning curves"))


def _warmup_example() -> str:
    """' (Mine's Fisher warm-up)': the first registered method with a warm-up phase of its own (its
    warmup_phase without the article), as an example of what a median step time leaves out."""
    cls = next((c for c in methods.REGISTRY.values() if c.warmup_phase != Method.warmup_phase), None)
    return f" ({cls.label or cls.name}'s {cls.warmup_phase.removeprefix('the ')})" if cls else ""


def _cell_lines(c: Cell, cols: Columns) -> list[str]:
    percent = f" (rank {c.rank}, {c.budget_percent:.3f} % for {budget_method_name()})" \
        if c.rank and is_finite_real(c.budget_percent) else ""
    lines = ["", f"#### {c.task}, {c.budget_label}{percent}", "", detail_table(c, cols), ""]
    errors = [(label, seed, e) for label, st in c.columns.items() for seed, e in st.errors.items()]
    lines += [f"- {cols.name(label)} seed {seed} failed: {e.splitlines()[0][:300] if e else 'no message'}"
              for label, seed, e in errors]
    if errors:
        lines.append("")
    lines += ["Paired differences of the final metric over seeds (95 % Student t interval) and verdicts"
              + ("" if c.higher_is_better else f" ({c.metric}: lower is better)") + ":", ""]
    return lines + ([f"- {v}" for v in c.verdicts] or ["- no comparison possible"])


def _main_table_lines(r: ProtocolReport) -> list[str]:
    lines = ["", "### Main table", "",
             f"Final-epoch metric, mean ± sample std over seeds. Time ratio: median over seeds of (method / "
             f"{r.columns.name(r.columns.reference)} with the same seed, task and budget) in total training "
             "time; in brackets the same from the median step time, which is more robust to machine noise "
             f"but leaves out a method's slower warm-up steps{_warmup_example()}."]
    flagged = [c for c in r.cells if any(s.at_majority for s in c.columns.values())]
    if flagged:
        where = ", ".join(f"{c.title}: {c.metric} {fmt(c.majority)}" for c in flagged)
        lines.append(f"\"{MAJORITY_MARK}\": the mean final metric lies within {MAJORITY_TOLERANCE:g} of what "
                     f"always predicting the majority class scores on the evaluation set ({where}): that "
                     "method did not learn the task there.")
    lines += ["", main_table(r)]
    for name in (*r.plots.get("metric_vs_budget", ()), *r.plots.get("time_ratios", ())):
        lines += ["", f"![{name}]({name})"]
    return lines


def _pooled_lines(r: ProtocolReport) -> list[str]:
    lines = ["", "### Pooled over budgets (pairs = budget × seed)", ""]
    for task, pool in r.pooled.items():
        lines.append(f"- **{task}** ({', '.join(pool.budgets)}):")
        lines += [f"  - {x}" for x in pool.verdicts] or ["  - no pairs"]
    across = r.pooled_over_tasks
    if across:
        lines += ["", f"### Pooled over tasks ({', '.join(across.tasks)})", "",
                  f"Per seed, the mean over {', '.join(across.cells)} of the paired difference in each "
                  "task's own metric (as the GLUE score averages MCC and accuracy), then a 95 % Student t "
                  "interval over seeds:", ""]
        lines += [f"- {x}" for x in across.verdicts]
    return lines


def protocol_markdown(r: ProtocolReport) -> str:
    lines = header_lines(r) + _main_table_lines(r) + ["", "### Per task and budget"]
    for c in r.cells:
        lines += _cell_lines(c, r.columns)
    lines += _pooled_lines(r)
    for section in r.sections:  # a method's own question: its heading and its answer
        lines += ["", section.markdown]
    per_matrix = rank_pattern_lines(r) + importance_vs_update_lines(r)
    if per_matrix and not r.sections:
        lines += ["", "### Per matrix"]
    lines += per_matrix
    present = set(r.columns.method_of.values())
    for kind, title in plot_titles(sorted(present)):
        lines += [line for name in r.plots.get(kind, ()) for line in ("", f"{title}: ![{name}]({name})")]
    draws_importance = set(methods.with_figure("importance")) & present
    missing = [k for k in FIGURE_KINDS if not r.plots.get(k) and (k != "importance" or draws_importance)]
    if missing:
        lines += ["", f"Plots not drawn for lack of data: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"
