"""The table "where AdaLoRA's edge comes from", from the run records of one or more benches.

    python benchmarks/edge_table.py results/adalora-edge/records/adalora-edge results/widecut/records/widecut \
        --reference lora --rival adalora --output results/adalora-edge/edge.md

For each task and each column: the final metric (mean ± std over seeds), its paired difference with the
reference (LoRA) and with the rival (AdaLoRA; 95 % Student t over seeds), the adapter parameters it trained
(at the start, at the end, the mean over the steps), its training time over the reference's (median of
per-seed ratios), and where its update went (the share of sum_m ||dW_m||^2 on each matrix type, mean over
seeds); then every difference pooled over the tasks (per seed the mean over tasks, as the GLUE score averages
them). Benches run apart are joined column by column, and only where every column they share has the same
final metric on every seed (the same runs: training is deterministic for a seed and its settings).

A committed report whose records are not in the repository gives columns from its summary.json (final metric
per seed only): `--summary results/fwrank/summary.json:adalora=adalora_noorth,lora=lora`. A column that a
bench also holds (here lora) must have the same final metric on every seed: a check that the bench
reproduces the committed runs.
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


def collect(dirs: list[Path], summaries: list[str] = ()) -> dict:
    """{task: {column: {seed: record}}}, joined over the benches and summaries (refusing a column that differs)."""
    out: dict[str, dict[str, dict[int, object]]] = defaultdict(lambda: defaultdict(dict))
    for protocol in discover(dirs):
        for run in protocol.runs:
            if run.status == Status.COMPLETE and run.result is not None:
                _join(out[run.task][run.label], run.task, run.label, run.seed, run.result)
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


def rows_for(task: str, columns: dict, order: list[str], reference: str, rival: str) -> tuple[list, dict]:
    ref, riv = columns.get(reference, {}), columns.get(rival, {})
    rows, diffs = [], {}
    for label in [c for c in order if c in columns]:
        runs = columns[label]
        finals = {s: r.metric_value("final") for s, r in runs.items()}
        vs = {}
        for other, name in ((ref, "ref"), (riv, "rival")):
            seeds = sorted(set(finals) & set(other))
            d = [finals[s] - other[s].metric_value("final") for s in seeds]
            vs[name] = paired_ci(d) | {"seeds": seeds, "diffs": d}
        diffs[label] = vs
        b = next(iter(runs.values())).budget
        ratios = [runs[s].timing["train_seconds"] / ref[s].timing["train_seconds"] for s in runs
                  if s in ref and runs[s].timing and ref[s].timing]
        shares = [share(r) for r in runs.values() if r.matrices]
        kind_share = {k: statistics.fmean(s.get(k, 0.0) for s in shares) if shares else None for k in KINDS}
        rows.append([label, f"{fmt_mean_std(mean_std(list(finals.values())))} ({len(finals)})",
                     "—" if label == reference else fmt_ci(vs["ref"]), "—" if label == rival else fmt_ci(vs["rival"]),
                     f"{fmt_count(b.get('trained_adapter_params_initial'))} → {fmt_count(b.get('trained_adapter_params_final'))}"
                     f" (mean {fmt_count(b.get('trained_adapter_params_mean'))})",
                     fmt_ratio(statistics.median(ratios), 2) if ratios and label != reference else "1" if label == reference else "—",
                     *[fmt(100 * kind_share[k], 1) if kind_share[k] is not None else "—" for k in KINDS]])
    return rows, diffs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("--reference", default="lora")
    p.add_argument("--rival", default="adalora")
    p.add_argument("--columns", help="the columns, in order (default: as found)")
    p.add_argument("--summary", action="append", default=[], metavar="SUMMARY.json:LABEL=COLUMN,...",
                   help="columns from a committed report's summary.json (final metric per seed only)")
    p.add_argument("--output", type=Path)
    args = p.parse_args()
    data = collect(args.dirs, args.summary)
    lines = []
    pooled: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for task, columns in data.items():
        order = args.columns.split(",") if args.columns else list(columns)
        rows, diffs = rows_for(task, columns, order, args.reference, args.rival)
        metric = next(iter(next(iter(columns.values())).values())).metric
        header = ["column", f"{task} {metric} (seeds)", f"− {args.reference} [95 % CI]", f"− {args.rival} [95 % CI]",
                  "adapter params trained: start → end (mean over steps)", f"time / {args.reference}",
                  *[f"‖dW‖² % {analysis.kind_label(k)}" for k in KINDS]]
        lines += [f"### {task}", "", markdown_table(header, rows), ""]
        for label, vs in diffs.items():
            for name, ci in vs.items():
                for seed, d in zip(ci["seeds"], ci["diffs"]):
                    pooled[label][name][seed].append(d)
    if len(data) > 1:
        rows = []
        for label, vs in pooled.items():
            cells = []
            for name in ("ref", "rival"):
                per_seed = {s: v for s, v in vs[name].items() if len(v) == len(data)}
                cells.append(fmt_ci(paired_ci([statistics.fmean(v) for v in per_seed.values()])) if per_seed else "—")
            rows.append([label, *cells])
        lines += [f"### pooled over {', '.join(data)} (per seed the mean over tasks of each paired difference)", "",
                  markdown_table(["column", f"− {args.reference} [95 % CI]", f"− {args.rival} [95 % CI]"], rows), ""]
    text = "\n".join(lines)
    print(text)
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
