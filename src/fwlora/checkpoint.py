"""A run's checkpoint: adapter and head weights, optimizer, schedule, every process's RNG, the method's state
and the run's TrainingProgress (progress.json: the data position, history, times, loss sums), so that a
resumed run reaches the same result as an uninterrupted one.

Two are kept: `checkpoint` (the newest) and `checkpoint.old` (the one before). A new one is written to
checkpoint.tmp, flushed, then swapped in; the older is dropped only then. On resume a checkpoint whose files
cannot be read is named in one line and the previous one is used (it is moved aside to checkpoint.unreadable);
with neither readable the run stops with a UserError (--overwrite starts it again)."""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from fwlora.errors import UserError
from fwlora.files import read_json, write_json
from fwlora.progress import TrainingProgress
from fwlora.records import CHECKPOINT_DIR



class Trainer(Protocol):
    """What a checkpoint reads and restores of the training loop (fwlora.trainer.Trainer has it; the loop
    imports this module, so this one names the loop's shape instead of importing it)."""

    accelerator: Any
    run_dir: Path
    unwrapped: torch.nn.Module
    optimizer: Any
    scheduler: Any
    method: Any
    progress: TrainingProgress
    setup: Any

    @property
    def is_main(self) -> bool: ...

    def refresh_parameters(self) -> None: ...

log = logging.getLogger(__name__)

PREVIOUS_DIR, TMP_DIR, UNREADABLE_DIR = (CHECKPOINT_DIR + end for end in (".old", ".tmp", ".unreadable"))
PROGRESS_KEYS = (*TrainingProgress.REQUIRED_KEYS, "python_random")  # Python's RNG is saved with the progress


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


def restore_rng(tensors: dict[str, torch.Tensor], python: list | None, rank: int,
                device: torch.device) -> None:
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


def save_checkpoint(trainer: Trainer) -> None:
    """Save a Trainer's state (every process takes part; the main process writes): written to checkpoint.tmp,
    then swapped in; the checkpoint it replaces becomes checkpoint.old, and the one before that is dropped."""
    from safetensors.torch import save_file

    trainer.accelerator.wait_for_everyone()
    rng = gather_rng_states(trainer.accelerator.device)
    if not trainer.is_main:
        return
    final, previous, tmp = (trainer.run_dir / d for d in (CHECKPOINT_DIR, PREVIOUS_DIR, TMP_DIR))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainable = {n: p.detach().cpu().contiguous() for n, p in trainer.unwrapped.named_parameters()
                 if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(trainer.scheduler.state_dict(), tmp / "scheduler.pt")
    save_file(rng_tensors(rng), str(tmp / "rng.safetensors"))
    trainer.method.save_state(tmp)
    # Python's RNG is not a tensor: it goes with the progress (rank 0's alone under its old key)
    write_json(tmp / "progress.json", {**trainer.progress.to_dict(), "python_random": rng[0]["python"],
                                       "python_random_ranks": [state["python"] for state in rng]})
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

    where = device if device.type != "cpu" else "cpu"  # torch.load knows no "cpu:0" (Accelerate's gloo)
    trainable = read("trainable.safetensors", lambda p: load_file(str(p)))
    optimizer = read("optimizer.pt", lambda p: torch.load(p, weights_only=True, map_location=where))
    scheduler = read("scheduler.pt", lambda p: torch.load(p, weights_only=True, map_location="cpu"))
    rng = read("rng.safetensors", lambda p: load_file(str(p)))
    progress = read("progress.json", read_json)
    missing = [k for k in PROGRESS_KEYS if not isinstance(progress, dict) or k not in progress]
    if missing:
        raise Unreadable(f"{directory.name}/progress.json lacks {', '.join(missing)}")
    return CheckpointState(directory, trainable, optimizer, scheduler, rng, progress)


def load_checkpoint(trainer: Trainer) -> None:
    """Restore a Trainer's state from its run directory's newest readable checkpoint (the method's state
    first)."""
    problems = []
    for name in (CHECKPOINT_DIR, PREVIOUS_DIR):
        directory = trainer.run_dir / name
        if not directory.is_dir():
            continue
        try:
            state = read_checkpoint(directory, trainer.accelerator.device)
        except Unreadable as e:
            problems.append(str(e))
            if trainer.is_main:
                log.warning("%s: trying the checkpoint before it", e)
            continue
        _apply(trainer, state)
        if problems:
            note = f"{problems[0]}: resumed from {name} (step {trainer.progress.global_step}) instead"
            trainer.setup.notes.append(note)
            _set_aside_unreadable(trainer)
        return
    detail = "; ".join(problems) or f"no checkpoint in {trainer.run_dir}"
    raise UserError(f"cannot resume {trainer.run_dir}: {detail}; pass --overwrite to start the run again")


def _set_aside_unreadable(trainer: Trainer) -> None:
    """After resuming from checkpoint.old: the unreadable newest one goes to checkpoint.unreadable (kept to
    look at), and checkpoint.old becomes the checkpoint, so the next save keeps it as the fallback."""
    run_dir = trainer.run_dir
    trainer.accelerator.wait_for_everyone()  # every process has read checkpoint.old
    if trainer.is_main:
        unreadable = run_dir / UNREADABLE_DIR
        shutil.rmtree(unreadable, ignore_errors=True)
        (run_dir / CHECKPOINT_DIR).rename(unreadable)
        (run_dir / PREVIOUS_DIR).rename(run_dir / CHECKPOINT_DIR)
    trainer.accelerator.wait_for_everyone()


def _apply(trainer: Trainer, state: CheckpointState) -> None:
    # the method first: it may reshape the model (a resize after its warm-up) before the weights load
    if trainer.method.load_state(state.directory):
        trainer.refresh_parameters()
    params = dict(trainer.unwrapped.named_parameters())
    with torch.no_grad():
        for name, value in state.trainable.items():
            params[name].copy_(value)
    trainer.optimizer.load_state_dict(state.optimizer)
    trainer.scheduler.load_state_dict(state.scheduler)
    saved, rank = state.progress, trainer.accelerator.process_index
    ranks = saved.get("python_random_ranks") or []  # absent in checkpoints that kept rank 0's alone
    python_rng = ranks[rank] if rank < len(ranks) else saved["python_random"]
    restore_rng(state.rng, python_rng, rank, trainer.accelerator.device)
    trainer.progress.load_dict(saved)
    log.info("resumed at epoch %d, step %d", trainer.progress.epoch + 1, trainer.progress.global_step)


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
