"""The training settings as command-line flags, shared by `train`, `bench` and `sweep` (one flag per
TrainConfig field and per registered method's setting, help text from the field)."""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from fwlora import methods
from fwlora.config import config_fields, load_config_file, type_name
from fwlora.errors import UserError

PROGRAM = __name__.split(".")[0]


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


def parse_sets(items: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE pairs (YAML values) as training settings."""
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: cannot read the value") from None
    return out
