"""A run's checkpoint: adapter and head weights, optimizer, schedule, every process's RNG, the method's state and
the data position, so that a resumed run reaches the same result as an uninterrupted one.

Two are kept: `checkpoint` (the newest) and `checkpoint.old` (the one before). A new one is written to
checkpoint.tmp, flushed, then swapped in; the older is dropped only then. On resume a checkpoint whose files
cannot be read is named in one line and the previous one is used (it is moved aside to checkpoint.unreadable);
with neither readable the run stops with a UserError (--overwrite starts it again)."""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fwlora.errors import UserError
from fwlora.files import read_json, write_json
from fwlora.records import CHECKPOINT_DIR

log = logging.getLogger(__name__)

PREVIOUS_DIR, TMP_DIR, UNREADABLE_DIR = (CHECKPOINT_DIR + s for s in (".old", ".tmp", ".unreadable"))
PROGRESS_KEYS = ("epoch", "batches_done_in_epoch", "global_step", "history", "train_seconds", "eval_seconds",
                 "step_seconds", "loss_sum", "penalty_sum", "loss_count", "python_random")


# ---- RNG: one state per process ------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG: torch's CPU generator, its CUDA device's generator, Python's."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "python": _python_rng_state()}


def gather_rng_states(device: torch.device) -> list[dict[str, Any]] | None:
    """Every process's rng_state, in rank order, on rank 0 (None elsewhere). All processes must call it."""
    rank, world = _world()
    state = rng_state(device)
    if world == 1:
        return [state]
    states: list[Any] | None = [None] * world if rank == 0 else None
    torch.distributed.gather_object(state, states, dst=0)
    return states


def rng_tensors(states: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The torch and CUDA states of every rank, for rng.safetensors: torch/<rank>, cuda/<rank>."""
    out = {}
    for rank, state in enumerate(states):
        out[f"torch/{rank}"] = state["torch"]
        if state["cuda"] is not None:
            out[f"cuda/{rank}"] = state["cuda"]
    return out


def restore_rng(tensors: dict[str, torch.Tensor], python: list | None, rank: int, device: torch.device) -> None:
    """Set this process's RNG to its own saved state. A checkpoint written by fewer processes (or by a release
    that kept rank 0's alone, as `torch`) gives rank 0's: dropout then differs from an uninterrupted run."""
    own = f"torch/{rank}" in tensors
    key = rank if own else 0
    if not own and rank > 0:
        log.warning("the checkpoint holds no RNG state of process %d: it takes process 0's", rank)
    torch.set_rng_state(tensors.get(f"torch/{key}", tensors.get("torch")))
    if device.type == "cuda":
        cuda = tensors.get(f"cuda/{key}", tensors.get(f"cuda{device.index or 0}"))
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
    if python is not None:
        random.setstate(_python_rng_from_json(python))


# ---- save ------------------------------------------------------------------------------------------------


def save_checkpoint(t: Any) -> None:
    """Save a Trainer's state (every process takes part; the main process writes): written to checkpoint.tmp,
    then swapped in; the checkpoint it replaces becomes checkpoint.old, and the one before that is dropped."""
    from safetensors.torch import save_file

    t.accelerator.wait_for_everyone()
    t._last_checkpoint = time.perf_counter()
    rng = gather_rng_states(t.accelerator.device)
    if not t.is_main:
        return
    final, previous, tmp = (t.run_dir / d for d in (CHECKPOINT_DIR, PREVIOUS_DIR, TMP_DIR))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainable = {n: p.detach().cpu().contiguous() for n, p in t.unwrapped.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    torch.save(t.optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(t.scheduler.state_dict(), tmp / "scheduler.pt")
    save_file(rng_tensors(rng), str(tmp / "rng.safetensors"))
    t.method.save_state(tmp)
    write_json(tmp / "progress.json", {
        "epoch": t.epoch, "batches_done_in_epoch": t.batches_done_in_epoch, "global_step": t.global_step,
        "history": t.history, "train_seconds": t.train_seconds, "eval_seconds": t.eval_seconds,
        "step_seconds": t.step_seconds, "loss_sum": float(t.loss_sum), "penalty_sum": float(t.extra_sum),
        "has_extra_loss": t.has_extra_loss, "param_counts": t.param_counts,
        "loss_count": t.loss_count, "python_random": rng[0]["python"],
        "python_random_ranks": [s["python"] for s in rng],
    })
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(previous, ignore_errors=True)
        final.rename(previous)
    tmp.rename(final)


# ---- load ------------------------------------------------------------------------------------------------


class Unreadable(Exception):
    """A checkpoint file that cannot be read; the message names it."""


@dataclass
class CheckpointState:
    """Everything of a checkpoint but the method's state, read (and so checked) before anything is changed."""

    directory: Path
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, torch.Tensor]
    progress: dict[str, Any]


def read_checkpoint(directory: Path, device: torch.device) -> CheckpointState:
    """Read a checkpoint's own files (tensors onto `device`, the run's, not the one they were saved from);
    raise Unreadable naming the first file that is missing, truncated or malformed."""
    from safetensors.torch import load_file

    def read(name: str, how: Any) -> Any:
        path = directory / name
        try:
            return how(path)
        except Exception as e:  # safetensors, pickle, zip, json and OS errors all mean: not usable
            text = (str(e).strip().splitlines() or [""])[0][:160]
            raise Unreadable(f"{directory.name}/{name} cannot be read ({type(e).__name__}: {text})") from None

    where = device if device.type != "cpu" else "cpu"  # torch.load knows no "cpu:0" (Accelerate's gloo device)
    trainable = read("trainable.safetensors", lambda p: load_file(str(p)))
    optimizer = read("optimizer.pt", lambda p: torch.load(p, weights_only=True, map_location=where))
    scheduler = read("scheduler.pt", lambda p: torch.load(p, weights_only=True, map_location="cpu"))
    rng = read("rng.safetensors", lambda p: load_file(str(p)))
    progress = read("progress.json", read_json)
    missing = [k for k in PROGRESS_KEYS if not isinstance(progress, dict) or k not in progress]
    if missing:
        raise Unreadable(f"{directory.name}/progress.json lacks {', '.join(missing)}")
    return CheckpointState(directory, trainable, optimizer, scheduler, rng, progress)


def load_checkpoint(t: Any) -> None:
    """Restore a Trainer's state from its run directory's newest readable checkpoint (the method's state first)."""
    problems = []
    for name in (CHECKPOINT_DIR, PREVIOUS_DIR):
        directory = t.run_dir / name
        if not directory.is_dir():
            continue
        try:
            state = read_checkpoint(directory, t.accelerator.device)
        except Unreadable as e:
            problems.append(str(e))
            if t.is_main:
                log.warning("%s: trying the checkpoint before it", e)
            continue
        _apply(t, state)
        if problems:
            note = f"{problems[0]}: resumed from {name} (step {t.global_step}) instead"
            t.s.notes.append(note)
            _set_aside_unreadable(t)
        return
    detail = "; ".join(problems) or f"no checkpoint in {t.run_dir}"
    raise UserError(f"cannot resume {t.run_dir}: {detail}; pass --overwrite to start the run again")


def _set_aside_unreadable(t: Any) -> None:
    """After resuming from checkpoint.old: the unreadable newest one goes to checkpoint.unreadable (kept to look
    at), and checkpoint.old becomes the checkpoint, so the next save keeps it as the fallback."""
    t.accelerator.wait_for_everyone()  # every process has read checkpoint.old
    if t.is_main:
        unreadable = t.run_dir / UNREADABLE_DIR
        shutil.rmtree(unreadable, ignore_errors=True)
        (t.run_dir / CHECKPOINT_DIR).rename(unreadable)
        (t.run_dir / PREVIOUS_DIR).rename(t.run_dir / CHECKPOINT_DIR)
    t.accelerator.wait_for_everyone()


def _apply(t: Any, state: CheckpointState) -> None:
    # the method first: it may reshape the model (a resize after its warm-up) before the weights load
    if t.method.load_state(state.directory):
        t.refresh_parameters()
    params = dict(t.unwrapped.named_parameters())
    with torch.no_grad():
        for name, value in state.trainable.items():
            params[name].copy_(value)
    t.optimizer.load_state_dict(state.optimizer)
    t.scheduler.load_state_dict(state.scheduler)
    progress = state.progress
    rank = t.accelerator.process_index
    ranks = progress.get("python_random_ranks") or []
    restore_rng(state.rng, ranks[rank] if rank < len(ranks) else progress["python_random"], rank, t.accelerator.device)
    t.epoch = progress["epoch"]
    t.batches_done_in_epoch = progress["batches_done_in_epoch"]
    t.global_step = progress["global_step"]
    t.history = progress["history"]
    t.train_seconds = progress["train_seconds"]
    t.eval_seconds = progress["eval_seconds"]
    t.step_seconds = progress["step_seconds"]
    t.param_counts = progress.get("param_counts", t.param_counts)
    t.loss_sum.fill_(progress["loss_sum"])
    t.extra_sum.fill_(progress["penalty_sum"])
    t.has_extra_loss = progress.get("has_extra_loss", False)
    t.loss_count = progress["loss_count"]
    log.info("resumed at epoch %d, step %d", t.epoch + 1, t.global_step)


def _fsync_tree(directory: Path) -> None:
    """Flush a checkpoint's files to disk before it replaces the previous one (a power loss or SIGKILL
    right after the rename must not leave a checkpoint of empty files)."""
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _python_rng_state() -> list:
    version, state, gauss = random.getstate()
    return [version, list(state), gauss]


def _python_rng_from_json(value: list) -> tuple:
    return value[0], tuple(value[1]), value[2]
