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

A committed report whose records are not in the repository gives columns from its summary.json (final metric
per seed only): `--summary results/fwrank/summary.json:adalora=adalora_noorth,lora=lora`. A column that a
bench also holds (here lora) must have the same final metric on every seed: a check that the bench
reproduces the committed runs.

Times from different sessions' machines are not comparable (MiniLM's SST-2 step took 0.38 s in one session,
0.48 s in another): a time ratio is taken only between two runs whose benches are named in one `--session DIR,DIR`
(benches run one after another, alone, on one machine). Without --session each bench directory is its own
session.
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

from fwlora import analysis  # noqa: E402
from fwlora.records import Status  # noqa: E402
from fwlora.report.load import discover  # noqa: E402
from fwlora.report.stats import mean_std, paired_ci  # noqa: E402
from fwlora.report.text import fmt, fmt_ci, fmt_count, fmt_mean_std, fmt_ratio, markdown_table  # noqa: E402

KINDS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
         "intermediate.dense", "output.dense")


class SummaryRun:
    """A committed run known only by its final metric (a summary.json's final_by_seed)."""

    def __init__(self, metric: str, final: float) -> None:
        self.metric, self.final, self.timing, self.budget, self.matrices = metric, final, {}, {}, None

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
    `timings`, when given, is filled with {(task, column, seed): {bench dir: train seconds}}: every timed copy."""
    out: dict[str, dict[str, dict[int, object]]] = defaultdict(lambda: defaultdict(dict))
    for directory in dirs:
        for protocol in discover([directory]):
            for run in protocol.runs:
                if run.status == Status.COMPLETE and run.result is not None:
                    _join(out[run.task][run.label], run.task, run.label, run.seed, run.result)
                    if timings is not None and run.result.timing:
                        key = (run.task, run.label, run.seed)
                        timings.setdefault(key, {})[directory.resolve()] = run.result.timing["train_seconds"]
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
    """Per seed, this column's training time over the reference's, from runs of one session only."""
    ratios = []
    for (t, lab, seed), mine in timings.items():
        if t != task or lab != label:
            continue
        ref = timings.get((task, reference, seed), {})
        pairs = [mine[a] / ref[b] for a in mine for b in ref if any(a in s and b in s for s in sessions)]
        if pairs:
            ratios.append(statistics.median(pairs))
    return ratios


def rows_for(task: str, columns: dict, order: list[str], reference: str, rival: str,
             timings: dict | None = None, sessions: list[set[Path]] = ()) -> tuple[list, dict]:
    ref, riv = columns.get(reference, {}), columns.get(rival, {})
    rows, diffs = [], {}
    for label in [c for c in order if c in columns]:
        runs = columns[label]
        finals = {s: r.metric_value("final") for s, r in runs.items()}
        vs = {}
        for other, name in ((ref, "ref"), (riv, "rival")):
            seeds = sorted(set(finals) & set(other))
            d = [finals[s] - other[s].metric_value("final") for s in seeds]
            vs[name] = paired_ci(d, seeds)
        diffs[label] = vs
        b = next(iter(runs.values())).budget
        ratios = time_ratios(task, label, reference, timings or {}, list(sessions))
        shares = [share(r) for r in runs.values() if r.matrices]
        kind_share = {k: statistics.fmean(s.get(k, 0.0) for s in shares) if shares else None for k in KINDS}
        rows.append([label, f"{fmt_mean_std(mean_std(list(finals.values())))} ({len(finals)})",
                     "—" if label == reference else fmt_ci(vs["ref"]), "—" if label == rival else fmt_ci(vs["rival"]),
                     f"{fmt_count(b.get('trained_adapter_params_initial'))} → {fmt_count(b.get('trained_adapter_params_final'))}"
                     f" (mean {fmt_count(b.get('trained_adapter_params_mean'))})",
                     fmt_ratio(statistics.median(ratios), 2) if ratios and label != reference else "1" if label == reference else "—",
                     *[fmt(100 * kind_share[k], 1) if kind_share[k] is not None else "—" for k in KINDS]])
    return rows, diffs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("--reference", default="lora")
    p.add_argument("--rival", default="adalora")
    p.add_argument("--columns", help="the columns, in order (default: as found)")
    p.add_argument("--summary", action="append", default=[], metavar="SUMMARY.json:LABEL=COLUMN,...",
                   help="columns from a committed report's summary.json (final metric per seed only)")
    p.add_argument("--session", action="append", default=[], metavar="DIR,DIR,...",
                   help="bench directories run in one session on one machine (time ratios only within one)")
    p.add_argument("--pool", action="append", default=[], metavar="TASK,TASK,...",
                   help="a pooled table over these tasks (repeatable; default: one over every task found)")
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
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
    text = "\n".join(lines)
    print(text)
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
