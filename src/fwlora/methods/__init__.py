"""Methods as plug-ins: a registry from names to `Method` classes (see base.py for the interface).

Built in: lora, adalora, fwlora, fwrank. A method of your own is one file:

    from fwlora.methods import Method, register, lora_config

    @register
    class Frozen(Method):
        name, label = "mine", "My LoRA"
        def build(self, model):
            from peft import get_peft_model
            return get_peft_model(model, lora_config(self.run, self.run.rank, 2.0 * self.run.rank))

and `FWLORA_METHODS=my_module` (module names or .py paths, comma-separated) makes `fwlora train`,
`bench`, `report` and `sweep` import it before they parse their arguments.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from fwlora.errors import UserError
from fwlora.methods.base import Method, NoSettings, RunInfo, lora_config, with_help

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


# the built-in methods register themselves on import
from fwlora.methods import lora as _lora  # noqa: E402,F401
from fwlora.methods import adalora as _adalora  # noqa: E402,F401
from fwlora.methods import fwlora as _fwlora  # noqa: E402,F401
from fwlora.methods import fwrank as _fwrank  # noqa: E402,F401

__all__ = ["Method", "NoSettings", "RunInfo", "REGISTRY", "register", "get", "names", "label", "all_settings",
           "owner_of", "load_plugins", "lora_config", "with_help"]
