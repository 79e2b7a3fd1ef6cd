"""The table "where AdaLoRA's edge comes from", from the run records of one or more benches.

    python benchmarks/edge_table.py results/adalora-edge/records/adalora-edge results/widecut/records/widecut \
        --reference lora --rival adalora --output results/adalora-edge/edge.md

For each task and each column: the final metric (mean ± std over seeds), its paired difference with the
reference (LoRA) and with the rival (AdaLoRA; 95 % Student t over seeds), the adapter parameters it trained
(at the start, at the end, the mean over the steps), its training time over the reference's (median of
per-seed ratios, each between two runs of one session: see --session), and where its update went (the share
of sum_m ||dW_m||^2 on each matrix type, mean over seeds); then every difference pooled over the tasks (per seed the mean over tasks, as the GLUE score averages
them). Benches run apart are joined column by column, and only where every column they share has the same
final metric on every seed (the same runs: training is deterministic for a seed and its settings).

With --goal COLUMN, a last section judges that column against a goal: it must beat (paired 95 % interval
above 0) the rival and the best column of a method PEFT ships (the highest mean over the pooled tasks; the
registry says which methods PEFT ships) on at least --goal-tasks of the tasks and pooled, at no more than
--time-limit times the reference's training time (the mean over tasks of each task's median ratio; default:
the method's own claimed limit). Every column's pooled mean ± std and pooled time ratio are shown beside it.
With --parts start=loraone,capacity=widecut, what each idea carries: each part's gain over the reference, the
goal column's, and their interaction (goal − Σ parts + (n − 1) reference, per seed: 0 where the gains add).

A committed report whose records are not in the repository gives columns from its summary.json (final metric
per seed only): `--summary results/fwrank/summary.json:adalora=adalora_noorth,lora=lora`. A column that a
bench also holds (here lora) must have the same final metric on every seed: a check that the bench
reproduces the committed runs.

Times from different sessions' machines are not comparable (MiniLM's SST-2 step took 0.38 s in one session,
0.48 s in another): a time ratio is taken only between two runs whose benches are named in one `--session DIR,DIR`
(benches run one after another, alone, on one machine). Without --session each bench directory is its own
session. Within a session, a pair is two runs timed whole on one machine boot (timing.boot_ids): a bench resumed
on another machine pairs only the runs each machine made, and a run resumed on another machine pairs with none.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from fwlora import analysis, methods  # noqa: E402
from fwlora.records import RunBudget, RunTiming, Status, same_machine  # noqa: E402
from fwlora.report.load import discover  # noqa: E402
from fwlora.report.stats import mean_std, paired_ci  # noqa: E402
from fwlora.report.text import fmt, fmt_ci, fmt_count, fmt_mean_std, fmt_ratio, markdown_table  # noqa: E402

KINDS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
         "intermediate.dense", "output.dense")


class SummaryRun:
    """A committed run known only by its final metric (a summary.json's final_by_seed)."""

    def __init__(self, metric: str, final: float) -> None:
        self.metric, self.final, self.timing, self.budget, self.matrices = metric, final, RunTiming(), RunBudget(), None
        self.method = self.train_seconds = self.init_seconds = None

    def metric_value(self, which: str) -> float:
        return self.final


def _join(cell: dict, task: str, label: str, seed: int, run) -> None:
    old = cell.get(seed)
    if old is not None and old.metric_value("final") != run.metric_value("final"):
        raise SystemExit(f"{task} {label} seed {seed}: two sources hold different runs "
                         f"({old.metric_value('final')} and {run.metric_value('final')}); not joined")
    if old is None or isinstance(old, SummaryRun):  # a full record wins over a summary's number
        cell[seed] = run


def collect(dirs: list[Path], summaries: list[str] = (), timings: dict | None = None) -> dict:
    """{task: {column: {seed: record}}}, joined over the benches and summaries (refusing a column that differs).
    `timings`, when given, is filled with {(task, column, seed): {(bench dir, boot ids): train seconds}}: every
    timed copy, with the machine boots that timed it (() where the record does not say)."""
    out: dict[str, dict[str, dict[int, object]]] = defaultdict(lambda: defaultdict(dict))
    for directory in dirs:
        for protocol in discover([directory]):
            for run in protocol.runs:
                if run.status == Status.COMPLETE and run.result is not None:
                    _join(out[run.task][run.label], run.task, run.label, run.seed, run.result)
                    if timings is not None and run.result.train_seconds is not None:
                        key = (run.task, run.label, run.seed)
                        timings.setdefault(key, {})[(directory.resolve(), tuple(run.result.machines))] = \
                            run.result.train_seconds
    for spec in summaries:
        path, _, names = spec.partition(":")
        rename = dict(pair.split("=", 1) for pair in names.split(",") if pair)
        for protocol in json.loads(Path(path).read_text(encoding="utf-8"))["protocols"]:
            for cell in protocol["cells"]:
                if cell["task"] not in out:
                    continue  # only the tasks a bench ran
                for label, new in rename.items():
                    for seed, final in (cell["methods"].get(label) or {}).get("final_by_seed", {}).items():
                        _join(out[cell["task"]][new], cell["task"], new, int(seed), SummaryRun(cell["metric"], final))
    return out


def share(record) -> dict[str, float]:
    norms = {m["name"]: (m.get("fro_norm") or 0.0) ** 2 for m in record.matrices or []}
    return analysis.share_by_kind(norms)


def time_ratios(task: str, label: str, reference: str, timings: dict, sessions: list[set[Path]]) -> list[float]:
    """Per seed, this column's training time over the reference's, from runs of one session and one machine
    boot only (a bench resumed on another machine pairs only the runs each machine made)."""
    ratios = []
    for (t, lab, seed), mine in timings.items():
        if t != task or lab != label:
            continue
        ref = timings.get((task, reference, seed), {})
        pairs = [mine[a] / ref[b] for a in mine for b in ref
                 if any(a[0] in s and b[0] in s for s in sessions) and same_machine(a[1], b[1])]
        if pairs:
            ratios.append(statistics.median(pairs))
    return ratios


def over_seeds(per_seed: dict[int, float]) -> str:
    """Mean ± std over seeds and how many ("(1 seed)" alone where there is one)."""
    text = fmt_mean_std(mean_std(list(per_seed.values())))
    return text if len(per_seed) == 1 else f"{text} ({len(per_seed)})"


def finals(runs: dict) -> dict[int, float]:
    return {s: r.metric_value("final") for s, r in runs.items()}


def paired_difference(a: dict[int, float], b: dict[int, float]):
    """The paired interval of a − b over their shared seeds."""
    seeds = sorted(set(a) & set(b))
    return paired_ci([a[s] - b[s] for s in seeds], seeds)


def rows_for(task: str, columns: dict, order: list[str], reference: str, rival: str,
             timings: dict | None = None, sessions: list[set[Path]] = ()) -> tuple[list, dict]:
    ref, riv = finals(columns.get(reference, {})), finals(columns.get(rival, {}))
    rows, diffs = [], {}
    for label in [c for c in order if c in columns]:
        runs = columns[label]
        mine = finals(runs)
        vs = {"ref": paired_difference(mine, ref), "rival": paired_difference(mine, riv)}
        diffs[label] = vs
        b = next(iter(runs.values())).budget
        ratios = time_ratios(task, label, reference, timings or {}, list(sessions))
        shares = [share(r) for r in runs.values() if r.matrices]
        kind_share = {k: statistics.fmean(s.get(k, 0.0) for s in shares) if shares else None for k in KINDS}
        init = [r.init_seconds / r.train_seconds for r in runs.values() if r.init_seconds is not None and r.train_seconds]
        rows.append([label, over_seeds(mine),
                     "—" if label == reference else fmt_ci(vs["ref"]), "—" if label == rival else fmt_ci(vs["rival"]),
                     f"{fmt_count(b.trained_adapter_params_initial)} → {fmt_count(b.trained_adapter_params_final)}"
                     f" (mean {fmt_count(b.trained_adapter_params_mean)})",
                     fmt_ratio(statistics.median(ratios), 2) if ratios and label != reference else "1" if label == reference else "—",
                     *[fmt(100 * kind_share[k], 1) if kind_share[k] is not None else "—" for k in KINDS],
                     f"{fmt(100 * statistics.median(init), 1)} %" if init else "—"])
    if all(row[-1] == "—" for row in rows):  # no column has a timed initialisation: no column for it
        rows = [row[:-1] for row in rows]
    return rows, diffs


def pooled_finals(data: dict, label: str, tasks: list[str]) -> dict[int, float]:
    """Per seed, the mean over the tasks of the column's final metric (seeds that ran every task)."""
    per_task = [finals(data[t].get(label, {})) for t in tasks]
    seeds = set.intersection(*(set(f) for f in per_task)) if per_task else set()
    return {s: statistics.fmean(f[s] for f in per_task) for s in sorted(seeds)}


def pooled_time(data: dict, label: str, tasks: list[str], reference: str, timings: dict, sessions) -> float | None:
    """The mean over tasks of each task's median per-seed time ratio to the reference (None: a task untimed)."""
    medians = []
    for t in tasks:
        ratios = time_ratios(t, label, reference, timings, sessions)
        if not ratios:
            return None
        medians.append(statistics.median(ratios))
    return statistics.fmean(medians)


def method_of(data: dict, label: str) -> str | None:
    return next((r.method for cols in data.values() for r in cols.get(label, {}).values() if r.method), None)


def goal_section(data: dict, goal: str, tasks: list[str], reference: str, rival: str, need: int,
                 limit: float | None, timings: dict, sessions) -> list[str]:
    """Every column pooled (mean ± std, time / reference), then the goal column against the rival and the best
    column of a PEFT-shipped method: wins per task and pooled, the time, and the verdict."""
    labels = list(dict.fromkeys(label for t in tasks for label in data[t]))
    pooled = {label: pooled_finals(data, label, tasks) for label in labels}
    times = {label: pooled_time(data, label, tasks, reference, timings, sessions) for label in labels}
    rows = [[label, over_seeds(pooled[label]),
             fmt_ratio(times[label], 2) if times[label] is not None else "—"] for label in labels]
    lines = [f"### pooled over {', '.join(tasks)}: every column, and the goal of {goal}", "",
             markdown_table(["column", "mean over tasks (seeds)", f"time / {reference}"], rows), ""]
    shipped = [label for label in labels if label != goal and methods.ships_with(method_of(data, label)) == "peft"]
    best = max(shipped, key=lambda label: statistics.fmean(pooled[label].values()) if pooled[label] else float("-inf"),
               default=None)
    if goal not in labels:
        return lines + [f"{goal}: no runs on these tasks; no verdict", ""]
    if limit is None:
        claim = methods.time_hypothesis(method_of(data, goal) or goal)
        limit = claim.limit if claim is not None else None
    opponents = list(dict.fromkeys(x for x in (rival, best) if x is not None and x in labels and x != goal))
    met = bool(opponents)
    rows = []
    for other in opponents:
        per_task = {t: paired_difference(finals(data[t].get(goal, {})), finals(data[t].get(other, {}))) for t in tasks}
        won = [t for t, ci in per_task.items() if ci.low is not None and ci.low > 0]
        whole = paired_difference(pooled[goal], pooled[other])
        pooled_won = whole.low is not None and whole.low > 0
        met &= len(won) >= need and pooled_won
        rows.append([other + (" (best PEFT column)" if other == best else ""),
                     *[fmt_ci(per_task[t]) for t in tasks], fmt_ci(whole), f"{len(won)} of {len(tasks)}",
                     "yes" if pooled_won else "no"])
    time_ok = limit is not None and times[goal] is not None and times[goal] <= limit
    met &= time_ok
    lines += [markdown_table(["against", *[f"{goal} − it, {t}" for t in tasks], "pooled", "tasks won", "pooled won"],
                             rows), "",
              f"Time: {fmt_ratio(times[goal], 2) if times[goal] is not None else 'not measured'} {reference}'s "
              f"(limit {f'{limit:g}x' if limit is not None else 'none'}). "
              f"**Goal {'met' if met else 'not met'}**: {goal} must beat each of {', '.join(opponents) or 'no one'} "
              f"on at least {need} of {len(tasks)} tasks and pooled (95 % interval above 0), within the time limit.", ""]
    return lines


def parts_section(data: dict, parts: dict[str, str], joint: str, tasks: list[str], reference: str) -> list[str]:
    """Which part of the joint column's gain over the reference each idea carries: every part's column − the
    reference and the joint's, per task and pooled, and the interaction joint − Σ parts + (n − 1) reference
    per seed (0 where the ideas add up; paired 95 % intervals)."""
    columns = {**parts, "together": joint}
    rows = []
    for t in [*tasks, "pooled"]:
        values = {label: pooled_finals(data, label, tasks) if t == "pooled" else finals(data[t].get(label, {}))
                  for label in [reference, *columns.values()]}
        ref = values[reference]
        gains = {name: paired_difference(values[label], ref) for name, label in columns.items()}
        seeds = sorted(set(ref).intersection(*(set(v) for v in values.values())))
        interaction = [values[joint][s] - sum(values[label][s] for label in parts.values()) + (len(parts) - 1) * ref[s]
                       for s in seeds]
        rows.append([t, *[fmt_ci(gains[name]) for name in columns], fmt_ci(paired_ci(interaction, seeds))])
    header = ["task", *[f"{name} ({label}) − {reference}" for name, label in columns.items()], "interaction"]
    return [f"### what each idea carries: {joint} against its parts", "", markdown_table(header, rows), ""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("--reference", default=methods.reference_name(), help="the column timed against (default: %(default)s)")
    p.add_argument("--rival", default=methods.rival_name(), help="the column every one is also compared with (default: %(default)s)")
    p.add_argument("--columns", help="the columns, in order (default: as found)")
    p.add_argument("--summary", action="append", default=[], metavar="SUMMARY.json:LABEL=COLUMN,...",
                   help="columns from a committed report's summary.json (final metric per seed only)")
    p.add_argument("--session", action="append", default=[], metavar="DIR,DIR,...",
                   help="bench directories run in one session on one machine (time ratios only within one)")
    p.add_argument("--pool", action="append", default=[], metavar="TASK,TASK,...",
                   help="a pooled table over these tasks (repeatable; default: one over every task found)")
    p.add_argument("--goal", metavar="COLUMN", help="judge this column against the goal (see above)")
    p.add_argument("--goal-tasks", type=int, default=2, help="tasks it must win of the pooled ones (default: %(default)s)")
    p.add_argument("--time-limit", type=float, help="its time over the reference's at most this (default: its claim)")
    p.add_argument("--parts", metavar="IDEA=COLUMN,...", help="with --goal: the columns that carry one idea each of "
                   "the goal column (e.g. start=loraone,capacity=widecut): each one's gain and their interaction")
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
    if args.parts and (not args.goal or any("=" not in pair for pair in args.parts.split(",") if pair)):
        p.error("--parts takes IDEA=COLUMN,... and needs --goal")
    timings: dict = {}
    data = collect(args.dirs, args.summary, timings)
    sessions = [{Path(d).resolve() for d in spec.split(",") if d} for spec in args.session]
    sessions += [{d.resolve()} for d in args.dirs if not any(d.resolve() in s for s in sessions)]
    lines = []
    pooled: dict[str, dict[str, dict[int, dict[str, float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for task, columns in data.items():
        order = args.columns.split(",") if args.columns else list(columns)
        rows, diffs = rows_for(task, columns, order, args.reference, args.rival, timings, sessions)
        metric = next(iter(next(iter(columns.values())).values())).metric
        header = ["column", f"{task} {metric} (seeds)", f"− {args.reference} [95 % CI]", f"− {args.rival} [95 % CI]",
                  "adapter params trained: start → end (mean over steps)", f"time / {args.reference}",
                  *[f"‖dW‖² % {analysis.kind_label(k)}" for k in KINDS]]
        if rows and len(rows[0]) > len(header):
            header.append("of its time: the initialisation")
        lines += [f"### {task}", "", markdown_table(header, rows), ""]
        for label, vs in diffs.items():
            for name, ci in vs.items():
                for seed, d in zip(ci.seeds, ci.diffs):
                    pooled[label][name][seed][task] = d
    pools = [[t for t in spec.split(",") if t] for spec in args.pool] or ([list(data)] if len(data) > 1 else [])
    for tasks in pools:
        rows = []
        for label, vs in pooled.items():
            cells = []
            for name in ("ref", "rival"):
                per_seed = [statistics.fmean(v[t] for t in tasks) for v in vs[name].values() if all(t in v for t in tasks)]
                cells.append(fmt_ci(paired_ci(per_seed)) if per_seed else "—")
            rows.append([label, *cells])
        lines += [f"### pooled over {', '.join(tasks)} (per seed the mean over tasks of each paired difference)", "",
                  markdown_table(["column", f"− {args.reference} [95 % CI]", f"− {args.rival} [95 % CI]"], rows), ""]
    if args.goal:
        lines += goal_section(data, args.goal, pools[0] if pools else list(data), args.reference, args.rival,
                              args.goal_tasks, args.time_limit, timings, sessions)
        if args.parts:
            parts = dict(pair.split("=", 1) for pair in args.parts.split(",") if pair)
            lines += parts_section(data, parts, args.goal, pools[0] if pools else list(data), args.reference)
    text = "\n".join(lines)
    print(text)
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
