"""`fwlora sweep`: arguments, settings and output of the hyper-parameter search (fwlora.sweep does the
work)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import yaml

from fwlora import methods
from fwlora.cli.flags import add_train_flags, collect_train_settings, given_settings
from fwlora.config import TrainConfig
from fwlora.errors import TrainingInterrupted, UserError
from fwlora.sweep import (GRACE_ENV, GRACE_SECONDS, HEARTBEAT_ENV, HEARTBEAT_SECONDS, OBJECTIVES, PRUNERS,
                          SweepConfig, default_space, load_space, run_sweep)

log = logging.getLogger(__name__)

EPILOG = """examples:
  fwlora sweep --task cola --method fwlora --trials 20 --data-dir ../shared/glue --output-dir runs/sweep
  fwlora sweep --task cola --methods lora,adalora,fwlora --trials 20 --space my_space.yaml --output-dir runs/sweep
  fwlora sweep ... --seeds-per-trial 3          # objective: mean over seeds S..S+2 of the final-epoch metric

the search space (default: docs/method.md's shared ranges, plus each method's own; see examples/sweep_space.yaml):
{space}
  a --space file replaces entries key by key (key: null drops one); a training flag given on the
  command line fixes that setting and takes it out of the space. A trial its method refuses before
  training (FW-LoRA's fw_warmup_steps not below the run's optimizer steps, say) is pruned untrained,
  its reason recorded, not clamped.

storage, workers, resuming:
  default storage: <output-dir>/optuna.journal (Optuna JournalStorage, file lock: many processes on one
  machine). Start more workers by running the same command again in other terminals: --trials is the
  TOTAL per study, shared by all workers; no trial runs twice, none is lost.
  several machines: --storage postgresql://user:pw@host/db (pip install psycopg2-binary; or
  mysql+pymysql://..., its driver installed; or redis://host:6379 with the redis package, no heartbeats),
  the same command on each machine. A running trial beats every --heartbeat-seconds (60); one silent
  for --grace-seconds (300) is failed by another worker and replaced. A worker with nothing left to
  take waits for the trials still running elsewhere, so the last one to finish writes complete outputs.
  Trial directories stay on the machine that ran them; --trials 0 rewrites the outputs from the study.
  --storage sqlite:///sweep.db also works, but SQLite locks the whole file per write: few workers only.
  resume: run the same command again (Ctrl-C marks the running trial failed; it is replaced); raise
  --trials to extend a study; --trials 0 only rewrites the outputs.

outputs in --output-dir: best_params.json, importance.json, plots/*.png, best_<method>.yaml
  (fwlora train --config best_fwlora.yaml), tuned_preset.yaml (fwlora bench --preset tuned_preset.yaml),
  sweep_summary.md, sweep.json; each trial's runs in <output-dir>/<study>/trial<n>[-seed<k>]/."""


def epilog() -> str:
    """EPILOG with the default space as YAML (the registered methods' entries included)."""
    lines = [f"  {name}: " + yaml.safe_dump(param.to_dict(), default_flow_style=True, sort_keys=False,
                                             width=1000).strip()
             for name, param in default_space().items()]
    return EPILOG.format(space="\n".join(lines))


def _env_seconds(name: str, default: int) -> int:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"${name} = {value!r}: expected a whole number of seconds") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep", help="hyper-parameter search with Optuna (resumable, several workers or machines)",
        description="Search the learning rate, rank, batch size and each method's own settings with Optuna\n"
                    "(TPE sampler, median pruner): one study per method, each with the same number of "
                    "trials;\n"
                    "then write the best configuration per method, importances, plots and a bench preset.",
        epilog=epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of the fixed training settings")
    p.add_argument("--output-dir", default="runs/sweep",
                   help="trial runs, the default journal storage and the outputs (default: runs/sweep)")
    p.add_argument("--methods", help="comma-separated methods, one study each with the same --trials "
                                     f"(instead of --method): {', '.join(methods.names())}")
    p.add_argument("--trials", type=int, default=20, help="total trials per method over all workers "
                                                          "(default: 20)")
    p.add_argument("--storage", metavar="URL",
                   help="Optuna storage: a journal file path, sqlite:///FILE, postgresql://..., mysql://..., "
                        "redis://... (default: <output-dir>/optuna.journal)")
    p.add_argument("--space", metavar="FILE", help="YAML/JSON search space replacing the default's entries")
    p.add_argument("--seeds-per-trial", type=int, default=1, metavar="N",
                   help="train each trial with seeds S..S+N-1 (S = --seed) and average (default: 1)")
    p.add_argument("--sampler-seed", type=int, default=0, help="seed of the TPE sampler (default: 0)")
    p.add_argument("--study-name", metavar="PREFIX", help="prefix of the study names (studies: "
                                                          "[PREFIX-]<task>-<method>)")
    p.add_argument("--objective", choices=OBJECTIVES, default="final",
                   help="the metric at the final epoch, or each run's best epoch (default: final)")
    p.add_argument("--pruner", choices=PRUNERS, default="median", help="median pruner or none (default: "
                                                                       "median)")
    p.add_argument("--prune-startup-trials", type=int, default=5, metavar="N",
                   help="no pruning until N trials are complete (default: 5)")
    p.add_argument("--prune-from-epoch", type=int, default=2, metavar="E",
                   help="the earliest epoch after which a trial may be pruned (default: 2)")
    p.add_argument("--heartbeat-seconds", type=int, metavar="S",
                   help=f"database storages: a running trial records a heartbeat every S seconds "
                        f"(default: ${HEARTBEAT_ENV}, else {HEARTBEAT_SECONDS})")
    p.add_argument("--grace-seconds", type=int, metavar="S",
                   help=f"database storages: a trial without a heartbeat for S seconds is failed and "
                        f"replaced "
                        f"(default: ${GRACE_ENV}, else {GRACE_SECONDS})")
    add_train_flags(p, skip=("output_dir",))
    p.set_defaults(handler=cmd_sweep)


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    """Settings from --config < flags; a flag given on the command line takes its setting out of the space."""
    settings = collect_train_settings(args)
    given = set(given_settings(args))
    if args.methods and args.method:
        raise UserError("give --method or --methods, not both")
    if args.methods:
        chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    else:
        chosen = [settings.get("method", TrainConfig.method)]
    settings.pop("method", None)
    settings.pop("output_dir", None)  # the sweep's own --output-dir (or a config file's): trials go under it
    space = load_space(args.space)
    fixed = given & set(space)
    if given & {"rank", "budget"}:
        fixed |= {"rank", "budget"} & set(space)
    for name in sorted(fixed):
        log.info("%s fixed at %r by --%s: not searched", name, settings.get(name), name.replace("_", "-"))
        del space[name]
    heartbeat = args.heartbeat_seconds
    if heartbeat is None:
        heartbeat = _env_seconds(HEARTBEAT_ENV, HEARTBEAT_SECONDS)
    grace = args.grace_seconds if args.grace_seconds is not None else _env_seconds(GRACE_ENV, GRACE_SECONDS)
    return SweepConfig(methods=chosen, settings=settings, space=space, trials=args.trials,
                       output_dir=args.output_dir, storage=args.storage, seeds_per_trial=args.seeds_per_trial,
                       sampler_seed=args.sampler_seed,
                       study_prefix=args.study_name, objective=args.objective, pruner=args.pruner,
                       prune_startup_trials=args.prune_startup_trials, prune_from_epoch=args.prune_from_epoch,
                       heartbeat_seconds=heartbeat, grace_seconds=grace)


def cmd_sweep(args: argparse.Namespace) -> int:
    import optuna

    from fwlora.rundir import quiet_transformers

    cfg = config_from_args(args)
    optuna.logging.set_verbosity(optuna.logging.DEBUG if args.verbose else optuna.logging.WARNING)
    try:
        with quiet_transformers():
            outcome = run_sweep(cfg)
    except TrainingInterrupted as e:
        raise TrainingInterrupted(f"sweep stopped ({e}); the trial is recorded as failed and will be "
                                  f"replaced: "
                                  "run the same command again to continue", e.signum) from None
    except KeyboardInterrupt:  # a signal outside a run's training loop (loading, evaluating the study)
        print("fwlora: sweep stopped; a running trial is recorded as failed and will be replaced: "
              "run the same command again to continue", file=sys.stderr)
        raise
    print(outcome["summary"])
    print(f"outputs in {cfg.output_dir}: sweep_summary.md, best_params.json, importance.json, "
          f"best_<method>.yaml, "
          "tuned_preset.yaml, plots/")
    empty = [m for m, e in outcome["best"].items() if "value" not in e and not e["trials"]["running"]]
    if empty and cfg.trials > 0:
        print(f"no complete trial for {', '.join(empty)} (see the trials' fail_reason / pruned_reason in "
              f"the study)",
              file=sys.stderr)
        return 1
    return 0
