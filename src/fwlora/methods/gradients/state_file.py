"""A method's saved state: safetensors for its tensors, JSON metadata beside them (no pickle)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fwlora.errors import MethodError
from fwlora.files import write_atomic


def save_state_file(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """A method's state as safetensors (its tensors) plus JSON metadata, written aside and renamed into place
    (no pickle; a reader never sees half a file)."""
    from safetensors.torch import save

    # safetensors cannot write a file without tensors: a placeholder stands in for a method that has none yet
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()} or {"empty": torch.zeros(0)}
    return write_atomic(path, lambda f: f.write(save(tensors, {k: json.dumps(v) for k, v in meta.items()})))


def read_state_file(path: Path, what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a file written by save_state_file."""
    from safetensors import safe_open

    if not path.is_file():
        raise MethodError(f"no {what} state at {path}")
    with safe_open(str(path), framework="pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}, {k: f.get_tensor(k) for k in f.keys()}
