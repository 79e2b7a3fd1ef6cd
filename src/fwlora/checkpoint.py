"""A run's checkpoint: adapter and head weights, optimizer, schedule, RNG, the method's state and the data
position, so that a resumed run reaches the same result as an uninterrupted one."""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from fwlora.files import read_json, write_json
from fwlora.records import CHECKPOINT_DIR

log = logging.getLogger(__name__)


def save_checkpoint(t: Any) -> None:
    """Save a Trainer's state: written to checkpoint.tmp, then swapped in, so the previous checkpoint stays
    until the new one is whole."""
    from safetensors.torch import save_file

    t.accelerator.wait_for_everyone()
    t._last_checkpoint = time.perf_counter()
    if not t.is_main:
        return
    final = t.run_dir / CHECKPOINT_DIR
    tmp = t.run_dir / (CHECKPOINT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainable = {n: p.detach().cpu().contiguous() for n, p in t.unwrapped.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    torch.save(t.optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(t.scheduler.state_dict(), tmp / "scheduler.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    t.method.save_state(tmp)
    write_json(tmp / "progress.json", {
        "epoch": t.epoch, "batches_done_in_epoch": t.batches_done_in_epoch, "global_step": t.global_step,
        "history": t.history, "train_seconds": t.train_seconds, "eval_seconds": t.eval_seconds,
        "step_seconds": t.step_seconds, "loss_sum": float(t.loss_sum), "penalty_sum": float(t.extra_sum),
        "has_extra_loss": t.has_extra_loss, "param_counts": t.param_counts,
        "loss_count": t.loss_count, "python_random": _python_rng_state(),
    })
    _fsync_tree(tmp)
    old = t.run_dir / (CHECKPOINT_DIR + ".old")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)

def load_checkpoint(t: Any) -> None:
    from safetensors.torch import load_file

    """Restore a Trainer's state from its run directory's checkpoint (the method's state first)."""
    directory = t.run_dir / CHECKPOINT_DIR
    # the method first: it may reshape the model (a resize after its warm-up) before the weights load
    if t.method.load_state(directory):
        t.refresh_parameters()
    trainable = load_file(str(directory / "trainable.safetensors"))
    params = dict(t.unwrapped.named_parameters())
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(value)
    t.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
    t.scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
    rng = load_file(str(directory / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
    progress = read_json(directory / "progress.json")
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
    random.setstate(_python_rng_from_json(progress["python_random"]))
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
