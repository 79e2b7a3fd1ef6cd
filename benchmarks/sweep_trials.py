"""Every trial of several sweeps side by side, trial number by trial number.

    python benchmarks/sweep_trials.py results/sweep-cpu/optuna.journal results/sweep-fwrank/optuna.journal

`fwlora sweep` seeds its sampler from (sampler seed, trial number) and draws the shared parameters first, so
during the random start-up (TPE's first 10 trials) trial n of every method's study draws the same shared
values (the learning rate): the studies line up row by row. Prints a markdown table: one row per trial
number, the shared values, then each study's final value and its own parameters (pruned trials show the last
epoch they reported, marked).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def fmt(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("journals", nargs="+", type=Path, help="Optuna journal files written by fwlora sweep")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    studies = []
    for path in args.journals:
        if not path.is_file():
            raise SystemExit(f"{path}: no such journal file")
        storage = JournalStorage(JournalFileBackend(str(path)))
        studies += [optuna.load_study(study_name=n, storage=storage) for n in optuna.get_all_study_names(storage)]
    own = {s.study_name: sorted({k for t in s.trials for k in t.params} - {"lr"}) for s in studies}
    numbers = sorted({t.number for s in studies for t in s.trials})
    header = ["trial", "lr"] + [s.study_name + (f" ({', '.join(own[s.study_name])})" if own[s.study_name] else "")
                                for s in studies]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for n in numbers:
        trials = [next((t for t in s.trials if t.number == n), None) for s in studies]
        lrs = {fmt(t.params.get("lr")) for t in trials if t is not None}
        cells = []
        for t in trials:
            if t is None:
                cells.append("—")
                continue
            value = t.value if t.value is not None else (t.intermediate_values[max(t.intermediate_values)]
                                                          if t.intermediate_values else None)
            text = "—" if value is None else f"{value:.3f}"
            if t.state.name == "PRUNED":
                text += f" (pruned after epoch {max(t.intermediate_values)})" if t.intermediate_values else " (pruned)"
            extra = [fmt(t.params[k]) for k in sorted(t.params) if k != "lr"]
            cells.append(text + (f" ({', '.join(extra)})" if extra else ""))
        lines.append(f"| {n} | {' / '.join(sorted(lrs))} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
