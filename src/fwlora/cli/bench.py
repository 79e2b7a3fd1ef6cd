"""`fwlora bench`: arguments and output of the grid runner (fwlora.bench does the work)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fwlora import lr_search, methods
from fwlora.bench import (Outcome, check_data, check_existing, groups, load_preset, plan, preset_names, run_bench,
                          warn_colliding_budgets)
from fwlora.claims import STALE_AFTER, Worker, is_stale, read_claim
from fwlora.cli.flags import PROGRAM, parse_sets
from fwlora.errors import UserError
from fwlora.files import broadcast_from_main, is_main_process
from fwlora.records import Status, run_status, write_bench
from fwlora.rundir import environment


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="run methods over tasks, budgets and seeds, then report",
        description="Run the comparison grid (resumable: complete runs are skipped, an interrupted run "
                    "continues from its checkpoint, a failed run is recorded and retried on the next call), "
                    "then write the report into the output directory and print its main table.",
        epilog="presets: " + ", ".join(preset_names()) + " (see src/fwlora/presets/; a path to your own "
                                                         "YAML works too)\n"
               "examples:\n  fwlora bench --preset quick --output-dir runs/quick\n"
               "  fwlora bench --preset cpu --output-dir runs/cpu\n"
               "  fwlora bench --tasks cola,sst2 --methods lora,adalora,fwlora --budgets 0.1,0.2,0.5 "
               "--seeds 3 \\\n"
               "      --set model=roberta-base --output-dir runs/mine\n"
               "  fwlora bench --dataset tickets.csv --text-columns body --label-column team --methods "
               "lora,fwrank \\\n"
               "      --ranks 2 --seeds 3 --output-dir runs/tickets\n"
               "  for i in 0 1 2 3; do fwlora bench --preset mpnet --output-dir runs/m --worker $i/4 & "
               "done; wait\n"
               "      (4 workers sharing one GPU or one directory; benchmarks/slurm_bench.sh runs a Slurm "
               "job array)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="a named preset or a YAML file (grid + shared training settings)")
    p.add_argument("--output-dir", required=True, help="where the run directories and the report go")
    p.add_argument("--tasks", help="comma-separated GLUE tasks (overrides the preset)")
    p.add_argument("--methods", help="comma-separated methods (" + ", ".join(methods.names()) +
                   ") or the preset's variants")
    p.add_argument("--budgets", help="comma-separated budgets in %% of the backbone")
    p.add_argument("--ranks", help="comma-separated LoRA ranks (instead of budgets)")
    p.add_argument("--seeds", type=int, help="number of seeds (0..N-1)")
    p.add_argument("--data-dir", help="GLUE directory (default: $FWLORA_DATA_DIR, then the hub)")
    own = p.add_argument_group("your own data (instead of --tasks; fwlora train --help says more)")
    own.add_argument("--dataset", help="a .csv, .tsv, .json, .jsonl or .parquet file, or a hub dataset name")
    own.add_argument("--text-columns", help="the text column(s), a[,b]")
    own.add_argument("--label-column", help="the label column (strings/ints: classes; floats: regression)")
    own.add_argument("--validation", help="evaluation data: a file, a split name, or a held-out fraction "
                                          "(0.1)")
    own.add_argument("--prompt-column", help="instruction data: the prompt column")
    own.add_argument("--response-column", help="instruction data: the response column")
    own.add_argument("--messages-column", help="chat data: the messages column")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training setting for every run (YAML value), e.g. --set epochs=1; "
                        "repeatable")
    p.add_argument("--no-retry-failed", action="store_true", help="leave runs recorded as failed alone")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state, run nothing")
    p.add_argument("--lr-search", action="store_true",
                   help="equal-effort learning rates: run the preset's lr_search (every column at every lr "
                        "on the design seed), then write <output-dir>/frozen.yaml with each column's best lr; "
                        "commit it and run the evaluation seeds with it (src/fwlora/lr_search.py says the rule). "
                        "--methods narrows the columns; the search sets the seed, and the tasks and size where "
                        "its block names them")
    workers = p.add_argument_group("several workers on one --output-dir (GPUs, machines, a Slurm job array)")
    workers.add_argument("--worker", metavar="I/N",
                         help="run worker I's share of N (0 <= I < N): the grid's seed/task/budget groups "
                              "I, I+N, ... "
                              "(default: $FWLORA_WORKER, else the Slurm array task, else 0/1). Every run is "
                              "claimed "
                              "in its directory first, so workers never train one run twice")
    workers.add_argument("--steal", action=argparse.BooleanOptionalAction, default=True,
                         help="after its share, take the groups other workers have not started or left stale "
                              "(a killed worker's runs get done); default on")
    workers.add_argument("--claim-timeout", type=float, default=STALE_AFTER, metavar="SECONDS",
                         help="a claim without a heartbeat for this long is stale and taken over (a claim "
                              "of a dead "
                              "process on the same host at once); default %(default).0f")
    p.set_defaults(handler=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from fwlora.rundir import quiet_transformers

    preset = load_preset(args.preset) if args.preset else {"source": "command line"}
    frozen_commit = None
    overrides = {"tasks": args.tasks, "methods": args.methods, "budgets": args.budgets, "ranks": args.ranks,
                 "seeds": args.seeds}
    if (args.lr_search or "lr_choice" in preset) and any(k.split("=")[0].strip() == "lr" for k in args.set):
        raise UserError("--set lr=... would give every column one lr: the lr search or the frozen preset sets them")
    if args.lr_search:  # the flags narrow the grid first; the search then sets seed, tasks and size
        for key, value in lr_search.fixed_by_search(preset).items():
            if overrides[key] is not None:
                raise UserError(f"--{key} does not apply to --lr-search: {preset['source']}'s lr search runs on "
                                f"{value} (its lr_search block), the same for every column")
        grid = {**(preset.get("grid") or {}), **{k: v for k, v in overrides.items() if v is not None}}
        searched = {**preset, "grid": grid}
        preset, overrides = lr_search.search_preset(searched), {}
    elif "lr_search" in preset and "lr_choice" not in preset:
        raise UserError(f"{preset['source']} chooses each method's lr first: run it with --lr-search, "
                        f"commit the "
                        f"{lr_search.FROZEN_FILE} it writes, then run the evaluation seeds with that file")
    else:
        frozen_commit = lr_search.check_committed(preset)
    train_overrides = parse_sets(args.set)
    if args.data_dir:
        train_overrides["data_dir"] = args.data_dir
    for key in ("dataset", "label_column", "validation", "prompt_column", "response_column", "messages_column"):
        if getattr(args, key):
            train_overrides[key] = getattr(args, key)
    if args.text_columns:
        train_overrides["text_columns"] = [c.strip() for c in args.text_columns.split(",") if c.strip()]
    output_dir = Path(args.output_dir)
    cells = plan(preset, output_dir, overrides, train_overrides)
    if args.lr_search and _grid_finished(cells):  # a search run before: the lrs it extended to are in its plan
        extended, _ = lr_search.extensions(searched, output_dir)
        if extended:
            preset = lr_search.search_preset(searched, extended)
            cells = plan(preset, output_dir, overrides, train_overrides)
    worker = Worker.parse(args.worker) if args.worker else Worker.from_environment()
    if args.claim_timeout <= 0:
        raise UserError(f"--claim-timeout {args.claim_timeout:g}: must be > 0 seconds")
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output-dir {output_dir} is a file, not a directory")
    if args.dry_run:
        owner = {c.key: i % worker.count for i, g in enumerate(groups(cells)) for c in g}
        for c in cells:
            holder = read_claim(Path(c.config.output_dir))
            held = "" if holder is None else f", claimed by {holder.describe()}" + (
                " (stale)" if is_stale(holder, args.claim_timeout) else "")
            share = f"  [worker {owner[c.key]}/{worker.count}]" if worker.count > 1 else ""
            print(f"{c.key:40s} {run_status(Path(c.config.output_dir)) or 'to run'}{held}{share}")
        return 0
    check_existing(cells)
    check_data(cells)
    def run(cells: list, todo: list) -> tuple[dict, list[str], bool]:
        """Run `todo` (of the planned `cells`): the statuses, the runs left to others, and whether this process
        is the last one (the one that writes what sums the grid up)."""
        with quiet_transformers():
            warn_colliding_budgets(cells)
            write_bench(output_dir, {"command": " ".join([PROGRAM] + sys.argv[1:]), "preset": preset,
                                     "set": train_overrides, "runs": [c.key for c in cells],
                                     "frozen_preset_commit": frozen_commit})
            statuses = run_bench(todo, output_dir, retry_failed=not args.no_retry_failed, worker=worker,
                                 steal=args.steal, stale_after=args.claim_timeout)
        unfinished = [k for k, s in statuses.items() if s not in (Outcome.COMPLETE, Outcome.FAILED)]
        return statuses, unfinished, is_main_process() and not unfinished and _grid_finished(cells)

    statuses, unfinished, last = run(cells, cells)
    while args.lr_search:  # a column whose best lr is at an end of the grid earns the next one beyond
        # the last process decides what is owed; under torchrun every process then trains it
        extended, owed = broadcast_from_main(lr_search.extensions(searched, output_dir) if last else ({}, {}))
        if not owed:
            break
        preset = lr_search.search_preset(searched, extended)
        cells = plan(preset, output_dir, {}, train_overrides)
        # every extension not yet seen by this command (an interrupted one resumes, a failed one is retried once)
        more, unfinished, last = run(cells, [c for c in cells if c.key not in statuses])
        statuses.update(more)
    failed = [k for k, s in statuses.items() if s == Outcome.FAILED]
    if unfinished:  # held by live workers, or other workers' share (--no-steal): the last one writes the report
        held = sum(s == Outcome.HELD for s in statuses.values())
        print(f"{len(unfinished)} run(s) left to other workers ({held} held now); the worker that finishes "
              f"last "
              f"writes the report (or run `fwlora report {output_dir}`)", file=sys.stderr)
    if args.lr_search and last:  # a failed run scores as its task's worst lr
        path, choices = lr_search.freeze(searched, output_dir, environment().get("git_commit"))
        print(lr_search.describe(choices))
        print(f"\nfrozen preset: {path} (commit it before any evaluation seed runs)")
    if not args.no_report and last:
        from fwlora import report

        summary = report.write_report([output_dir], output_dir / "report")
        print(summary.main_table)
        print(f"\nreport: {output_dir / 'report' / 'report.md'}")
    if failed:
        print(f"\n{len(failed)} run(s) failed: " + ", ".join(failed) + " (errors in their result.json; "
              "run the same command again to retry)", file=sys.stderr)
        return 1
    return 0


def _grid_finished(cells) -> bool:
    """Every run of the grid complete or failed on disk (another worker may still hold one we never saw)."""
    return all(run_status(Path(c.config.output_dir)) in (Status.COMPLETE, Status.FAILED) for c in cells)
