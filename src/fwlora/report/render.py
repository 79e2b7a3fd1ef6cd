"""report.md, summary.json and summary.csv: the tables and text of a report, from the plain data that
aggregate.summarise_protocol computes. Every number printed is computed from the runs' records."""

from __future__ import annotations

import csv
import io
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fwlora import analysis, methods
from fwlora.errors import UserError
from fwlora.files import write_json, write_text_atomic
from fwlora.records import Status
from fwlora.report.aggregate import summarise_protocol
from fwlora.report.columns import default_reference
from fwlora.report.load import discover
from fwlora.report.plots import write_plots
from fwlora.report.stats import MAJORITY_TOLERANCE
from fwlora.report.text import (fmt, fmt_ci, fmt_count, fmt_mean_std, fmt_ratio, fmt_signed, fmt_value, markdown_table,
                                ok, slug)

log = logging.getLogger(__name__)

MAJORITY_MARK = "at majority class"


def _names(summary: dict[str, Any]) -> dict[str, str]:
    return summary.get("names") or {}


def _name(summary: dict[str, Any], label: str) -> str:
    return _names(summary).get(label, label)


def _reference(summary: dict[str, Any]) -> str:
    return summary.get("reference") or default_reference()


def _rival(summary: dict[str, Any]) -> str | None:
    """The rival's column (AdaLoRA's), when the protocol has it and it is not the reference."""
    rival = methods.rival_name()
    return rival if rival in summary["methods"] and _reference(summary) != rival else None


def _time_columns(summary: dict[str, Any]) -> list[str]:
    """Columns with a time ratio: the methods under test first, the rival's last (as release 1 printed)."""
    ref, method_of, rival = _reference(summary), summary.get("method_of") or {}, methods.rival_name()
    others = [m for m in summary["methods"] if m != ref]
    return [m for m in others if method_of.get(m) != rival] + [m for m in others if method_of.get(m) == rival]


def method_cell_text(stat: dict[str, Any] | None) -> str:
    """'0.512 ± 0.010', with the seed count when not every expected seed is done, and the majority mark."""
    if stat is None:
        return "not run"
    text = fmt_mean_std(stat["final"]) if stat["complete"] else "—"
    if stat["complete"] < stat["expected"] or stat["complete"] == 0:
        text += f" ({stat['seeds_text']})"
    if stat.get("at_majority"):
        text += f" ({MAJORITY_MARK})"
    return text


def ratio_cell_text(stat: dict[str, Any] | None) -> str:
    if not stat or not (stat.get("time_ratio") or {}).get("n"):
        return "—"
    return f"{fmt_ratio(stat['time_ratio']['median'])} (step {fmt_ratio((stat.get('step_ratio') or {}).get('median'))})"


def _metric_heading(cell: dict[str, Any]) -> str:
    return f"{cell['task']} ({cell['metric'] or '?'}" + ("" if cell.get("higher_is_better", True) else ", lower is better") + ")"


def main_table(summary: dict[str, Any]) -> str:
    """One row per task x budget: every column's final metric, the time ratios to the reference, and each
    method's paired difference with AdaLoRA (with the reference when there is no AdaLoRA)."""
    labels, ref = summary["methods"], _reference(summary)
    timed = _time_columns(summary)
    other = _rival(summary) or (ref if ref in labels else None)  # the rival, else the reference
    diffs = [m for m in labels if m not in (ref, other)] if other else []
    rows = []
    for c in summary["cells"]:
        st = c["methods"]
        pct = f", {c['lora_percent']:.3f} %" if ok(c.get("lora_percent")) else ""
        rows.append([_metric_heading(c), f"{c['budget_label']}{pct}", *[method_cell_text(st.get(m)) for m in labels],
                     *[ratio_cell_text(st.get(m)) for m in timed],
                     *[fmt_ci(c["pairs"].get(f"{m}-{other}", {})) for m in diffs]])
    header = ["task (metric)", "budget (rank, LoRA %)", *[_name(summary, m) for m in labels],
              *[f"{_name(summary, m)} time / {_name(summary, ref)}" for m in timed],
              *[f"{_name(summary, m)} − {_name(summary, other)} [95 % CI]" for m in diffs]]
    return markdown_table(header, rows)


def params_text(stat: dict[str, Any]) -> str:
    """Adapter parameters trained: 'initial → final (mean over steps)' where they change, else the one
    count (release 1 recorded only the trainable count)."""
    p = stat.get("params")
    if p and ok(p.get("initial")):
        text = fmt_count(p["initial"])
        changed = ok(p.get("final")) and p["final"] != p["initial"]
        if changed:
            text += f" → {fmt_count(p['final'])}"
        if ok(p.get("mean")) and (changed or round(p["mean"]) != round(p["initial"])):
            text += f" (mean {fmt_count(p['mean'])})"
        return text
    return f"{stat['adapter_params']:,}" if stat.get("adapter_params") else "—"


def detail_table(cell: dict[str, Any], summary: dict[str, Any] | None = None) -> str:
    summary = summary or {}
    ref = summary.get("reference") or default_reference()
    rows = []
    for m, s in cell["methods"].items():
        final = fmt_mean_std(s["final"]) + (f" ({MAJORITY_MARK})" if s.get("at_majority") else "")
        rows.append([_name(summary, m) if summary else m, s["seeds_text"], final, fmt_mean_std(s["best"]),
                     fmt(s["best_epoch"].get("mean"), 1), params_text(s),
                     f"{s['head_params']:,}" if s.get("head_params") is not None else "—",
                     f"{s['actual_percent']:.3f} %" if ok(s.get("actual_percent")) else "—",
                     fmt(s["train_seconds"].get("mean"), 1),
                     "1 (reference)" if m == ref else
                     (f"{fmt_ratio(s['time_ratio']['median'])} (n={s['time_ratio']['n']})" if s.get("time_ratio") else "—"),
                     "1 (reference)" if m == ref else
                     (f"{fmt_ratio(s['step_ratio']['median'])} (n={s['step_ratio']['n']})" if s.get("step_ratio") else "—"),
                     fmt(s["step_seconds_median"].get("mean"), 4)])
    best = "best" + ("" if cell.get("higher_is_better", True) else " (lowest)")
    return markdown_table(["method", "seeds", f"final {cell['metric'] or ''}", f"{best} {cell['metric'] or ''}",
                           "best epoch", "adapter params trained (initial → final, mean over steps)", "head params",
                           "adapter % of backbone", "train s (mean)", "time ratio", "step-time ratio", "median step s"],
                          rows)


def _settings_md(s: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    def n(label: str) -> str:
        return _name(summary, label)

    lines = []
    if s["shared"]:
        lines.append("- Shared settings: " + ", ".join(f"{k} = {fmt_value(v)}" for k, v in s["shared"].items()))
    for k, per in s["per_method"].items():
        lines.append(f"- **{k} differs between methods**: " + ", ".join(f"{n(m)} {fmt_value(v)}" for m, v in per.items()))
    for k, per in s["varying"].items():
        lines.append(f"- {k} varies within a method: " + "; ".join(
            f"{n(m)} {', '.join(fmt_value(x) for x in v)}" for m, v in per.items()))
    if s["lora_alpha"]:
        lines.append("- Adapter alpha used: " + ", ".join(f"{n(m)} {', '.join(fmt_value(x) for x in v)}"
                                                        for m, v in s["lora_alpha"].items()))
    method_of = summary.get("method_of") or {}

    def resolved(label: str) -> str | None:  # a method whose resolved values are shown (AdaLoRA's schedule): last
        cls = methods.method_class(method_of.get(label, label))
        return cls.report_info_note if cls and cls.report_info else None

    for m, table in sorted(s["own"].items(), key=lambda kv: resolved(kv[0]) is not None):
        head = f"{n(m)} ({resolved(m)})" if resolved(m) else n(m)
        lines.append(f"- {head}: " + ", ".join(f"{k} = {', '.join(fmt_value(x) for x in v)}" for k, v in table.items()))
    for d in s["data"]:
        lines.append(f"- Data: {d.get('source')}, {d.get('train_examples')} training / {d.get('eval_examples')} "
                     "evaluation examples")
    return lines


def _matrix_md(summary: dict[str, Any]) -> list[str]:
    rows, lines = [], []
    labels, ref = summary["methods"], _reference(summary)
    penalty = methods.with_figure("penalty_question")
    penalty_name = methods.label(penalty[0]) if penalty else "a penalty method"
    fw_name = next((_name(summary, c["matrices"]["fw_label"]) for c in summary["cells"]
                    if c["matrices"].get("fw_label")), penalty_name)
    rival = methods.rival_name()
    rival_name = methods.label(rival) if rival else "the rival"
    for c in summary["cells"]:
        q = c["matrices"]
        imp, w, fw, ada = q.get("importance"), q.get("weights"), q.get("fw_vs_lora", {}), q.get("adalora_vs_lora", {})
        er = q.get("effective_rank", {})
        if imp or fw.get("pairs"):
            rows.append([f"{c['task']} {c['budget_label']}", q["fw_runs"],
                         f"{fmt(imp['min'] * 100, 2)} / {fmt(imp['median'] * 100, 2)} / {fmt(imp['max'] * 100, 2)} "
                         f"(uniform {fmt(100 * (imp.get('uniform') or float('nan')), 2)})" if imp else "—",
                         fmt(imp.get("max_over_min"), 1) if imp else "—",
                         f"{fmt(w['min'], 4)} / {fmt(w['median'], 4)} / {fmt(w['max'], 4)}" if w else "—",
                         fmt(w.get("relative_range"), 4) if w else "—",
                         f"{fmt_signed(fw.get('mean_log_ratio'))} ± {fmt(fw.get('std_log_ratio'))} (n={fw.get('pairs', 0)})"
                         if fw.get("pairs") else "—",
                         fmt(fw.get("spearman"), 2) if fw.get("pairs") else "—",
                         fmt(fw.get("importance_spearman"), 2) if fw.get("pairs") else "—",
                         f"{fmt_signed(ada.get('mean_log_ratio'))} ± {fmt(ada.get('std_log_ratio'))}" if ada.get("pairs") else "—",
                         " / ".join(fmt((er.get(m) or {}).get("mean"), 2) for m in labels)])
    r = _name(summary, ref)
    if rows:
        lines.append(markdown_table(
            ["task budget", "FW seeds", "I_m in %: min / median / max", "I max/min", "(1 − I_m): min / median / max",
             "(1 − I) relative range", f"log(‖dW‖ FW / {r}): mean ± spread", f"Spearman ‖dW‖ FW vs {r}",
             f"Spearman(I_m, ‖dW‖ FW/{r})", f"log(‖dW‖ {rival_name} / {r})",
             "mean effective rank " + " / ".join(_name(summary, m) for m in labels)], rows))
        lines.append("")
        lines.append("Reading: the relative range of (1 − I_m) is (max − min) / mean, 0 for a uniform weight decay on dW. "
                     f"The log ratio compares the final ‖dW_m‖ of {fw_name} with {r}'s run of the same seed, matrix by "
                     "matrix: a mean below 0 is shrinkage; a spread near 0 with a Spearman near 1 means every matrix was "
                     "scaled alike (a uniform decay), not reallocated. Spearman(I_m, ratio) > 0 means the low-importance "
                     f"matrices were shrunk more, as the method intends. {rival_name}'s shift against {r} is given as the "
                     "scale of a method that does reallocate. Statistics are computed per seed and averaged.")
        for c in summary["cells"]:
            fw = c["matrices"].get("fw_vs_lora", {})
            g = fw.get("geometric_mean_ratio")
            if ok(g):
                lines.append(f"- {c['task']} {c['budget_label']}: {fw_name}'s final ‖dW_m‖ is on average "
                             f"{abs(1 - g) * 100:.2g} % {'smaller' if g < 1 else 'larger'} than {r}'s (geometric mean "
                             f"over matrices and {fw['pairs']} seed(s)); the log ratio varies by "
                             f"{fmt(fw.get('std_log_ratio'), 3)} (std) across matrices")
            if fw.get("pairs", 0) > 1:
                per = ", ".join(f"seed {x['seed']}: {fmt(x.get('importance_spearman'), 2)}" for x in fw["by_seed"])
                lines.append(f"- {c['task']} {c['budget_label']}: Spearman(I_m, ratio) by seed: {per}")
    elif any(c["matrices"].get("fw_label") for c in summary["cells"]):
        lines.append(f"No {penalty_name} run is complete in this protocol: the question cannot be answered from it.")
    else:
        lines.append(f"No {penalty_name} runs in this protocol: the question ({penalty_name}'s) cannot be answered from it.")
    for m in labels:
        rank_rows = []
        for c in summary["cells"]:
            ar = (c["matrices"].get("ranks") or {}).get(m)
            if ar:
                rank_rows.append([f"{c['task']} {c['budget_label']}", fmt(ar["total_mean"], 1),
                                  f"{(c['rank'] or 0) * ar['matrices']}",
                                  f"{fmt(ar['min'], 0)} / {fmt(ar['median'], 1)} / {fmt(ar['max'], 0)}",
                                  f"{100 * ar['zero_fraction']:.0f} %"])
        if rank_rows:
            cls = methods.method_class((summary.get("method_of") or {}).get(m, m))
            what = cls.rank_unit if cls else "rank"
            lines += ["", f"{_name(summary, m)}'s final rank pattern ({what} per matrix, over its seeds):", "",
                      markdown_table(["task budget", "total rank (mean)", "LoRA's total (r × matrices)",
                                      "per matrix min / median / max", "matrices pruned to rank 0"], rank_rows)]
    return lines


def _importance_vs_update_md(summary: dict[str, Any]) -> list[str]:
    """The Fisher importance's share per matrix type beside each column's share of ||dW||^2."""
    lines: list[str] = []
    for c in summary["cells"]:
        q = c["matrices"].get("importance_vs_update")
        if not q:
            continue
        kinds = analysis.order_kinds(list(q["importance_share"]))
        rows = [[f"Fisher importance I_m ({_name(summary, q['source'])}'s runs)"]
                + [fmt(100 * q["importance_share"].get(k, float("nan")), 1) for k in kinds] + ["—"]]
        for label in summary["methods"]:
            share = q["update_share"].get(label)
            if share:
                rows.append([f"‖dW‖², {_name(summary, label)}"] + [fmt(100 * share.get(k, 0.0), 1) for k in kinds]
                            + [fmt(q["spearman"].get(label), 2)])
        lines += ["", f"{c['task']} {c['budget_label']}: where the Fisher statistic points and where each method's "
                  f"update ends up (share per matrix type in %, mean over seeds; last column: Spearman of I_m and "
                  f"‖dW_m‖ over matrices, same seed, averaged over seeds):", "",
                  markdown_table(["quantity"] + [analysis.kind_label(k) for k in kinds] + ["Spearman(I_m, ‖dW_m‖)"], rows)]
    if lines:
        lines += ["", "Reading: a rule that allocates ranks by I_m gives the adapter to the matrix types in the first row; "
                  "the other rows show where plain training (LoRA) and AdaLoRA's own sensitivity put their update. "
                  "Where the two disagree, allocating by the Fisher statistic takes capacity from matrices that "
                  "training uses."]
    return lines


def _header_md(summary: dict[str, Any]) -> list[str]:
    L = [f"## Protocol: {summary['label']}", ""]
    b = summary["bench"]
    if b.get("command"):
        L.append(f"- Command: `{b['command']}`" + (f" ({b['preset']})" if b.get("preset") else ""))
        if b.get("note"):
            L.append(f"- **{b['note']}**")
        if b.get("set"):
            L.append("- Overrides (--set): " + ", ".join(f"{k} = {fmt_value(v)}" for k, v in b["set"].items()))
    elif b.get("commands"):
        shown = b["commands"][:6]
        L.append("- Commands (from the runs' environment records):")
        L += [f"  - `{c}`" for c in shown]
        if len(b["commands"]) > len(shown):
            L.append(f"  - ... and {len(b['commands']) - len(shown)} more")
    L.append(f"- Directory: `{summary['root']}`. Runs: " + ", ".join(f"{n} {k}" for k, n in summary["counts"].items() if n))
    L.append("")
    for n in summary["notes"]:
        L += [f"> {n}", ""]
    L.append("### Settings")
    L += _settings_md(summary["settings"], summary)
    if summary["settings"]["reduced"]:
        L.append("")
        L.append("**Reduced protocol**: these runs differ from METHOD.md's protocol (roberta-base, 3 epochs, full "
                 "training set, lr 2e-4, batch 32, warm-up ratio 0.06):")
        L += [f"- {x}" for x in summary["settings"]["reduced"]]
    env = summary["env"]
    L.append("")
    L.append("Environment: " + ("; ".join(f"{k}: " + " | ".join(f"{v} ({n} run{'s' if n != 1 else ''})" for v, n in d.items())
                                         for k, d in env.items() if d) or "no complete run records one"))
    return L


def plot_titles(present: Sequence[str] | None = None) -> tuple[tuple[str, str], ...]:
    """Each figure's title, naming the methods the registry says draw it (of those present, when given: a
    report names only the methods it has runs of)."""
    importance = [m for m in methods.with_figure("importance") if present is None or m in present]
    ranks = [m for m in methods.with_figure("ranks") if present is None or m in present]
    rival = methods.rival_name()
    return (("importance", f"{methods.label(importance[0]) if importance else 'The'} importance per matrix"),
            ("matrices", "Final update per matrix"),
            ("ranks", f"Rank allocation: {', '.join(methods.label(m) + chr(39) + 's' for m in ranks) or 'the'} final ranks, "
                      f"{methods.label(rival) + chr(39) + 's' if rival else 'the rival'}, and the Fisher importance"),
            ("curves", "Learning curves"))


def protocol_markdown(summary: dict[str, Any], plots: dict[str, list[str]]) -> str:
    ref = _name(summary, _reference(summary))
    L = _header_md(summary)
    L += ["", "### Main table", ""]
    L.append(f"Final-epoch metric, mean ± sample std over seeds. Time ratio: median over seeds of (method / {ref} "
             "with the same seed, task and budget) in total training time; in brackets the same from the median "
             "step time, which is more robust to machine noise but leaves out a method's slower warm-up steps "
             "(FW-LoRA's Fisher warm-up).")
    flagged = [c for c in summary["cells"] if any(s.get("at_majority") for s in c["methods"].values())]
    if flagged:
        L.append(f"\"{MAJORITY_MARK}\": the mean final metric lies within {MAJORITY_TOLERANCE:g} of what always "
                 "predicting the majority class scores on the evaluation set (" +
                 ", ".join(f"{c['task']} {c['budget_label']}: {c['metric']} {fmt(c['majority'])}" for c in flagged) +
                 "): that method did not learn the task there.")
    L += ["", main_table(summary)]
    for name in plots.get("metric_vs_budget", []) + plots.get("time_ratios", []):
        L += ["", f"![{name}]({name})"]
    L += ["", "### Per task and budget"]
    for c in summary["cells"]:
        L += ["", f"#### {c['task']}, {c['budget_label']}" +
              (f" (rank {c['rank']}, {c['lora_percent']:.3f} % for LoRA)" if c.get("rank") and ok(c.get("lora_percent")) else ""),
              "", detail_table(c, summary), ""]
        errors = [(m, s, e) for m, st in c["methods"].items() for s, e in st.get("errors", {}).items()]
        for m, s, e in errors:
            L.append(f"- {_name(summary, m)} seed {s} failed: {e.splitlines()[0][:300] if e else 'no message'}")
        if errors:
            L.append("")
        L.append("Paired differences of the final metric over seeds (95 % Student t interval) and verdicts" +
                 ("" if c.get("higher_is_better", True) else f" ({c['metric']}: lower is better)") + ":")
        L.append("")
        L += [f"- {v}" for v in c["verdicts"]] or ["- no comparison possible"]
    L += ["", "### Pooled over budgets (pairs = budget × seed)", ""]
    for task, entry in summary["pooled"].items():
        L.append(f"- **{task}** ({', '.join(entry['budgets'])}):")
        L += [f"  - {x}" for x in entry.get("verdicts") or []] or ["  - no pairs"]
    across = summary.get("pooled_over_tasks")
    if across:
        L += ["", f"### Pooled over tasks ({', '.join(across['tasks'])})", "",
              "Per seed, the mean over " + ", ".join(across["cells"]) + " of the paired difference in each task's own "
              "metric (as the GLUE score averages MCC and accuracy), then a 95 % Student t interval over seeds:", ""]
        L += [f"- {x}" for x in across["verdicts"]]
    L += ["", "### Open question 1: reallocation or uniform decay?", ""]
    L += _matrix_md(summary)
    L += _importance_vs_update_md(summary)
    present = set((summary.get("method_of") or {}).values())
    for kind, title in plot_titles(sorted(present)):
        for name in plots.get(kind, []):
            L += ["", f"{title}: ![{name}]({name})"]
    draws_importance = set(methods.with_figure("importance")) & present
    missing = [k for k in ("metric_vs_budget", "time_ratios", "importance", "matrices", "curves")
               if not plots.get(k) and (k != "importance" or draws_importance)]
    if missing:
        L += ["", f"Plots not drawn for lack of data: {', '.join(missing)}."]
    return "\n".join(L) + "\n"


# ---- the entry point ---------------------------------------------------------------------------------


def write_report(run_dirs: Sequence[Path], out_dir: Path, reference: str | None = None) -> dict[str, Any]:
    """Scan run_dirs, write report.md, summary.json, summary.csv and the PNGs into out_dir.

    `reference`: the column every other is compared with and timed against (default: the registry's reference
    method, LoRA; a name given must be a column of some protocol). Returns {"main_table": markdown, "report": path,
    "summary": path, "csv": path, "plots": [paths], "protocols": [per-protocol summaries]}. Raises
    UserError for a path that does not exist, an unknown reference, or when no complete run is found.
    """
    run_dirs = [Path(d) for d in run_dirs]
    out_dir = Path(out_dir)
    protocols = discover(run_dirs)
    complete = sum(r.status == Status.COMPLETE for p in protocols for r in p.runs)
    if not complete:
        counts: dict[str, int] = defaultdict(int)
        for p in protocols:
            for r in p.runs:
                counts[str(r.status)] += 1
        found = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no run directory at all"
        raise UserError(f"no complete run (result.json with status complete) under {', '.join(map(str, run_dirs))}: "
                        f"found {found}")
    summaries = [(p, summarise_protocol(p, reference or default_reference())) for p in protocols if p.runs or p.expected]
    if reference is not None and not any(reference in s["methods"] for _, s in summaries):
        found = sorted({m for _, s in summaries for m in s["methods"]})
        raise UserError(f"reference {reference!r} is no column of these runs; columns found: {', '.join(found)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {m: s["names"][m] for _, s in summaries for m in s["methods"]}
    parts = [f"# {' vs '.join(names.values()) or 'Runs'}: report", "",
             "Generated by `fwlora report` from " + ", ".join(f"`{d}`" for d in run_dirs) +
             ". Every number below is computed from the runs' result.json files.", ""]
    if len(protocols) > 1:
        parts += ["Protocols (each compared within itself only): " + "; ".join(p.label for p in protocols), ""]
    all_plots, tables = [], []
    for i, (p, s) in enumerate(summaries, start=1):
        prefix = f"p{i}_{slug(p.label)}"[:80]
        plots = write_plots(p, s, out_dir, prefix)
        s["plots"] = plots
        all_plots += [str(out_dir / n) for kinds in plots.values() for n in kinds]
        tables.append(f"**{p.label}**\n\n{main_table(s)}")
        parts.append(protocol_markdown(s, plots))
        log.info("protocol %s: %d runs, %d cells, %d plots", p.label, len(p.runs), len(s["cells"]),
                 sum(len(v) for v in plots.values()))
    report_path = write_text_atomic(out_dir / "report.md", "\n".join(parts))
    plain = [s for _, s in summaries]
    summary_path = write_json(out_dir / "summary.json", {"run_dirs": [str(d) for d in run_dirs], "protocols": plain})
    csv_path = write_text_atomic(out_dir / "summary.csv", summary_csv(plain))
    return {"main_table": "\n\n".join(tables), "report": str(report_path), "summary": str(summary_path),
            "csv": str(csv_path), "plots": all_plots, "protocols": plain}


# diff_vs_lora_* and the ratios are against the protocol's reference (LoRA unless --reference says otherwise)
CSV_COLUMNS = ("protocol", "task", "budget_label", "rank", "lora_percent", "method", "metric", "seeds_expected",
               "seeds_complete", "failed", "running", "missing", "final_mean", "final_std", "best_mean", "best_std",
               "adapter_params", "head_params", "actual_percent", "train_seconds_mean", "step_seconds_median_mean",
               "time_ratio_median", "step_ratio_median", "ratio_pairs", "diff_vs_lora_mean", "diff_vs_lora_low",
               "diff_vs_lora_high", "base_method", "reference", "higher_is_better", "params_initial", "params_final",
               "params_mean", "majority", "at_majority")


def summary_csv(summaries: Sequence[dict[str, Any]]) -> str:
    """One row per protocol x task x budget x column ("method" holds the column's label)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for s in summaries:
        ref = s.get("reference") or default_reference()
        for c in s["cells"]:
            for m, st in c["methods"].items():
                ci = c["pairs"].get(f"{m}-{ref}") or {}
                tr, sr, params = st.get("time_ratio") or {}, st.get("step_ratio") or {}, st.get("params") or {}
                w.writerow([s["label"], c["task"], c["budget_label"], c["rank"], c["lora_percent"], m, c["metric"],
                            st["expected"], st["complete"], st.get("failed", 0), st.get("running", 0) + st.get("interrupted", 0),
                            st.get("missing", 0), st["final"]["mean"], st["final"]["std"], st["best"]["mean"],
                            st["best"]["std"], st.get("adapter_params"), st.get("head_params"), st.get("actual_percent"),
                            st["train_seconds"]["mean"], st["step_seconds_median"]["mean"],
                            1.0 if m == ref else tr.get("median"), 1.0 if m == ref else sr.get("median"),
                            tr.get("n"), ci.get("mean"), ci.get("low"), ci.get("high"),
                            (s.get("method_of") or {}).get(m, m), ref, c.get("higher_is_better", True),
                            params.get("initial"), params.get("final"), params.get("mean"), c.get("majority"),
                            st.get("at_majority", False)])
    return buf.getvalue()
