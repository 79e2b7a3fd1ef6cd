"""The Fisher importance profile of several backbones side by side: which matrix types, at which depths.

    python benchmarks/fisher_profiles.py runs/fwrank/sst2/r2/fwlora runs/mpnet/sst2/r2/fwlora \
        runs/smollm2/sst2/r2/fwlora --output results/backbones/fisher_profiles.png

Each argument is a directory holding FW-LoRA (or fwrank) run directories (seed*/result.json): the
importance I_m = F_m / sum F of every adapted matrix, averaged over the seeds found, is drawn as one
layer x matrix-type heatmap per backbone (layers as rows, scaled to the same height, so that depth reads
alike across backbones of 6, 12 and 30 layers). A JSON file beside the figure holds the numbers and,
per backbone, the share of the importance by matrix type and by depth third. `--previous FILE` adds the
profiles such a JSON file holds for backbones not given as directories (a figure extended with a new
backbone after the older runs' directories are gone: their numbers are in the file).
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
from fwlora.records import RunRecord, read_result  # noqa: E402


def importance_by_matrix(directory: Path) -> tuple[str, dict[tuple[int | None, str], float], int]:
    """(backbone name, {(layer, kind): mean I_m}, number of runs) from the complete runs under a directory."""
    records: list[RunRecord] = []
    for result in sorted(directory.glob("**/result.json")):
        record = read_result(result.parent)
        if record is not None and str(record.status) == "complete":
            records.append(record)
    if not records:
        raise SystemExit(f"{directory}: no complete run with a result.json")
    values: dict[tuple[int | None, str], list[float]] = defaultdict(list)
    for record in records:
        rows = [m for m in record.matrices if m.get("importance") is not None]
        total = sum(m["importance"] for m in rows) or 1.0
        for m in rows:
            values[(m.get("layer"), m.get("kind"))].append(m["importance"] / total)
    model = f"{records[0].config.get('model')}, {records[0].task}"
    return model, {k: statistics.fmean(v) for k, v in values.items()}, len(records)


def stored_profiles(path: Path) -> list[tuple[str, dict[tuple[int | None, str], float], int]]:
    """The profiles of a JSON file this script wrote, as importance_by_matrix returns them."""
    stored = json.loads(path.read_text())
    profiles = []
    for model, entry in stored.items():
        if not isinstance(entry, dict) or "importance" not in entry:
            continue  # "command" and other notes
        values = {}
        for key, value in entry["importance"].items():
            layer, kind = key.split("/", 1)
            values[(None if layer == "None" else int(layer), kind)] = float(value)
        profiles.append((model, values, int(entry["runs"])))
    return profiles


def shares(values: dict[tuple[int | None, str], float]) -> dict[str, dict[str, float]]:
    """The importance summed by matrix type and by depth third (first / middle / last layers)."""
    layers = sorted({layer for layer, _ in values if layer is not None})
    by_kind: dict[str, float] = defaultdict(float)
    by_depth: dict[str, float] = defaultdict(float)
    for (layer, kind), v in values.items():
        by_kind[analysis.kind_label(kind)] += v
        if layer is not None and layers:
            third = min(2, 3 * layers.index(layer) // len(layers))
            by_depth[("first", "middle", "last")[third]] += v
    return {"by_kind": dict(by_kind), "by_depth": dict(by_depth)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path, help="directories of FW-LoRA / fwrank runs, one per backbone")
    parser.add_argument("--output", type=Path, default=REPO / "results" / "backbones" / "fisher_profiles.png")
    parser.add_argument("--previous", type=Path, metavar="JSON",
                        help="a JSON file this script wrote: its profiles join the figure (first) for every backbone "
                             "not given as a directory")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = [importance_by_matrix(d) for d in args.dirs]
    if args.previous:
        given = {model for model, _, _ in profiles}
        profiles = [p for p in stored_profiles(args.previous) if p[0] not in given] + profiles
    fig, axes = plt.subplots(1, len(profiles), figsize=(4.2 * len(profiles), 5.2), squeeze=False)
    for ax, (model, values, n) in zip(axes[0], profiles):
        layers, kinds, grid = analysis.layer_kind_grid(values)
        image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(f"{model}: I_m ({n} run{'s' if n > 1 else ''})", fontsize=10)
        ax.set_xticks(range(len(kinds)), [analysis.kind_label(k) for k in kinds], rotation=45, ha="right", fontsize=8)
        step = max(1, len(layers) // 10)
        ax.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)], fontsize=8)
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    record = {model: {"runs": n, **shares(values),
                      "importance": {f"{layer}/{kind}": v for (layer, kind), v in sorted(values.items(), key=str)}}
              for model, values, n in profiles}
    record["command"] = " ".join(["python", "benchmarks/fisher_profiles.py", *sys.argv[1:]])
    args.output.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    for model, values, n in profiles:
        s = shares(values)
        print(f"{model} ({n} runs): by type " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(s["by_kind"].items(), key=lambda x: -x[1]))
              + "; by depth " + ", ".join(f"{k} {v:.2f}" for k, v in s["by_depth"].items()))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
