"""Paired and pooled verdicts over benches run apart: a held-out task run later, or a column added later.

    python benchmarks/pool_tasks.py results/fwrank/summary.json results/fwrank-mrpc/summary.json \
        --columns lora,adalora,fwlora,fwrank --output results/fwrank-mrpc/pooled.md

`fwlora report` compares and pools within one bench directory; a task or a column run later in a bench of
its own is a protocol of its own there. This reads the summary.json files those reports wrote (each cell's
final metric per seed and column) and puts the named columns side by side:
- tasks from several files are pooled with the report's own rule (report.verdicts.pool_over_tasks: per seed,
  the mean over tasks of each paired difference; Student t interval over the seeds every task has);
- one task in several files (a column added later) is joined into one cell, but only where every column
  the files share has the same final metric on every seed: then they hold the same runs (training here is
  deterministic for a given seed and settings), and pairing the new column with the old ones is sound.
Columns whose settings differ between files are refused, except settings a preset sets per task (epochs,
subset size, K).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from fwlora.report.cells import Cell  # noqa: E402
from fwlora.report.columns import Columns  # noqa: E402
from fwlora.report.verdicts import pool_over_tasks  # noqa: E402
from fwlora.report.stats import paired_ci  # noqa: E402
from fwlora.report.text import fmt_ci, markdown_table  # noqa: E402

# settings a preset sets per task, or that follow from a task's length (AdaLoRA's schedule)
PER_TASK = {"epochs", "train_limit", "fw_warmup_steps", "fwrank_warmup_steps", "total_step", "tinit", "tfinal"}


def load_protocol(path: Path) -> dict:
    protocols = json.loads(path.read_text())["protocols"]
    if len(protocols) != 1:
        raise SystemExit(f"{path}: holds {len(protocols)} protocols; give the summary of one bench")
    return protocols[0]


def column_settings(protocol: dict, label: str) -> dict:
    """The settings of one column: shared, per-method and the method's own ones (a report lists a setting
    under per_method only where its columns differ, so the same column may hold it in either place)."""
    s = protocol["settings"]
    out = {k: v for k, v in s["shared"].items()}
    out |= {k: vals[0] if len(vals) == 1 else sorted(vals, key=str) for k, vals in s["own"].get(label, {}).items()}
    out |= {k: per[label] for k, per in s["per_method"].items() if label in per}
    return out


def joined_cells(protocols: list[dict], labels: list[str]) -> list[dict]:
    """One cell per (task, budget) holding the named columns' per-seed finals from every file, with the
    paired differences of every pair recomputed from them."""
    cells: dict[tuple[str, str], dict] = {}
    for p in protocols:
        for c in p["cells"]:
            key = (c["task"], c["budget_label"])
            finals = {lb: {int(s): v for s, v in (c["methods"][lb].get("final_by_seed") or {}).items()}
                      for lb in labels if lb in c["methods"]}
            if key not in cells:
                cells[key] = {"task": c["task"], "budget_label": c["budget_label"],
                              "higher_is_better": c.get("higher_is_better", True), "finals": finals}
                continue
            have = cells[key]["finals"]
            for lb in set(have) & set(finals):
                if have[lb] != finals[lb]:
                    raise SystemExit(f"{p['label']}: {lb} on {key[0]} {key[1]} has other results per seed than in an "
                                     f"earlier file ({finals[lb]} vs {have[lb]}): not the same runs, cannot join")
            have.update(finals)
    return list(cells.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summaries", nargs="+", type=Path, help="summary.json files written by fwlora report")
    parser.add_argument("--columns", required=True, help="comma-separated columns, the reference first (lora,...)")
    parser.add_argument("--output", type=Path, help="also write the markdown here")
    args = parser.parse_args(argv)
    labels = [c.strip() for c in args.columns.split(",") if c.strip()]
    protocols = [load_protocol(p) for p in args.summaries]
    for lb in labels:  # a column in several files must have been run with the same settings in each
        having = [(path, column_settings(p, lb)) for path, p in zip(args.summaries, protocols) if lb in p["methods"]]
        for path, settings in having[1:]:
            first_path, first = having[0]
            differ = sorted(k for k in set(first) | set(settings) if k not in PER_TASK and first.get(k) != settings.get(k))
            if differ:
                raise SystemExit(f"{path}: column {lb} was run with other settings ({', '.join(differ)}) "
                                 f"than in {first_path}: not one protocol")
    method_of = {lb: m for p in protocols for lb, m in p["method_of"].items() if lb in labels}
    names = {lb: n for p in protocols for lb, n in p["names"].items() if lb in labels}
    cols = Columns(labels=tuple(labels), method_of=method_of, names=names, reference=labels[0])
    cells = joined_cells(protocols, labels)
    for c in cells:
        missing = [lb for lb in labels if lb not in c["finals"]]
        if missing:
            raise SystemExit(f"{c['task']} {c['budget_label']}: no column {', '.join(missing)} in any file")
    paired = []
    for c in cells:
        differences = {}
        for a, b in cols.pairs():
            seeds = sorted(set(c["finals"][a]) & set(c["finals"][b]))
            differences[(a, b)] = paired_ci([c["finals"][a][s] - c["finals"][b][s] for s in seeds], seeds)
        paired.append(Cell(c["task"], c["budget_label"], c["higher_is_better"], differences))
    pooled = pool_over_tasks(paired, cols)
    if pooled is None:
        raise SystemExit("pooling needs two or more tasks whose metrics all rise with quality")
    rows = []
    for a, b in cols.pairs():
        per_task = []
        for task in pooled.tasks:
            cell = next(c for c in paired if c.task == task)
            per_task.append(fmt_ci(cell.differences.get((a, b))))
        entry = pooled.differences[(a, b)]
        rows.append([f"{cols.name(a)} − {cols.name(b)}", *per_task,
                     f"{fmt_ci(entry.interval)} ({len(entry.interval.seeds)} seeds)", entry.verdict])
    text = "\n".join([
        f"Pooled over {', '.join(pooled.tasks)} (per seed, the mean over tasks of the paired difference in each "
        "task's own metric; 95 % Student t interval over seeds), from " + ", ".join(f"`{p}`" for p in args.summaries) + ".",
        "",
        markdown_table(["difference", *pooled.tasks, "pooled", "verdict"], rows),
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
