"""Two benches of the same runs side by side: are the results identical, and where did the time go?

For a speed change that must not move a result (issue "The seed's own protocol", item 3: evaluation in length
order with a larger batch, tokenisation once per task): every run present in both output directories, its
evaluations compared epoch by epoch (headline metric and evaluation loss, exact equality), and its recorded
train / evaluation / load seconds. The time totals and their ratio sum only the runs both timed on one machine
(`RunRecord.same_machine`: one machine boot; a reboot between the benches counts as another machine, as it
cannot be told from one); the others show their seconds marked with *. Time the two
`fwlora bench` calls themselves for the wall time.

    /usr/bin/time -f %e fwlora bench --preset quick --output-dir runs/quick-new --data-dir ../shared/glue --no-report
    python benchmarks/same_runs.py runs/quick-old runs/quick-new
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fwlora.records import RunRecord, Status, read_result  # noqa: E402


def complete_runs(output_dir: Path) -> dict[Path, RunRecord]:
    """Every complete run under a bench directory, keyed by its path relative to it."""
    runs = {}
    for path in sorted(output_dir.glob("**/result.json")):
        record = read_result(path.parent)
        if record is not None and record.status == Status.COMPLETE:
            runs[path.parent.relative_to(output_dir)] = record
    return runs


def identical(a: RunRecord, b: RunRecord) -> bool:
    """The same evaluations, to the last bit: every epoch's headline metric and loss."""
    if len(a.epochs) != len(b.epochs) or a.metric != b.metric:
        return False
    return all(ea.get(a.metric) == eb.get(b.metric) and ea.get("loss") == eb.get("loss")
               for ea, eb in zip(a.epochs, b.epochs))


def seconds(record: RunRecord, key: str) -> float:
    return float(getattr(record.timing, key) or 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", type=Path, help="the bench directory made before the change")
    parser.add_argument("after", type=Path, help="the bench directory of the same runs after it")
    args = parser.parse_args(argv)
    before, after = complete_runs(args.before), complete_runs(args.after)
    shared = [run for run in before if run in after]
    if not shared:
        print(f"no complete run is in both {args.before} and {args.after}", file=sys.stderr)
        return 2
    print("| run | final (before) | final (after) | identical | train s | eval s | load s |")
    print("|---|---|---|---|---|---|---|")
    totals = {key: [0.0, 0.0] for key in ("train_seconds", "eval_seconds", "load_seconds")}
    for run in shared:
        a, b = before[run], after[run]
        paired = a.same_machine(b)
        cells = []
        for key, total in totals.items():
            if paired:
                total[0] += seconds(a, key)
                total[1] += seconds(b, key)
            cells.append(f"{seconds(a, key):.1f} → {seconds(b, key):.1f}" + ("" if paired else "*"))
        print(f"| {run} | {a.final[a.metric]:.4f} | {b.final[b.metric]:.4f} | {'yes' if identical(a, b) else 'NO'} | "
              + " | ".join(cells) + " |")
    cells = [f"{t[0]:.1f} → {t[1]:.1f} ({t[1] / t[0]:.2f}x)" if t[0] else "—" for t in totals.values()]
    timed = sum(before[r].same_machine(after[r]) for r in shared)
    print(f"| all {len(shared)} runs (times: the {timed} timed on one machine) | | | "
          f"{sum(identical(before[r], after[r]) for r in shared)} of {len(shared)} | " + " | ".join(cells) + " |")
    if timed < len(shared):
        print(f"\n* not timed on one machine boot (two machines, a reboot between, or a run resumed elsewhere): "
              f"left out of the time totals ({len(shared) - timed} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
