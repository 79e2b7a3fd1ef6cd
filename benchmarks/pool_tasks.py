"""Pooled verdicts over tasks that ran in separate benches (the held-out task, run once after the others).

    python benchmarks/pool_tasks.py results/fwrank/summary.json results/fwrank-mrpc/summary.json \
        --columns lora,adalora,fwlora,fwrank --output results/fwrank-mrpc/pooled.md

`fwlora report` pools tasks within one bench directory; a task run later in a bench of its own is a protocol
of its own there. This reads the summary.json files those reports wrote (the per-seed paired differences of
every cell) and pools the named columns over every task of every file with the report's own rule
(aggregate.pooled_over_tasks: per seed, the mean over tasks of each paired difference; Student t interval
over the seeds every task has). It refuses columns whose settings differ between the files, other than the
settings that each task sets for itself (epochs, subset size, K).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from fwlora.report.aggregate import Columns, pooled_over_tasks  # noqa: E402
from fwlora.report.text import fmt_ci, markdown_table  # noqa: E402

PER_TASK = {"epochs", "train_limit", "fw_warmup_steps", "fwrank_warmup_steps"}  # settings a preset sets per task


def load_protocol(path: Path) -> dict:
    protocols = json.loads(path.read_text())["protocols"]
    if len(protocols) != 1:
        raise SystemExit(f"{path}: holds {len(protocols)} protocols; give the summary of one bench")
    return protocols[0]


def column_settings(protocol: dict, label: str) -> dict:
    """The settings of one column that hold for all its tasks: shared and per-method ones."""
    s = protocol["settings"]
    out = {k: v for k, v in s["shared"].items()}
    out |= {k: per[label] for k, per in s["per_method"].items() if label in per}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summaries", nargs="+", type=Path, help="summary.json files written by fwlora report")
    parser.add_argument("--columns", required=True, help="comma-separated columns, the reference first (lora,...)")
    parser.add_argument("--output", type=Path, help="also write the markdown here")
    args = parser.parse_args(argv)
    labels = [c.strip() for c in args.columns.split(",") if c.strip()]
    protocols = [load_protocol(p) for p in args.summaries]
    first = protocols[0]
    for path, p in zip(args.summaries[1:], protocols[1:]):
        for lb in labels:
            a, b = column_settings(first, lb), column_settings(p, lb)
            differ = sorted(k for k in set(a) | set(b) if k not in PER_TASK and a.get(k) != b.get(k))
            if differ:
                raise SystemExit(f"{path}: column {lb} was run with other settings ({', '.join(differ)}) "
                                 f"than in {args.summaries[0]}: not one protocol")
    cells = []
    for p in protocols:
        missing = [lb for lb in labels if lb not in p["methods"]]
        if missing:
            raise SystemExit(f"{p['label']}: no column {', '.join(missing)}")
        cells += p["cells"]
    cols = Columns(labels=labels, method_of={lb: first["method_of"].get(lb, lb) for lb in labels},
                   names={lb: first["names"].get(lb, lb) for lb in labels}, reference=labels[0])
    pooled = pooled_over_tasks(cells, cols)
    if pooled is None:
        raise SystemExit("pooling needs two or more tasks whose metrics all rise with quality")
    rows = []
    for a, b in cols.pairs():
        per_task = []
        for task in pooled["tasks"]:
            cell = next(c for c in cells if c["task"] == task)
            per_task.append(fmt_ci(cell["pairs"].get(f"{a}-{b}") or {}))
        entry = pooled[f"{a}-{b}"]
        rows.append([f"{cols.name(a)} − {cols.name(b)}", *per_task, f"{fmt_ci(entry)} ({len(entry['seeds'])} seeds)",
                     entry["verdict"]])
    text = "\n".join([
        f"Pooled over {', '.join(pooled['tasks'])} (per seed, the mean over tasks of the paired difference in each "
        "task's own metric; 95 % Student t interval over seeds), from " + ", ".join(f"`{p}`" for p in args.summaries) + ".",
        "",
        markdown_table(["difference", *pooled["tasks"], "pooled", "verdict"], rows),
        "",
        "Command: `" + " ".join(["python", "benchmarks/pool_tasks.py", *(argv if argv is not None else sys.argv[1:])]) + "`",
    ])
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
