"""Per-cell and per-column statistics of a protocol and the comparisons between columns (verdicts.py writes the
verdict lines and the pooled views). Plain data in, plain data out (what summary.json holds).

Columns are labels (a method, or a bench's named variant of one), ordered by the method registry and
then by label. Every column is compared with the reference (LoRA unless told otherwise) and with
AdaLoRA (when present); each comparison gets a verdict line, and every column but the reference a time
verdict: its method's claim (the registry's; ~1.01x by default, AdaLoRA's ~1.12x).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from fwlora.records import RunRecord, Status
from fwlora.report.columns import Columns, columns_of, default_reference
from fwlora.report.load import Protocol, Run, budget_sort_key
from fwlora.report.matrices import matrix_question
from fwlora.report.settings import bench_header, protocol_env, protocol_settings
from fwlora.report.stats import at_majority, mean_std, median_ratio, paired_ci
from fwlora.report.text import ok
from fwlora.report.verdicts import cell_verdicts, pooled, pooled_over_tasks

# release 1 wrote FW-LoRA's warm-up timings under fw_* names; schema 2 names them for any method
LEGACY_TIMING = {"warmup_step_seconds_median": "fw_warmup_step_seconds_median",
                 "after_warmup_step_seconds_median": "fw_after_warmup_step_seconds_median",
                 "warmup_seconds": "fw_warmup_seconds"}
_NOT_COMPLETE = ("failed", "running", "interrupted", "pruned", "unreadable")


# ---- one record ------------------------------------------------------------------------------------


def best_entry(rec: RunRecord) -> dict[str, Any]:
    """The best epoch by the headline metric in the record's direction (lower is better for a loss);
    the record's own `best` when its epochs do not carry the metric."""
    scored = [e for e in rec.epochs or [] if ok(e.get(rec.metric))]
    if not scored:
        return rec.best or {}
    pick = max if rec.higher_is_better else min
    return pick(scored, key=lambda e: float(e[rec.metric]))


def best_metric(rec: RunRecord) -> float | None:
    v = best_entry(rec).get(rec.metric)
    return float(v) if ok(v) else None


def timing(rec: RunRecord, key: str) -> float | None:
    t = rec.timing or {}
    v = t.get(key)
    if v is None and key in LEGACY_TIMING:
        v = t.get(LEGACY_TIMING[key])
    return float(v) if ok(v) else None


def majority_value(records: Sequence[RunRecord], metric: str | None) -> float | None:
    """What a constant majority-class predictor scores on the eval set: from the records' data
    (schema 2), else 0 for MCC (true of any constant predictor), else unknown."""
    for rec in records:
        v = ((rec.data or {}).get("majority") or {}).get(metric)
        if ok(v):
            return float(v)
    return 0.0 if metric == "mcc" else None


# ---- one column in one cell ------------------------------------------------------------------------


def seeds_text(stat: dict[str, Any]) -> str:
    """'3/3 seeds', '2/3 seeds, 1 failed', '0/3 seeds, 2 running, 1 missing'."""
    text = f"{stat['complete']}/{stat['expected']} seed{'s' if stat['expected'] != 1 else ''}"
    extra = [f"{stat[k]} {k}" for k in (*_NOT_COMPLETE, "missing") if stat.get(k)]
    return text + (", " + ", ".join(extra) if extra else "")


def _complete(runs: dict[int, Run]) -> dict[int, RunRecord]:
    return {s: r.record for s, r in runs.items() if r.status == Status.COMPLETE and r.record is not None}


def method_stats(runs: dict[int, Run], expected_seeds: Sequence[int], reference: dict[int, Run] | None) -> dict[str, Any]:
    """Per (task, budget, column): seeds done, metric mean/std (final, best), parameters trained, time
    and time ratios to the reference (median of per-seed ratios)."""
    complete = _complete(runs)
    counts: dict[str, int] = defaultdict(int)
    for r in runs.values():
        if r.status != Status.COMPLETE:
            counts[str(r.status) if str(r.status) in _NOT_COMPLETE else "unreadable"] += 1
    expected = sorted(set(expected_seeds) | set(runs))
    counts["missing"] = len([s for s in expected if s not in runs])
    stat: dict[str, Any] = {"expected": len(expected), "complete": len(complete), **counts,
                            "seeds_complete": sorted(complete),
                            "errors": {str(s): r.error for s, r in runs.items() if r.error}}
    stat["seeds_text"] = seeds_text(stat)
    final = {s: r.metric_value("final") for s, r in complete.items()}
    stat["final_by_seed"] = {str(s): v for s, v in final.items()}
    stat["final"] = mean_std(list(final.values()))
    stat["best"] = mean_std([best_metric(r) for r in complete.values()])
    stat["best_epoch"] = mean_std([best_entry(r).get("epoch") for r in complete.values()])
    train = {s: timing(r, "train_seconds") for s, r in complete.items()}
    step = {s: timing(r, "step_seconds_median") for s, r in complete.items()}
    stat["train_seconds"] = mean_std(list(train.values()))
    stat["step_seconds_median"] = mean_std(list(step.values()))
    if complete:
        first = complete[min(complete)]
        b = first.budget or {}
        backbone, adapter = b.get("backbone_params"), b.get("adapter_trainable_params")
        params = {k: b.get(f"trained_adapter_params_{k}") for k in ("initial", "final", "mean")}
        spent = params["mean"] if ok(params["mean"]) else adapter  # the mean over steps when the record has it
        stat.update(rank=b.get("rank"), lora_percent=b.get("percent"), adapter_params=adapter,
                    params=params if any(ok(v) for v in params.values()) else None,
                    head_params=b.get("head_params"), backbone_params=backbone,
                    actual_percent=100.0 * spent / backbone if ok(spent) and spent and ok(backbone) and backbone else None,
                    metric=first.metric, higher_is_better=first.higher_is_better)
        if first.method_info:
            stat["method_info"] = first.method_info
        totals = [(r.method_info or {}).get("final_total_rank") for r in complete.values()]
        if any(ok(v) for v in totals):
            stat["final_total_rank"] = mean_std(totals)
        for key in LEGACY_TIMING:
            values = [timing(r, key) for r in complete.values()]
            if any(v is not None for v in values):
                stat[key] = mean_std(values)
    if reference is not None:
        ref_done = _complete(reference)
        stat["time_ratio"] = median_ratio(train, {s: timing(r, "train_seconds") for s, r in ref_done.items()})
        stat["step_ratio"] = median_ratio(step, {s: timing(r, "step_seconds_median") for s, r in ref_done.items()})
    return stat


def curve(records: Sequence[RunRecord]) -> dict[str, list]:
    """Metric per epoch, mean and std over seeds (epochs a run does not have are left out of its mean)."""
    per_epoch: dict[int, list[float]] = defaultdict(list)
    for r in records:
        for e in r.epochs or []:
            v = e.get(r.metric)
            if ok(v) and e.get("epoch") is not None:
                per_epoch[int(e["epoch"])].append(float(v))
    epochs = sorted(per_epoch)
    stats = [mean_std(per_epoch[e]) for e in epochs]
    return {"epoch": epochs, "mean": [s["mean"] for s in stats], "std": [s["std"] for s in stats],
            "n": [s["n"] for s in stats]}


# ---- a protocol --------------------------------------------------------------------------------------


def summarise_protocol(p: Protocol, reference: str | None = None) -> dict[str, Any]:
    """Every number of one protocol's tables, as plain data (what summary.json holds)."""
    cols = columns_of(p, reference or default_reference())
    by: dict[tuple[str, str], dict[str, dict[int, Run]]] = defaultdict(lambda: defaultdict(dict))
    for r in p.runs:
        by[(r.task, r.budget_label)][r.label][r.seed] = r
    for task, budget, _label, _seed in p.expected:
        by[(task, budget)]  # a cell the bench planned but that holds nothing yet
    tasks = _ordered_tasks(p)
    cells = []
    for task in tasks:
        for budget in sorted({b for (t, b) in by if t == task}, key=budget_sort_key):
            cells.append(_cell(p, cols, task, budget, by[(task, budget)]))
    return {"label": p.label, "root": str(p.root), "split": p.split, "notes": p.notes, "methods": cols.labels,
            "method_of": cols.method_of, "names": cols.names, "reference": cols.reference, "rival": cols.rival,
            "tasks": tasks,
            "cells": cells, "pooled": pooled(cells, cols),
            "pooled_over_tasks": pooled_over_tasks(cells, cols), "settings": protocol_settings(p, cols.labels, cols.method_of),
            "env": protocol_env(p), "bench": bench_header(p), "counts": dict(sorted(_count_status(p).items()))}


def _cell(p: Protocol, cols: Columns, task: str, budget: str, runs: dict[str, dict[int, Run]]) -> dict[str, Any]:
    seeds = {s for m in runs.values() for s in m} | {e[3] for e in p.expected if e[:2] == (task, budget)}
    ref_runs = runs.get(cols.reference) if cols.reference in cols.labels else None
    stats = {}
    for lb in cols.labels:
        exp = {e[3] for e in p.expected if e[:3] == (task, budget, lb)} if p.expected else seeds
        if not runs.get(lb) and not exp:
            continue
        stats[lb] = method_stats(runs.get(lb, {}), sorted(exp), ref_runs if lb != cols.reference else None)
    done = {lb: _complete(runs.get(lb, {})) for lb in cols.labels}
    records = [r for d in done.values() for r in d.values()]
    metric = records[0].metric if records else task_metric(task)
    higher = records[0].higher_is_better if records else True
    pairs = {}
    for a, b in cols.pairs():
        common = sorted(set(done[a]) & set(done[b]))
        diffs = [done[a][s].metric_value("final") - done[b][s].metric_value("final") for s in common]
        pairs[f"{a}-{b}"] = paired_ci(diffs) | {"seeds": common, "diffs": diffs}
    majority = majority_value(records, metric)
    for st in stats.values():
        st["at_majority"] = bool(st["complete"]) and at_majority(st["final"]["mean"], majority)
    cell = {"task": task, "budget_label": budget, "metric": metric, "higher_is_better": higher, "majority": majority,
            "rank": next((s.get("rank") for s in stats.values() if s.get("rank")), None),
            "lora_percent": next((s.get("lora_percent") for s in stats.values() if s.get("lora_percent")), None),
            "methods": stats, "pairs": pairs,
            "curves": {lb: curve(list(done[lb].values())) for lb in cols.labels if done[lb]},
            "matrices": matrix_question(done, cols.method_of, cols.reference)}
    cell["verdicts"] = cell_verdicts(cell, cols)
    return cell


def task_metric(task: str) -> str | None:
    """The task's metric when no complete run says it (mcc for CoLA, accuracy otherwise)."""
    from fwlora.errors import UserError
    from fwlora.tasks import get_task

    try:
        return get_task(task).metric
    except UserError:  # an unknown task name in a hand-made directory: say nothing rather than fail
        return None


def _ordered_tasks(p: Protocol) -> list[str]:
    order = []
    for key in (p.bench or {}).get("runs") or []:
        task = str(key).split("/")[0]
        if task not in order:
            order.append(task)
    return [t for t in order if any(r.task == t for r in p.runs) or any(e[0] == t for e in p.expected)] + \
        sorted({r.task for r in p.runs} - set(order))


def _count_status(p: Protocol) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for r in p.runs:
        counts[str(r.status)] += 1
    have = {r.key for r in p.runs}
    counts["missing"] = len([e for e in p.expected if e not in have])
    return counts
