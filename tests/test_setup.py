"""Set-up off this machine: `make quick` finds data or asks the hub, and offline without data stops with one
line; the core install (the library without the experiments extra) imports, and its `fwlora` says which extra
to install; the version has one source."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import fwlora

REPO = Path(__file__).resolve().parents[1]


def make_n(tmp_path: Path, **env: str) -> str:
    """`make -n quick` in a copy of the build files with no ../shared beside it (a user's clone)."""
    clone = tmp_path / "clone"
    clone.mkdir(parents=True)
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        shutil.copy(REPO / name, clone / name)
    shutil.copytree(REPO / "mk", clone / "mk")
    (clone / ".venv").mkdir()
    for stamp in (".fwlora-installed",):  # as if installed: -n prints the quick command alone
        (clone / ".venv" / stamp).touch()
    out = subprocess.run(["make", "-n", "quick", *[f"{k}={v}" for k, v in env.items()]], cwd=clone,
                         capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_quick_asks_the_hub_without_local_data_and_stays_offline_with_it(tmp_path):
    without = make_n(tmp_path / "a")
    assert "fwlora bench --preset quick" in without and "--data-dir" not in without and "HF_HUB_OFFLINE" not in without
    data = tmp_path / "glue" / "sst2"
    data.mkdir(parents=True)
    with_data = make_n(tmp_path / "b", DATA_DIR=str(tmp_path / "glue"))
    assert f"--data-dir {tmp_path / 'glue'}" in with_data and "HF_HUB_OFFLINE=1" in with_data
    index = make_n(tmp_path / "c", TORCH_INDEX="https://download.pytorch.org/whl/cpu")
    assert index  # the install recipe is not re-run here; the flag is checked below
    makefile = (REPO / "Makefile").read_text()
    assert "--index-url $(TORCH_INDEX)" in makefile and "torch==2.13.0" in makefile


def test_offline_without_data_the_bench_stops_once_with_one_line(tmp_path, monkeypatch):
    """What `make quick` runs in a clone with no data, offline: one message before any run starts."""
    monkeypatch.delenv("FWLORA_DATA_DIR", raising=False)
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "FWLORA_DATA_DIR": ""}
    out = subprocess.run([sys.executable, "-m", "fwlora", "bench", "--preset", "quick", "--output-dir",
                          str(tmp_path / "quick")], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("fwlora: error:")]
    assert len(errors) == 1 and "could not load GLUE sst2" in errors[0] and "--data-dir" in errors[0]
    assert "Traceback" not in out.stderr and not (tmp_path / "quick" / "sst2").exists()


BLOCK = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ModuleNotFoundError(name)
        return None
sys.meta_path.insert(0, Hide())
import importlib.util
_find = importlib.util.find_spec
def find_spec(name, package=None):
    return None if name.split('.')[0] in {blocked!r} else _find(name, package)
importlib.util.find_spec = find_spec
"""
EXTRA = ["datasets", "sklearn", "scipy", "matplotlib", "optuna"]  # what the experiments extra adds to the core


def test_the_core_install_imports_the_library_and_its_cli_names_the_extra():
    from fwlora.cli import EXPERIMENT_MODULES

    assert set(EXPERIMENT_MODULES) == set(EXTRA)
    code = BLOCK.format(blocked=set(EXTRA)) + (
        "import fwlora\n"
        "from fwlora import FisherWeightedLoRA, FWLoRAConfig, FisherRankAllocation, FWRankConfig\n"
        "from fwlora.hf import FWLoRACallback, FWRankCallback\n"
        "from fwlora.cli import main\n"
        "sys.exit(main(['train', '--task', 'cola']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert "the command line needs the experiments extra" in out.stderr and "pip install 'fwlora[experiments]'" in out.stderr


def test_the_version_has_one_source():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert fwlora.__version__ == declared
    assert "__version__ = \"0." not in (REPO / "src" / "fwlora" / "__init__.py").read_text()  # not written twice
    assert (REPO / "LICENSE").read_text().startswith("\n                                 Apache License") or \
        "Apache License" in (REPO / "LICENSE").read_text()[:200]
    assert f"## {declared}" in (REPO / "CHANGELOG.md").read_text()
