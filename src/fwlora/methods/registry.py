"""The method registry: names -> Method classes, and every per-method answer the experiment system needs.

Nothing outside methods/ names a method: the training loop, the report and the sweep ask this module (the
reference column, the rival every column is compared with, colours, figures, time hypotheses).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from fwlora.errors import UserError
from fwlora.methods.base import REFERENCE, RIVAL, Method, TimeHypothesis

PLUGINS_ENV = "FWLORA_METHODS"
REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Add a Method class to the registry (a class decorator). Its settings' flat names must be new."""
    if not cls.name or not cls.name.isidentifier():
        raise ValueError(f"{cls.__name__}.name must be a non-empty identifier, got {cls.name!r}")
    taken = {key: owner for owner, other in REGISTRY.items() if other is not cls and owner != cls.name
             for key in other.defaults()}
    for key in cls.defaults():
        if key in taken:
            raise ValueError(f"{cls.__name__}: setting {key!r} is already a setting of method {taken[key]!r}")
    REGISTRY[cls.name] = cls
    return cls


def load_plugins(spec: str | None = None) -> None:
    """Import the modules named in $FWLORA_METHODS (or `spec`): each registers its methods."""
    spec = os.environ.get(PLUGINS_ENV, "") if spec is None else spec
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        try:
            if item.endswith(".py"):
                path = Path(item).resolve()
                module_name = f"fwlora_plugin_{path.stem}"
                if module_name in sys.modules:
                    continue
                loader_spec = importlib.util.spec_from_file_location(module_name, path)
                if loader_spec is None or not path.is_file():
                    raise FileNotFoundError(path)
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[module_name] = module
                loader_spec.loader.exec_module(module)  # type: ignore[union-attr]
            else:
                importlib.import_module(item)
        except (ImportError, OSError) as e:
            raise UserError(f"${PLUGINS_ENV}: cannot import {item!r} ({e})") from None


def get(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise UserError(f"method = {name!r}: unknown method; use one of {', '.join(names())}")
    return REGISTRY[name]


def names() -> list[str]:
    return list(REGISTRY)


def label(name: str) -> str:
    cls = REGISTRY.get(name)
    return (cls.label or cls.name) if cls else name


def all_settings() -> dict[str, tuple[type[Method], Any]]:
    """{flat setting name: (method class, dataclass field)} over every registered method."""
    return {cls.flat_name(f.name): (cls, f) for cls in REGISTRY.values() for f in cls.setting_fields()}


def owner_of(key: str) -> str | None:
    """The method a flat setting belongs to; None for a setting every method shares."""
    found = all_settings().get(key)
    return found[0].name if found else None


def role_holder(role: str) -> str | None:
    """The registered method with this role ("reference": LoRA; "rival": AdaLoRA), or None."""
    return next((name for name, cls in REGISTRY.items() if cls.role == role), None)


def reference_name() -> str:
    """The default reference column and the default --method (the registered method whose role is reference)."""
    name = role_holder(REFERENCE)
    if name is None:
        raise UserError("no registered method is the reference (a Method with role = 'reference')")
    return name


def rival_name() -> str | None:
    """The method every column is also compared with (AdaLoRA), if one is registered."""
    return role_holder(RIVAL)


def method_class(name: str) -> type[Method] | None:
    """The Method class behind a column's method name (None for a name not registered here: an old run's)."""
    return REGISTRY.get(name)


def time_hypothesis(name: str) -> TimeHypothesis | None:
    """The method's claim on time; a method not registered here (an old run's plug-in) is held to the default."""
    cls = REGISTRY.get(name)
    return cls.time_hypothesis if cls else Method.time_hypothesis


def ships_with(name: str | None) -> str | None:
    """The library that ships the method ("peft"), or None (ours, or a name not registered here)."""
    cls = REGISTRY.get(name) if name else None
    return cls.ships_with if cls else None


def with_figure(figure: str) -> list[str]:
    """Registered methods that draw this figure ("importance", "ranks", "penalty_question"), in registry order."""
    return [name for name, cls in REGISTRY.items() if figure in cls.figures]
