"""The verdict lines of a report and its pooled views (over budgets, over tasks): each computed from the
intervals and ratios aggregate.py holds, each method's claim on time from the registry."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from fwlora import methods
from fwlora.report.columns import Columns
from fwlora.report.stats import difference_verdict, paired_ci
from fwlora.report.text import fmt, fmt_ci, fmt_ratio


def majority_words(names: Sequence[str], where: str = "") -> str:
    """'LoRA at the majority class: did not learn' ('where' narrows it: ' at r1, r2')."""
    return f"{', '.join(names)} at the majority class{where}: did not learn"


def majority_note(names: Sequence[str], where: str = "") -> str:
    """' (LoRA at the majority class: did not learn)' for the named columns; '' for none."""
    return f" ({majority_words(names, where)})" if names else ""


def _flag(cell: dict[str, Any], cols: Columns, *labels: str | None) -> str:
    flagged = [cols.name(lb) for lb in dict.fromkeys(x for x in labels if x)
               if (cell["methods"].get(lb) or {}).get("at_majority")]
    return majority_note(flagged)


def time_claim(hypothesis: Any, with_limit: bool = True) -> str:
    """'; hypothesis: ~1.01x, met if <= 1.02x' (a method's claim on time, as verdict lines state it); '' for none."""
    if hypothesis is None:
        return ""
    return f"; hypothesis: {hypothesis.describe() if with_limit else f'~{hypothesis.ratio:g}x'}"


def cell_verdicts(cell: dict[str, Any], cols: Columns) -> list[str]:
    """One line per comparison and per time hypothesis, computed from the intervals and ratios; a column
    at the majority class is flagged in every line that names it."""
    lines = []
    stats, pairs, hib = cell["methods"], cell["pairs"], cell.get("higher_is_better", True)
    rival = methods.rival_name()
    ref, ada, name = cols.reference, cols.rival or (rival if cols.reference == rival else None), cols.name
    for a, b in cols.pairs():
        ci = pairs.get(f"{a}-{b}")
        if ci is not None:
            lines.append(f"{name(a)} − {name(b)}: {fmt_ci(ci)}: {difference_verdict(ci, name(a), name(b), higher_is_better=hib)}"
                         + _flag(cell, cols, a, b))
    for lb in cols.labels:
        if lb == ref or cols.is_rival(lb):
            continue
        st = stats.get(lb, {})
        key = f"{lb}-{ada}"
        if key not in pairs and "time_ratio" not in st:
            continue
        tr, sr = (st.get("time_ratio") or {}).get("median"), (st.get("step_ratio") or {}).get("median")
        rival_name = name(rival) if rival else "the rival"
        head = (f"{name(lb)} vs {rival_name}: {fmt_ci(pairs[key])}: "
                f"{difference_verdict(pairs[key], name(lb), rival_name, higher_is_better=hib)}"
                if key in pairs else f"{name(lb)} vs {rival_name}: no {rival_name} runs")
        hyp = cols.hypothesis(lb)
        lines.append(f"**Verdict**: {head}; {name(lb)} time {fmt_ratio(tr, 3)} {name(ref)} (median step "
                     f"{fmt_ratio(sr, 3)}{time_claim(hyp)})" + (f": {hyp.verdict(tr, reference=name(ref))}" if hyp else "")
                     + _flag(cell, cols, lb, ada if key in pairs else None, ref))
        if st.get("complete") and (st.get("warmup_step_seconds_median") or {}).get("mean") is not None:
            ref_step = (stats.get(ref) or {}).get("step_seconds_median", {}).get("mean")
            lines.append(f"{name(lb)} median step: {fmt(st['warmup_step_seconds_median']['mean'], 4)} s during "
                         f"{cols.warmup_phase(lb)}, {fmt((st.get('after_warmup_step_seconds_median') or {}).get('mean'), 4)} "
                         f"s after it ({name(ref)}: {fmt(ref_step, 4)} s)")
    for lb in cols.labels:
        st = stats.get(lb, {})
        if lb != ref and cols.is_rival(lb) and "time_ratio" in st:
            tr, hyp = st["time_ratio"]["median"], cols.hypothesis(lb)
            lines.append(f"{name(lb)} time {fmt_ratio(tr, 3)} {name(ref)} (median step "
                         f"{fmt_ratio(st['step_ratio']['median'], 3)}{time_claim(hyp)})"
                         + (f": {hyp.verdict(tr, reference=name(ref))}" if hyp else "") + _flag(cell, cols, lb, ref))
    return lines


def pooled(cells: list[dict[str, Any]], cols: Columns) -> dict[str, Any]:
    """Per task, over all its budgets: paired differences with pairs = budget x seed, the median of all
    per-(budget, seed) time ratios, and the verdict lines."""
    out = {}
    for task in dict.fromkeys(c["task"] for c in cells):
        mine = [c for c in cells if c["task"] == task]
        hib = next((c.get("higher_is_better", True) for c in mine), True)
        entry: dict[str, Any] = {"budgets": [c["budget_label"] for c in mine]}
        for a, b in cols.pairs():
            diffs = [d for c in mine for d in (c["pairs"].get(f"{a}-{b}") or {}).get("diffs", [])]
            ci = paired_ci(diffs)
            entry[f"{a}-{b}"] = ci | {"verdict": difference_verdict(ci, cols.name(a), cols.name(b), unit="pairs",
                                                                    higher_is_better=hib)}
        for lb in cols.labels:
            if lb == cols.reference:
                continue
            for kind in ("time_ratio", "step_ratio"):
                ratios = [v for c in mine for v in ((c["methods"].get(lb) or {}).get(kind) or {}).get("ratios", {}).values()]
                if ratios:
                    entry[f"{lb}_{kind}"] = {"median": statistics.median(ratios), "n": len(ratios)}
        entry["at_majority"] = {lb: [c["budget_label"] for c in mine if (c["methods"].get(lb) or {}).get("at_majority")]
                                for lb in cols.labels}
        entry["at_majority"] = {lb: v for lb, v in entry["at_majority"].items() if v}
        entry["verdicts"] = _pooled_lines(entry, cols)
        out[task] = entry
    return out


def pooled_over_tasks(cells: list[dict[str, Any]], cols: Columns) -> dict[str, Any] | None:
    """Every task and budget at once, as the GLUE score averages its tasks' metrics: per seed, the mean
    over cells of (a - b) in each cell's own metric, then a Student t interval over seeds. Only seeds
    that every cell has a pair for count (each seed averages the same tasks); only for two or more
    tasks whose metrics all rise with quality."""
    tasks = list(dict.fromkeys(c["task"] for c in cells))
    if len(tasks) < 2 or not all(c.get("higher_is_better", True) for c in cells):
        return None
    out: dict[str, Any] = {"tasks": tasks, "cells": [f"{c['task']} {c['budget_label']}" for c in cells]}
    for a, b in cols.pairs():
        cell_pairs = [c["pairs"].get(f"{a}-{b}") or {} for c in cells]
        per_cell = [dict(zip(p.get("seeds", []), p.get("diffs", []))) for p in cell_pairs]
        seeds = sorted(set.intersection(*(set(d) for d in per_cell))) if per_cell else []
        means = [statistics.fmean(d[s] for d in per_cell) for s in seeds]
        ci = paired_ci(means)
        out[f"{a}-{b}"] = ci | {"seeds": seeds, "diffs": means,
                                "verdict": difference_verdict(ci, cols.name(a), cols.name(b))}
    out["verdicts"] = [f"{cols.name(a)} − {cols.name(b)}: {fmt_ci(out[f'{a}-{b}'])}: {out[f'{a}-{b}']['verdict']}"
                       for a, b in cols.pairs()]
    return out


def _pooled_lines(entry: dict[str, Any], cols: Columns) -> list[str]:
    name, ref = cols.name, cols.reference
    budgets = entry["budgets"]

    def flag(*labels: str) -> str:
        notes = []
        for lb in dict.fromkeys(labels):
            where = entry["at_majority"].get(lb)
            if where:
                notes.append(majority_words([name(lb)], "" if len(where) == len(budgets) else f" at {', '.join(where)}"))
        return f" ({'; '.join(notes)})" if notes else ""

    lines = []
    for a, b in cols.pairs():
        ci = entry.get(f"{a}-{b}")
        if ci is not None:
            lines.append(f"{name(a)} − {name(b)}: {fmt_ci(ci)}: {ci['verdict']}" + flag(a, b))
    for rival_pass in (False, True):
        for lb in cols.labels:
            tr = entry.get(f"{lb}_time_ratio")
            if lb == ref or not tr or cols.is_rival(lb) != rival_pass:
                continue
            hyp = cols.hypothesis(lb)
            verdict = f": {hyp.verdict(tr['median'], reference=name(ref))}" if hyp else ""
            claim = f"hypothesis ~{hyp.ratio:g}x" if hyp else ""
            if rival_pass:
                lines.append(f"{name(lb)} time {fmt_ratio(tr['median'], 3)} {name(ref)} over {tr['n']} pairs"
                             + (f" ({claim})" if hyp else "") + verdict + flag(lb, ref))
            else:
                lines.append(f"{name(lb)} time {fmt_ratio(tr['median'], 3)} {name(ref)} over {tr['n']} pairs (median step "
                             f"{fmt_ratio((entry.get(f'{lb}_step_ratio') or {}).get('median'), 3)}"
                             + (f"; {claim}" if hyp else "") + ")" + verdict + flag(lb, ref))
    return lines


def pooled_lines(task: str, entry: dict[str, Any]) -> list[str]:
    """The pooled verdict lines of one task (computed by pooled())."""
    return list(entry.get("verdicts") or [])
