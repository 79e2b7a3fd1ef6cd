"""The training settings as command-line flags, shared by `train`, `bench` and `sweep`: one flag per
TrainConfig field and per registered method's setting, built by transformers' HfArgumentParser from the
field (its type and help text)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Literal

import yaml
from transformers import HfArgumentParser

from fwlora import methods
from fwlora.config import config_fields, load_config_file, read_yaml, setting_types, type_parts
from fwlora.errors import UserError

PROGRAM = __name__.split(".")[0]


def add_train_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per shared TrainConfig field and per registered method's setting, help text from the
    field; defaults stay unset (None) so that a config file can fill what the command line leaves out."""
    types = setting_types()
    group = parser.add_argument_group("training settings (also accepted in --config FILE)")
    for setting in config_fields():
        if setting.name not in skip:
            choices = methods.names() if setting.name == "method" else None
            _add_flag(group, setting.name, setting, types[setting.name], choices)
    for cls in methods.REGISTRY.values():
        own = [f for f in cls.setting_fields() if cls.flat_name(f.name) not in skip]
        if own:
            title = f"{cls.label or cls.name} settings (--method {cls.name} only)"
            method_group = parser.add_argument_group(title)
            for setting in own:
                name = cls.flat_name(setting.name)
                _add_flag(method_group, name, setting, types[name])


def _add_flag(group: Any, name: str, setting: dataclasses.Field, annotation: Any,
              choices: list[str] | None = None) -> None:
    """HfArgumentParser's flag for a copy of the setting's field that has no default (None: not given) and
    is named with dashes (one option, --batch-size, where HfArgumentParser would add --batch_size too)."""
    has_factory = setting.default_factory is not dataclasses.MISSING
    default = setting.default_factory() if has_factory else setting.default
    help_text = (setting.metadata.get("help", "") + (f"; one of {', '.join(choices)}" if choices else "")
                 + ("" if default is None else f" (default: {default})"))
    parse_type = _parse_type(annotation)
    if parse_type is bool:  # a switch, --flag (every bool setting defaults to False); HfArgumentParser's
        # bool flag takes an optional value, --flag [true|false], which would change the usage users know
        group.add_argument("--" + name.replace("_", "-"), dest=name, action="store_const", const=True,
                           default=None, help=help_text)
        return
    metadata = {"dest": name, "help": help_text, "metavar": name.upper()}
    flag = dataclasses.field(default=None, metadata=metadata)
    flag.name, flag.type = name.replace("_", "-"), parse_type
    # HfArgumentParser's builder of one field's flag: its constructor takes whole dataclasses, whose flags
    # would carry the fields' defaults (a config file could no longer fill them) and --batch_size aliases
    HfArgumentParser._parse_dataclass_field(group, flag)


def _parse_type(annotation: Any) -> Any:
    """The type HfArgumentParser gets for a setting's type (None allowed: the flag is simply left out)."""
    kinds, _ = type_parts(annotation)
    if kinds == (int, float):  # HfArgumentParser takes one type per flag
        return _steps_or_fraction
    (kind,) = kinds
    if typing.get_origin(kind) is list:  # HfArgumentParser's lists are space-separated (nargs="+"); ours: a,b
        return _comma_list
    if typing.get_origin(kind) is Literal:  # the choices are the method's own check, whose one-line error
        return str  # names the setting (argparse's would print the usage too)
    return kind


def _comma_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _steps_or_fraction(text: str) -> int | float:
    """A flag that counts optimizer steps (500) or gives a fraction of the run (0.25)."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        message = f"{text!r} is neither a number of steps nor a fraction of the run"
        raise argparse.ArgumentTypeError(message) from None


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The training settings given as flags on the command line (a flag left out is None)."""
    return {name: getattr(args, name) for name in setting_types() if getattr(args, name, None) is not None}


def collect_train_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Settings from --config FILE, overridden by the flags given on the command line."""
    values = load_config_file(args.config) if getattr(args, "config", None) else {}
    given = given_settings(args)
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
            out[key.strip().replace("-", "_")] = read_yaml(value)
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: cannot read the value") from None
    return out
