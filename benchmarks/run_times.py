"""Whole-run training time of a bench's columns against LoRA's, interleaved, one process per run.

    python benchmarks/run_times.py --preset adalora_edge --task cola --columns lora,fwlora,adalora,widecut \
        --rounds 3 --data-dir ../shared/glue --output results/run-times/minilm-cola

Why not the bench's own times: a bench runs the columns of a seed back to back in one process, so the first
(LoRA, the reference) paid the process's warm-up inside its timed seconds and every later column looked
cheaper. Here every run is its own `fwlora train` process (the same start-up cost for all), the runs of a
round go in a rotated order (column i starts round k at position (i + k) mod n, so no column is always
first), and each column's ratio is taken against LoRA's run of the same round; the median over rounds is
the figure to quote, min and max say how noisy the machine was. Seeds are the round number, as in a bench.
The machine should be otherwise idle: nothing else on the cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from fwlora import methods  # noqa: E402
from fwlora.bench import load_preset, plan  # noqa: E402
from fwlora.records import read_result  # noqa: E402


def rotated(columns: list[str], round_index: int) -> list[str]:
    shift = round_index % len(columns)
    return columns[shift:] + columns[:shift]


def ratios(seconds: dict[str, list[float]], reference: str) -> dict[str, dict[str, float]]:
    """{column: median, min, max of seconds / the reference's seconds of the same round}."""
    out = {}
    for column, values in seconds.items():
        per_round = [v / r for v, r in zip(values, seconds[reference])]
        out[column] = {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round),
                       "rounds": per_round}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True, help="the bench preset whose columns are timed")
    p.add_argument("--task", required=True)
    p.add_argument("--columns", required=True, help="comma-separated columns (methods or the preset's variants)")
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data-dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a training setting for every run")
    p.add_argument("--output", required=True, help="directory: times.json, times.md and each run's result.json")
    args = p.parse_args(argv)
    reference = methods.reference_name()
    columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    if reference not in columns:
        columns.insert(0, reference)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    overrides = {"report_to": "none", **({"data_dir": args.data_dir} if args.data_dir else {})}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key.replace("-", "_")] = json.loads(value) if value[:1] in "0123456789-[{tf" else value
    preset = load_preset(args.preset)
    seconds: dict[str, list[float]] = {c: [] for c in columns}
    scratch = Path(tempfile.mkdtemp(prefix="run-times-"))
    try:
        for k in range(args.rounds):
            cells = {c.method: c for c in plan(preset, scratch, {"tasks": args.task, "methods": ",".join(columns),
                                                                 "ranks": str(args.rank), "seeds": k + 1},
                                               overrides) if c.seed == k}
            for column in rotated(columns, k):
                cfg = cells[column].config
                config_file = scratch / f"{column}-{k}.json"
                config_file.write_text(json.dumps({**cfg.to_dict(), "output_dir": str(scratch / column / str(k))}))
                print(f"round {k + 1}/{args.rounds}: {column}", flush=True)
                subprocess.run([sys.executable, "-m", "fwlora", "train", "--config", str(config_file)], check=True,
                               stdout=subprocess.DEVNULL)
                record = read_result(scratch / column / str(k))
                seconds[column].append(record.train_seconds)
                kept = output / "records" / column / f"seed{k}"
                kept.mkdir(parents=True, exist_ok=True)
                for name in ("config.json", "result.json"):
                    shutil.copyfile(scratch / column / str(k) / name, kept / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    table = ratios(seconds, reference)
    result = {"command": " ".join(sys.argv), "task": args.task, "rank": args.rank, "rounds": args.rounds,
              "seconds": seconds, "ratios": table}
    (output / "times.json").write_text(json.dumps(result, indent=1))
    lines = [f"| column | train seconds per round | / {reference}, median [min, max] |", "|---|---|---|"]
    for column in columns:
        r = table[column]
        lines.append(f"| {column} | {', '.join(f'{s:.0f}' for s in seconds[column])} | "
                     f"{r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}] |")
    (output / "times.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
