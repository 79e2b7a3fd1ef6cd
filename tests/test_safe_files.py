"""Results files on disk: `files.write_json` is atomic (a failed serialisation or a write that fails midway
leaves the old file and no temporary) and writes strict JSON, and nothing in the package unpickles from a
run directory (no pickle-family imports, `torch.load` only with weights_only=True)."""

from __future__ import annotations

import ast
import json
import math
import os
import re
from pathlib import Path

import pytest

from fwlora import files

SRC = Path(__file__).resolve().parents[1] / "src" / "fwlora"


# ---- atomic writes, no pickle --------------------------------------------------------------------------


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_write_json_leaves_the_old_file_when_serialisation_fails(tmp_path):
    path = tmp_path / "result.json"
    files.write_json(path, {"status": "complete", "value": 1.5})
    old = path.read_bytes()

    class Unserialisable:
        pass

    for bad in ({"status": "x", "nested": [1, 2, {"deep": Unserialisable()}]}, {"status": "x", "set": {1, 2}}):
        with pytest.raises(TypeError):
            files.write_json(path, bad)
        assert path.read_bytes() == old
        assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("fail_in", ["write", "fsync", "replace"])
def test_a_write_failing_midway_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, fail_in):
    path = tmp_path / "result.json"
    files.write_json(path, {"status": "complete"})
    old = path.read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    if fail_in == "write":
        real_fdopen = os.fdopen

        class Half:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def fileno(self):
                return self.f.fileno()

            def write(self, text):
                self.f.write(text[: len(text) // 2])
                self.f.flush()
                raise KeyboardInterrupt  # even an interruption halfway through the text

            def flush(self):
                self.f.flush()

        monkeypatch.setattr(files.os, "fdopen", lambda *a, **k: Half(real_fdopen(*a, **k)))
        with pytest.raises(KeyboardInterrupt):
            files.write_json(path, {"status": "failed", "error": "x" * 10_000})
    else:
        monkeypatch.setattr(files.os, fail_in, boom)
        with pytest.raises(OSError, match="No space"):
            files.write_json(path, {"status": "failed", "error": "x" * 10_000})
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert _leftovers(tmp_path) == []


def test_write_json_output_is_strict_json_and_readable_by_others(tmp_path):
    path = files.write_json(tmp_path / "sub" / "r.json", {"a": math.nan, "b": [math.inf, 1.0], 3: "x"})
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == \
        {"a": None, "b": [None, 1.0], "3": "x"}
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def _calls(tree: ast.AST, dotted: str) -> list[ast.Call]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == dotted:
            out.append(node)
    return out


def test_nothing_is_unpickled_from_a_run_directory():
    sources = sorted(SRC.rglob("*.py"))
    assert len(sources) > 5
    for path in sources:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                    for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
        assert not imported & {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}, path
        assert not re.search(r"allow_pickle\s*=\s*True|read_pickle|pickle\.loads?\b", text), path
        for call in _calls(tree, "torch.load"):
            weights_only = [k for k in call.keywords if k.arg == "weights_only"]
            assert weights_only and isinstance(weights_only[0].value, ast.Constant) and weights_only[0].value.value is True, \
                f"{path.name}:{call.lineno}: torch.load without weights_only=True"
        assert "from torch import load" not in text, path
