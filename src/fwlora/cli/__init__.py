"""`fwlora`: argument parsing and error reporting only; the work happens in the modules it calls.

Exit codes: 0 done, 1 a run failed (diverged), 2 a mistake in the input (message, no traceback),
130/143 stopped by SIGINT/SIGTERM after saving a checkpoint (resume with --resume).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from fwlora import methods
from fwlora.config import TrainConfig, config_fields, load_config_file, type_name
from fwlora.errors import NonFiniteError, TrainingInterrupted, UserError
from fwlora.method import FWLoRAError

log = logging.getLogger("fwlora")

EPILOG_TRAIN = """examples:
  fwlora train --task cola --method fwlora --rank 2 --lr 1e-3 --data-dir ../shared/glue
  fwlora train --model roberta-base --task sst2 --method adalora --budget 0.2
  fwlora train --config best_fwlora.yaml --seed 1 --output-dir runs/seed1
settings come from: defaults < --config FILE < flags given on the command line."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_train_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per shared TrainConfig field and per registered method's setting, help text from the
    field; defaults stay unset (None) so that a config file can fill what the command line leaves out."""
    group = parser.add_argument_group("training settings (also accepted in --config FILE)")
    for f in config_fields():
        if f.name not in skip:
            _add_flag(group, f.name, f, choices=methods.names() if f.name == "method" else None)
    for cls in methods.REGISTRY.values():
        own = [f for f in cls.setting_fields() if cls.flat_name(f.name) not in skip]
        if own:
            method_group = parser.add_argument_group(f"{cls.label or cls.name} settings (--method {cls.name} only)")
            for f in own:
                _add_flag(method_group, cls.flat_name(f.name), f)


def _add_flag(group: Any, name: str, f: Any, choices: list[str] | None = None) -> None:
    kind = type_name(f.type)
    default = f.default if not callable(getattr(f, "default_factory", None)) else f.default_factory()
    help_text = f.metadata.get("help", "") + (f"; one of {', '.join(choices)}" if choices else "") + \
        ("" if default is None else f" (default: {default})")
    kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_text.replace("%%", "%%")}
    if kind.startswith("bool"):
        group.add_argument(_flag(name), action="store_const", const=True, **kwargs)
        return
    if kind.startswith("list"):
        kwargs["type"] = lambda v: [x.strip() for x in v.split(",") if x.strip()]
    elif kind.startswith("int | float"):
        kwargs["type"] = _steps_or_fraction
    elif kind.startswith("int"):
        kwargs["type"] = int
    elif kind.startswith("float"):
        kwargs["type"] = float
    kwargs["metavar"] = name.upper()
    group.add_argument(_flag(name), **kwargs)


def _steps_or_fraction(text: str) -> int | float:
    """A flag that counts optimizer steps (500) or gives a fraction of the run (0.25)."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of steps nor a fraction of the run") from None


def collect_train_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Settings from --config FILE, overridden by the flags given on the command line."""
    values = load_config_file(args.config) if getattr(args, "config", None) else {}
    names = [f.name for f in config_fields()] + list(methods.all_settings())
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if "rank" in given:
        values.pop("budget", None)
    if "budget" in given:
        values.pop("rank", None)
    values.update(given)
    return values


def build_parser() -> argparse.ArgumentParser:
    methods.load_plugins()  # $FWLORA_METHODS: a user's methods get their --method choice and flags
    parser = argparse.ArgumentParser(
        prog="fwlora",
        description="Fisher-Weighted LoRA and Fisher-guided rank allocation: train them, and compare them honestly with LoRA and AdaLoRA.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    train = sub.add_parser("train", help="train one model with one method on one task",
                           description="Train one run and write its directory: config.json, result.json "
                                       "(metrics, timings, per-matrix statistics), adapter/.",
                           epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", metavar="FILE", help="YAML or JSON file of training settings")
    train.add_argument("--resume", action="store_true", help="continue the unfinished run in --output-dir from its checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace whatever --output-dir holds")
    add_train_flags(train)
    train.set_defaults(handler=cmd_train)

    from fwlora.cli import bench, report, sweep

    bench.add_parser(sub)
    report.add_parser(sub)
    sweep.add_parser(sub)
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
          f"{record.timing['train_seconds']:.1f} s, rank {record.budget['rank']} = {record.budget['percent']:.3f} % "
          f"of the backbone -> {cfg.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except UserError as e:  # a plug-in named in $FWLORA_METHODS that cannot be imported
        print(f"fwlora: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.handler(args)
    except (UserError, FWLoRAError) as e:
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
