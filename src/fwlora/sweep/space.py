"""The search space: what a sweep may vary, checked before the first trial so a typo fails at once.

The default space is docs/method.md's shared ranges (SHARED_SPACE: lr, rank, batch_size) plus, for every
registered method, its class's own `search_space`, each of those entries restricted to its method.
A --space file replaces entries key by key; `key: null` drops one.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Mapping

from fwlora import methods
from fwlora.checks import is_finite_real
from fwlora.config import TrainConfig, load_config_file, setting_types, type_parts
from fwlora.errors import UserError

if TYPE_CHECKING:
    import optuna

PARAM_TYPES = ("float", "int", "categorical")
ENTRY_KEYS = {"type", "low", "high", "log", "step", "choices", "methods"}
# settings that name the run or that the sweep sets itself: never searched
NOT_SEARCHABLE = ("task", "method", "seed", "output_dir") + TrainConfig.NON_IDENTITY

# docs/method.md's ranges of the settings every method shares; each method adds its own (Method.search_space)
SHARED_SPACE: dict[str, dict[str, Any]] = {
    "lr": {"type": "float", "low": 1e-4, "high": 3e-4, "log": True},
    "rank": {"type": "categorical", "choices": [4, 8, 16]},
    "batch_size": {"type": "categorical", "choices": [16, 32, 64]},
}


@dataclass(frozen=True)
class Param:
    """One searched TrainConfig setting."""

    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()
    methods: tuple[str, ...] | None = None  # None: every method

    def applies_to(self, method: str) -> bool:
        return self.methods is None or method in self.methods

    def suggest(self, trial: "optuna.Trial") -> Any:
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.name, list(self.choices))

    def extremes(self) -> list:
        """The values that bound what a trial may draw (checked against TrainConfig before any trial)."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        if self.type == "categorical":
            out["choices"] = list(self.choices)
        else:
            out.update(low=self.low, high=self.high, log=self.log)
            if self.step is not None:
                out["step"] = self.step
        if self.methods is not None:
            out["methods"] = list(self.methods)
        return out


def _yaml_number(value: Any) -> Any:
    """YAML 1.1 reads 1e-4 (no dot) as a string: take it as the number it was meant to be."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value


def setting_kinds() -> dict[str, tuple[Any, ...]]:
    """{setting: the types its value may have (None apart)} for the shared settings and every registered
    method's own."""
    return {name: type_parts(annotation)[0] for name, annotation in setting_types().items()}


def _kind_words(types_: tuple[Any, ...]) -> str:
    """'int | float', "Literal['none', 'riemannian']": a setting's types as a message writes them."""
    return " | ".join(t.__name__ if isinstance(t, type) else str(t).replace("typing.", "") for t in types_)


def _parse_methods(where: str, name: str, methods_entry: Any) -> tuple[str, ...] | None:
    """The entry's methods; a method's own setting is searched in that method's studies only (another
    method would draw a value it never uses)."""
    known = methods.names()
    if methods_entry is not None:
        if isinstance(methods_entry, str):
            methods_entry = [methods_entry]
        if not (isinstance(methods_entry, list) and methods_entry and all(m in known for m in methods_entry)):
            raise UserError(f"{where}: methods must be a non-empty list of {', '.join(known)}, got {methods_entry!r}")
    owner = methods.owner_of(name)
    if owner is None:
        return tuple(methods_entry) if methods_entry is not None else None
    if methods_entry is not None and methods_entry != [owner]:
        raise UserError(f"{where}: a setting of method {owner} only: methods must be [{owner}] or left out, "
                        f"got {methods_entry!r}")
    return (owner,)


def parse_param(name: str, entry: Any, source: str) -> Param:
    """One space entry, checked so that a typo fails before the first trial, not in the twentieth."""
    kinds = setting_kinds()
    where = f"{source}: {name}"
    if name not in kinds:
        raise UserError(f"{where}: not a training setting; known: {', '.join(sorted(kinds))}")
    if name in NOT_SEARCHABLE:
        raise UserError(f"{where}: cannot be searched (the sweep sets it: use --methods, --seed, "
                        "--seeds-per-trial, --output-dir)")
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected a mapping like {{type: float, low: 1e-4, high: 3e-4, log: true}}, "
                        f"got {entry!r}")
    unknown = set(entry) - ENTRY_KEYS
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; use {', '.join(sorted(ENTRY_KEYS))}")
    kind = entry.get("type")
    if kind not in PARAM_TYPES:
        raise UserError(f"{where}: type must be one of {', '.join(PARAM_TYPES)}, got {kind!r}")
    applies = _parse_methods(where, name, entry.get("methods"))
    field_kind = kinds[name]
    if kind == "categorical":
        extra = {"low", "high", "log", "step"} & set(entry)
        if extra:
            raise UserError(f"{where}: a categorical entry takes choices, not {', '.join(sorted(extra))}")
        choices = entry.get("choices")
        if isinstance(choices, list) and (float in field_kind or int in field_kind):
            choices = [_yaml_number(c) for c in choices]
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: choices must be a non-empty list, got {choices!r}")
        if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            raise UserError(f"{where}: choices must be numbers, strings, true/false or null, got {choices!r}")
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise UserError(f"{where}: choices repeat a value: {choices!r}")
        return Param(name, kind, choices=tuple(choices), methods=applies)
    if "choices" in entry:
        raise UserError(f"{where}: choices belong to type categorical (this entry is {kind})")
    if not (int in field_kind or float in field_kind):
        raise UserError(f"{where}: a {_kind_words(field_kind)} setting can only be searched as type categorical")
    if kind == "float" and float not in field_kind:
        raise UserError(f"{where}: an integer setting: use type int or categorical")
    low, high = _yaml_number(entry.get("low")), _yaml_number(entry.get("high"))
    log_scale, step = entry.get("log", False), _yaml_number(entry.get("step"))
    if not (is_finite_real(low) and is_finite_real(high)):
        raise UserError(f"{where}: low and high must be finite numbers, got {low!r} and {high!r}")
    if kind == "int" and not (isinstance(low, int) and isinstance(high, int)):
        raise UserError(f"{where}: type int needs integer low and high, got {low!r} and {high!r}")
    if not low < high:
        raise UserError(f"{where}: low = {low} must be below high = {high} (a fixed value is a flag, not a search)")
    if not isinstance(log_scale, bool):
        raise UserError(f"{where}: log must be true or false, got {log_scale!r}")
    if log_scale and low <= 0:
        raise UserError(f"{where}: a log scale needs low > 0, got {low}")
    if step is not None:
        if not (is_finite_real(step) and step > 0) or (kind == "int" and not isinstance(step, int)):
            raise UserError(f"{where}: step must be a positive {'integer' if kind == 'int' else 'number'}, got {step!r}")
        if log_scale:
            raise UserError(f"{where}: give log or step, not both (Optuna cannot combine them)")
    if kind == "float":
        low, high = float(low), float(high)
    return Param(name, kind, low=low, high=high, log=log_scale, step=step, methods=applies)


def parse_space(entries: Mapping[str, Any], source: str) -> dict[str, Param]:
    return {name.replace("-", "_"): parse_param(name.replace("-", "_"), entry, source) for name, entry in entries.items()}


def default_space() -> dict[str, Param]:
    """SHARED_SPACE plus each registered method's `search_space`, restricted to that method. Built when
    asked, not at import, so that the methods of $FWLORA_METHODS plug-ins are in it."""
    space = parse_space(SHARED_SPACE, "default space")
    for name in methods.names():
        source = f"method {name}'s search_space"
        for key, entry in methods.get(name).search_space.items():
            key = key.replace("-", "_")
            param = parse_param(key, {**entry, "methods": [name]} if isinstance(entry, dict) else entry, source)
            taken = space.get(key)
            if taken is None:
                space[key] = param
            elif taken.methods is not None and replace(taken, methods=param.methods) == param:
                space[key] = replace(taken, methods=taken.methods + param.methods)  # the same range: shared
            else:
                raise UserError(f"{source}: {key} is already searched by "
                                f"{'every method' if taken.methods is None else 'method ' + ', '.join(taken.methods)}"
                                " with another range; a setting has one entry in the space")
    return space


def load_space(path: str | os.PathLike | None) -> dict[str, Param]:
    """The default space, with the entries of a YAML/JSON file replacing it key by key (`key: null` drops one)."""
    space = default_space()
    if path is None:
        return space
    raw = load_config_file(path)  # a mapping with file-named errors; dashes in keys become underscores
    for name, entry in raw.items():
        if entry is None or entry is False:
            space.pop(name, None)
        else:
            space[name] = parse_param(name, entry, f"space file {path}")
    if "rank" in space and "budget" in space:
        raise UserError(f"space file {path}: search rank or budget, not both (budget maps to a rank)")
    return space


def format_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def format_params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in params.items()) or "(no searched parameters)"
