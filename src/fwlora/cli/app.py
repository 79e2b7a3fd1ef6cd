"""The command line behind `fwlora` (cli/__init__.py checks the install first): the parser of every
subcommand, the train command, and error reporting. The work happens in the modules it calls.

Exit codes: 0 done, 1 a run failed (diverged), 2 a mistake in the input (message, no traceback),
130/143 stopped by SIGINT/SIGTERM after saving a checkpoint (resume with --resume).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from fwlora import methods
from fwlora.cli import bench, export, predict, report, sweep
from fwlora.cli.flags import PROGRAM, add_train_flags, collect_train_settings
from fwlora.config import TrainConfig
from fwlora.errors import FWLoRAError, NonFiniteError, TrainingInterrupted
from fwlora.files import end_process_group

log = logging.getLogger(PROGRAM)

EPILOG_TRAIN = """examples:
  fwlora train --task cola --method fwlora --rank 2 --lr 1e-3 --data-dir ../shared/glue
  fwlora train --model roberta-base --task sst2 --method adalora --budget 0.2
  fwlora train --config best_fwlora.yaml --seed 1 --output-dir runs/seed1
settings come from: defaults < --config FILE < flags given on the command line."""


def build_parser() -> argparse.ArgumentParser:
    methods.load_plugins()  # $FWLORA_METHODS: a user's methods get their --method choice and flags
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Fisher-Weighted LoRA and Fisher-guided rank allocation: train them, and compare them "
                    "honestly with LoRA and AdaLoRA.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    train = sub.add_parser("train", help="train one model with one method on one task",
                           description="Train one run and write its directory: config.json, result.json "
                                       "(metrics, timings, per-matrix statistics), adapter/.",
                           epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", metavar="FILE", help="YAML or JSON file of training settings")
    train.add_argument("--resume", action="store_true", help="continue the unfinished run in --output-dir "
                                                             "from its checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace whatever --output-dir holds")
    add_train_flags(train)
    train.set_defaults(handler=cmd_train)

    for command in (bench, report, sweep, predict, export):
        command.add_parser(sub)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from fwlora.rundir import quiet_transformers
    from fwlora.train import train

    cfg = TrainConfig.from_dict(collect_train_settings(args), source=args.config or "command line")
    with quiet_transformers():
        record = train(cfg, resume=args.resume, overwrite=args.overwrite)
    metric = record.metric
    print(f"{cfg.task} {cfg.method}: final {metric} {record.metric_value('final'):.4f} (best "
          f"{record.metric_value('best'):.4f} at epoch {record.best['epoch']}), training "
          f"{record.train_seconds:.1f} s, rank {record.budget.rank} = "
          f"{record.budget.percent:.3f} % "
          f"of the backbone -> {cfg.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except FWLoRAError as e:  # a plug-in named in $FWLORA_METHODS that cannot be imported
        print(f"fwlora: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        code = args.handler(args)
        end_process_group()  # a normal return only: after an error another process may still be mid-collective
        return code
    except FWLoRAError as e:  # UserError, DataError and the methods' MethodError
        print(f"fwlora: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"fwlora: training diverged: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(f"fwlora: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("fwlora: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped (`| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
