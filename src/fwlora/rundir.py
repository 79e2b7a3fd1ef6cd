"""The run directory around the training loop: where a number came from (environment), whether a
directory may be used or resumed (prepare_run_dir), and quiet third-party logging.
File names and the record itself belong to records.py."""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from fwlora.config import TrainConfig
from fwlora.device import tf32_enabled
from fwlora.errors import UserError
from fwlora.files import broadcast_from_main, is_main_process
from fwlora.records import CHECKPOINT_DIR, CLAIM_FILE, Status, read_config, run_status

log = logging.getLogger(__name__)
PROGRAM = __name__.split(".")[0]


def environment(device: torch.device | None = None, cfg: TrainConfig | None = None) -> dict[str, Any]:
    """Versions, git commit and machine, and for a run its device, precision and TF32 setting: enough to tell
    where a number came from."""
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                 cwd=Path(__file__).resolve().parent)
            return out.stdout.strip() if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    def boot_id() -> str | None:  # which boot of which machine ran it: time ratios pair runs of one boot only
        try:
            return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
        except OSError:
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    cuda = torch.cuda.is_available()
    on_cuda = device is not None and device.type == "cuda"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "boot_id": boot_id(),
        "packages": {p: version(p) for p in (PROGRAM, "torch", "transformers", "peft", "accelerate", "datasets")},
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(device if on_cuda else None) if cuda else None,
        "cuda_version": torch.version.cuda,  # the CUDA torch was built with (None: a CPU build)
        "cudnn_version": torch.backends.cudnn.version() if cuda else None,
        "device": str(device) if device is not None else None,
        "dtype": cfg.dtype if cfg is not None else None,
        "mixed_precision": cfg.mixed_precision if cfg is not None else None,
        "tf32": tf32_enabled(device) if device is not None else None,  # what float32 matmuls ran with
        "command": " ".join(sys.argv),
    }


def prepare_run_dir(cfg: TrainConfig, resume: bool, overwrite: bool) -> bool:
    """Claim cfg.output_dir; return True when a checkpoint there should be resumed.

    A directory holding another configuration is refused unless --overwrite; an unfinished run of the
    same configuration needs --resume (or --overwrite) so that finished work is never lost by accident.
    Under torchrun the main process alone looks and changes the directory; the others get its answer
    (or its error), so that no two processes clear or rename it at once.
    """
    answer: bool | Exception | None = None
    if is_main_process():
        try:
            answer = _prepare(Path(cfg.output_dir), cfg, resume, overwrite)
        except (UserError, OSError, ValueError) as e:  # raised in every process, not only the main one
            answer = e
    answer = broadcast_from_main(answer)
    if isinstance(answer, Exception):
        raise answer
    return bool(answer)


def _prepare(run_dir: Path, cfg: TrainConfig, resume: bool, overwrite: bool) -> bool:
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a directory: choose another --output-dir")
    old = read_config(run_dir)
    if old is None:
        if _contents(run_dir) and not overwrite:
            raise UserError(f"{run_dir} is not empty and holds no fwlora run: choose another --output-dir or pass --overwrite")
        if overwrite:
            _clear(run_dir)
        return False
    if overwrite:
        _clear(run_dir)
        return False
    diff = config_difference(old, cfg)
    if diff:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff[:6])
        raise UserError(f"{run_dir} holds a run with a different configuration ({shown}); "
                        "use another --output-dir, or --overwrite to replace it")
    status = run_status(run_dir)
    if status == Status.COMPLETE:
        raise UserError(f"{run_dir} already holds this run, complete; pass --overwrite to train it again")
    if not resume:
        raise UserError(f"{run_dir} holds an unfinished run of this configuration ({status}); "
                        "pass --resume to continue it or --overwrite to start again")
    checkpoint, previous = run_dir / CHECKPOINT_DIR, run_dir / (CHECKPOINT_DIR + ".old")
    if not checkpoint.is_dir() and previous.is_dir():
        previous.rename(checkpoint)  # stopped between save_checkpoint's two renames: the old one is whole
    if not checkpoint.is_dir():
        log.warning("%s has no checkpoint (stopped before its first one): starting the run from the beginning", run_dir)
    return checkpoint.is_dir()


def _contents(run_dir: Path) -> list[Path]:
    """What the directory holds, but the bench worker's claim on it (fwlora.claims) and its heartbeat's
    temporary file, which stay."""
    if not run_dir.is_dir():
        return []
    return [p for p in run_dir.iterdir() if p.name != CLAIM_FILE and not p.name.startswith(f".{CLAIM_FILE}.")]


def _clear(run_dir: Path) -> None:
    for p in _contents(run_dir):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def config_difference(old: dict[str, Any], cfg: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every setting that decides the result and differs (settings_difference)."""
    return settings_difference(old, cfg.identity(), cfg.method)


def settings_difference(old: dict[str, Any], new: dict[str, Any], method: str) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every key of `new` whose value `old` (settings recorded earlier, perhaps by an
    older release) does not share. A key `old` lacks counts as its default; keys `new` lacks (another
    method's settings: release 1 wrote every method's into every run and study) are not this method's."""
    try:
        defaults = json.loads(json.dumps(TrainConfig.from_dict({"method": method}).identity()))
    except UserError:
        defaults = {}
    return [(k, old.get(k, defaults.get(k)), v) for k, v in sorted(new.items()) if old.get(k, defaults.get(k)) != v]



@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' and PEFT's per-run chatter (newly initialised head weights etc.)."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
        transformers.logging.enable_progress_bar()
