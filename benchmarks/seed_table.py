"""The seed's table beside ours: the numbers the seed expected at roberta-base's 0.2 % budget, next to what the
bench measured (each method at its own lr), per budget, with the four paired comparisons the question needs.

    python benchmarks/seed_table.py results/seed-table-mpnet/records/seed-table-cola \
        results/seed-table-mpnet/records/seed-table-sst2 \
        --shared-lr results/seed-table-mpnet/lr-search/records/seed-table-lr --output results/seed-table-mpnet/table.md

Every number is computed from the run records through the report's own typed objects (fwlora.report): per
(task, budget, column) mean ± std over seeds of the final-epoch metric, paired 95 % Student t intervals over
seeds, time ratios to LoRA as the median over seeds of two runs of one seed run back to back, adapter
parameters trained (at the end, and on average over the steps). `--shared-lr` adds the seed's literal
protocol, every method at lr 2e-4, where it ran (the lr search's design-seed runs: one seed, no interval).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from fwlora.lr_search import lr_label  # noqa: E402
from fwlora.records import Status  # noqa: E402
from fwlora.report import Cell, discover, summarise_protocol  # noqa: E402
from fwlora.report.text import fmt, fmt_ci, fmt_count, fmt_mean_std, fmt_ratio, markdown_table  # noqa: E402

# The seed's hypothesis at 0.2 % on roberta-base (its expected table; a claim, not a measurement): metric x 100
# for LoRA / AdaLoRA / FW-LoRA, and training time relative to LoRA.
SEED_EXPECTED = {"cola": {"lora": 55.0, "adalora": 57.8, "fwlora": 57.5},
                 "sst2": {"lora": 93.1, "adalora": 94.3, "fwlora": 94.1}}
SEED_TIME = {"lora": 1.0, "adalora": 1.12, "fwlora": 1.01}
SEED_BUDGET_RANK = 2  # 0.2 % of roberta-base on the six matrix types
COLUMNS = ("lora", "fwlora", "adalora", "widecut")
PAIRS = (("fwlora", "lora"), ("fwlora", "adalora"), ("adalora", "lora"), ("widecut", "adalora"))
SHARED_LR = 2e-4


def cells_of(run_dirs: Sequence[Path]) -> tuple[list[Cell], dict[tuple[str, str, str], str]]:
    """Every (task, budget) cell of the benches' protocols, in their order, and the lr(s) each column ran at
    ((task, budget, column) -> "1e-3")."""
    cells, lrs = [], {}
    for p in discover(run_dirs):
        cells += summarise_protocol(p, reference="lora").cells
        found: dict[tuple[str, str, str], set[float]] = {}
        for run in p.runs:
            found.setdefault((run.task, run.budget_label, run.label), set()).add(float(run.config.get("lr", "nan")))
        lrs.update({key: ", ".join(lr_label(v) for v in sorted(values)) for key, values in found.items()})
    return cells, lrs


def _scaled(value: float | None) -> str:
    return fmt(100 * value, 1) if value is not None else "—"


def beside_the_seed(cells: Sequence[Cell]) -> str:
    rows = []
    for cell in cells:
        if cell.rank != SEED_BUDGET_RANK or cell.task not in SEED_EXPECTED:
            continue
        for label in COLUMNS:
            st = cell.columns.get(label)
            expected = SEED_EXPECTED[cell.task].get(label)
            ours = (f"{_scaled(st.final.mean)} ± {_scaled(st.final.std)} (n={st.final.n})"
                    if st is not None and st.final.mean is not None
                    else "failed" if st is not None and st.seeds.failed else "not run")
            ratio = 1.0 if label == "lora" else (st.time_ratio.median if st is not None and st.time_ratio else None)
            rows.append([cell.task, label, fmt(expected, 1) if expected is not None else "—", ours,
                         fmt(SEED_TIME[label], 2) + "x" if label in SEED_TIME else "—", fmt_ratio(ratio)])
    return markdown_table(["task", "method", "seed expected (x100)", "ours (x100, mean ± std)", "seed's time",
                           "our time / LoRA"], rows)


def per_budget(cells: Sequence[Cell], lrs: dict[tuple[str, str, str], str]) -> str:
    rows = []
    for cell in cells:
        for label in COLUMNS:
            st = cell.columns.get(label)
            if st is None:
                continue
            params = st.size.params if st.size is not None else None
            rows.append([cell.task, f"r{cell.rank}" + (f" ({cell.budget_percent:.3f} %)" if cell.budget_percent else ""),
                         label, fmt_mean_std(st.final), f"{st.final.n}",
                         fmt_count(params.final) if params and params.final is not None else "—",
                         fmt_count(params.mean) if params and params.mean is not None else "—",
                         fmt_ratio(1.0 if label == "lora" else (st.time_ratio.median if st.time_ratio else None)),
                         lrs.get((cell.task, cell.budget_label, label), "")])
    return markdown_table(["task", "budget", "method", "final (mean ± std)", "seeds", "params at the end",
                           "params, mean over steps", "time / LoRA", "lr"], rows)


def comparisons(cells: Sequence[Cell]) -> str:
    rows = []
    for cell in cells:
        for a, b in PAIRS:
            ci = cell.differences.get((a, b))
            if ci is not None:
                rows.append([cell.task, f"r{cell.rank}", f"{a} − {b}", fmt_ci(ci), str(ci.n)])
    return markdown_table(["task", "budget", "difference", "mean [95 % interval]", "seeds"], rows)


def shared_lr_rows(run_dirs: Sequence[Path]) -> str:
    """Each method at the seed's shared lr, from runs that ran it (the lr search's design seed)."""
    rows = []
    for p in discover(run_dirs):
        for run in p.runs:
            if abs(float(run.config.get("lr", 0)) - SHARED_LR) > 1e-12 or run.status == Status.RUNNING:
                continue
            value = run.result.metric_value("final") if run.result is not None else None
            rows.append([run.task, run.budget_label, run.label, str(run.seed),
                         _scaled(value) if run.result is not None else str(run.status.value)])
    rows.sort()
    return markdown_table(["task", "budget", "method", "seed", "final at lr 2e-4 (x100)"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="the evaluation benches' run directories")
    parser.add_argument("--shared-lr", nargs="*", type=Path, default=[],
                        help="run directories holding runs at the seed's shared lr 2e-4 (its literal protocol)")
    parser.add_argument("--output", type=Path, help="write the markdown here (default: print it)")
    args = parser.parse_args(argv)
    missing = [str(d) for d in [*args.run_dirs, *args.shared_lr] if not d.is_dir()]
    if missing:
        parser.exit(2, f"seed_table.py: error: no such directory: {', '.join(missing)}\n")
    cells, lrs = cells_of(args.run_dirs)
    parts = ["## Beside the seed's expected table (0.2 % on roberta-base = rank 2)", beside_the_seed(cells),
             "## Per budget", per_budget(cells, lrs), "## The four comparisons (paired over seeds)", comparisons(cells)]
    if args.shared_lr:
        parts += ["## The seed's literal protocol: every method at lr 2e-4", shared_lr_rows(args.shared_lr)]
    text = "\n\n".join(parts) + "\n"
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
