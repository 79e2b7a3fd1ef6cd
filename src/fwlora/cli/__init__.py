"""`fwlora`: the command line. This face imports nothing heavy, so that a core install (the library alone)
gets one line saying which extra to install instead of a traceback; cli/app.py holds the parser.

Exit codes: 0 done, 1 a run failed (diverged), 2 a mistake in the input (message, no traceback),
130/143 stopped by SIGINT/SIGTERM after saving a checkpoint (resume with --resume).
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

# what the experiment system imports beyond the core install (torch, transformers, peft, safetensors, and
# what they bring: accelerate, pyyaml, tqdm, numpy)
EXPERIMENT_MODULES = {"datasets": "datasets", "sklearn": "scikit-learn", "scipy": "scipy", "matplotlib": "matplotlib",
                      "optuna": "optuna"}


def missing_extra() -> list[str]:
    """The experiment system's packages this environment lacks (pip names)."""
    return [package for module, package in EXPERIMENT_MODULES.items() if importlib.util.find_spec(module) is None]


def main(argv: list[str] | None = None) -> int:
    missing = missing_extra()
    if missing:
        print(f"fwlora: the command line needs the experiments extra ({', '.join(missing)} missing): "
              "pip install 'fwlora[experiments]' (the library alone, `import fwlora`, needs none of "
              "it)", file=sys.stderr)
        return 2
    import logging

    # bitsandbytes (where installed) warns at import that a CPU kernel cannot be fetched from the hub: noise here
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from fwlora.cli.app import main as run

    return run(argv)


def entry() -> None:
    """The `fwlora` executable and `python -m fwlora` (what torchrun and accelerate launch run)."""
    from fwlora.files import leave_process

    leave_process(main())


def __getattr__(name: str) -> Any:
    # build_parser, collect_train_settings, ...: the parser's names, imported when asked for
    if name in ("build_parser", "cmd_train"):
        from fwlora.cli import app

        return getattr(app, name)
    if name in ("add_train_flags", "collect_train_settings", "parse_sets"):
        from fwlora.cli import flags

        return getattr(flags, name)
    raise AttributeError(name)


if __name__ == "__main__":
    entry()
