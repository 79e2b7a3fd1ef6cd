"""`fwlora report`: its arguments, and printing the main table. The work is fwlora.report's."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="tables, paired statistics, verdicts and plots from finished runs",
        description="Read the result.json of every run under the given directories and write report.md "
                    "(tables, paired differences with 95 % intervals, verdicts on docs/method.md's "
                    "hypotheses, the "
                    "per-matrix numbers of its first open question), summary.json, summary.csv and PNG "
                    "plots. "
                    "Every method found is a column (a bench's named variant of a method is a column of its "
                    "own), "
                    "compared with the reference and with AdaLoRA. "
                    "Unfinished runs (config.json only) and failed runs are counted and marked, never read "
                    "as "
                    "results. A bench directory (with bench.json) is one protocol; several can be compared "
                    "side "
                    "by side. Loose runs under a RUN_DIR form one protocol, split by setting where it holds "
                    "several runs of one task, budget, method and seed (pilot runs at several learning "
                    "rates). "
                    "Prints the main table.",
        epilog="examples:\n  fwlora report runs/quick\n"
               "  fwlora report runs/shared_lr runs/tuned --output runs/report\n"
               "  fwlora report runs/explore /tmp/one_run --output /tmp/report\n"
               "  fwlora report runs/variants --reference fwlora\n"
               "  fwlora report runs/fwrank --output results/fwrank --records   # commit results/fwrank "
               "with its records\n"
               "  fwlora report results/fwrank/records/fwrank --output results/fwrank   # rebuild it from "
               "them",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="a bench directory, a run directory, or any directory above runs (searched "
                        "recursively)")
    p.add_argument("--output", type=Path, metavar="DIR", help="where the report goes (default: <first "
                                                              "RUN_DIR>/report)")
    p.add_argument("--reference", metavar="NAME", default=None,
                   help="the column every other is compared with and whose time is 1 (a method or a "
                        "variant's "
                        "label; default: lora)")
    p.add_argument("--records", action="store_true",
                   help="also copy every run's config.json and result.json (and each bench.json; no "
                        "checkpoints or "
                        "adapters, a few kB a run) to OUTPUT/records/<RUN_DIR's name>/: the report can then "
                        "be rebuilt "
                        "from a commit, and copying them back into a bench directory lets `fwlora bench` "
                        "skip the runs "
                        "they hold and run only the rest")
    p.set_defaults(handler=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from fwlora.report import write_report

    out = args.output or Path(args.run_dirs[0]) / "report"
    summary = write_report(list(args.run_dirs), out, reference=args.reference)
    print(summary.main_table)
    print(f"\nreport: {summary.report}")
    if args.records:
        from fwlora.records import copy_records

        for run_dir in args.run_dirs:
            destination = out / "records" / (run_dir.resolve().name or "runs")
            print(f"records: {copy_records(run_dir, destination)} runs -> {destination}")
    return 0
