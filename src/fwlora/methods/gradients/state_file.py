"""A method's saved state: safetensors for its tensors, JSON metadata beside them (no pickle)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

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


class SavedState:
    """save / load / from_pretrained for a method object whose whole state is its state_dict(): tensors to
    safetensors, the rest to JSON metadata. A subclass names its file, how errors name it and its config class,
    and says how its tensor entries pack into named tensors and back (pack_tensors / unpack_tensors)."""

    state_file: ClassVar[str]
    state_what: ClassVar[str]
    config_class: ClassVar[type]

    def pack_tensors(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Take the tensor entries out of `state` (in place) as named tensors."""
        raise NotImplementedError

    @classmethod
    def unpack_tensors(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The state_dict() back from the metadata and the named tensors."""
        raise NotImplementedError

    def save(self, directory: str | Path) -> Path:
        """Write the state beside a PEFT adapter (no pickle)."""
        state = self.state_dict()
        return save_state_file(Path(directory) / self.state_file, self.pack_tensors(state), state)

    @classmethod
    def read_state(cls, directory: str | Path) -> dict[str, Any]:
        meta, tensors = read_state_file(Path(directory) / cls.state_file, cls.state_what)
        return cls.unpack_tensors(meta, tensors)

    def load(self, directory: str | Path) -> None:
        self.load_state_dict(self.read_state(directory))

    @classmethod
    def from_pretrained(cls, model: Any, directory: str | Path) -> Any:
        """Rebuild from a directory written by save(), for a model carrying the same adapter."""
        state = cls.read_state(directory)
        obj = cls(model, cls.config_class(**state["config"]))
        obj.load_state_dict(state)
        return obj
