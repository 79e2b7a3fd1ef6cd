"""Where a training run stands, as one object that saves and restores itself (progress.json in a checkpoint).

The loss sums stay tensors on the training device: adding a micro-batch's loss to them needs no host sync;
they are read at logging points, at a checkpoint and at an epoch's end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fwlora.records import UNKNOWN_MACHINE


@dataclass
class LossSums:
    """Sums over micro-batches of the task's loss and of the method's extra loss term."""

    loss: torch.Tensor
    extra: torch.Tensor
    count: int = 0

    @classmethod
    def zeros(cls, device: torch.device) -> LossSums:
        return cls(torch.zeros((), device=device), torch.zeros((), device=device))

    def add(self, loss: torch.Tensor, extra: torch.Tensor | None) -> None:
        self.loss += loss.detach().float()
        if extra is not None:
            self.extra += extra.detach().float()
        self.count += 1

    def means(self, with_extra: bool) -> dict[str, float]:
        """{"loss": mean, "penalty": mean of the extra term (with_extra: the method has one)}; a host sync."""
        n = max(self.count, 1)
        out = {"loss": float(self.loss) / n}
        if with_extra:
            out["penalty"] = float(self.extra) / n
        return out

    def reset(self) -> None:
        self.loss.zero_()
        self.extra.zero_()
        self.count = 0


@dataclass
class LogWindow:
    """What the trackers get at the next logging point: sums since the last one. Not saved: a resumed run
    starts a fresh window (it only feeds the trackers, never the record)."""

    losses: LossSums
    seconds: float = 0.0
    steps: int = 0

    def add_times(self, step_seconds: list[float]) -> None:
        self.seconds += sum(step_seconds)
        self.steps += len(step_seconds)

    def take_values(self, lr: float, with_extra: bool) -> dict[str, float]:
        """The trackers' values for the window (a host sync); the next window starts empty."""
        means = self.losses.means(with_extra)
        values = {"train/loss": means["loss"], "train/lr": lr,
                  "train/step_seconds": self.seconds / max(1, self.steps)}
        if "penalty" in means:
            values["train/extra_loss"] = means["penalty"]
        self.losses.reset()
        self.seconds, self.steps = 0.0, 0
        return values


@dataclass
class TrainingProgress:
    """A run's position and what it has measured so far; to_dict/from_dict are progress.json."""

    epoch_losses: LossSums  # this epoch's micro-batches so far
    since_log: LogWindow
    epoch: int = 0  # epochs finished
    batches_done_in_epoch: int = 0  # micro-batches of the current epoch already trained (skipped on resume)
    global_step: int = 0  # optimizer steps taken
    history: list[dict] = field(default_factory=list)  # one entry per finished epoch: losses, metrics, times
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)  # every timed optimizer step
    # [first optimizer step, trainable parameters] per stretch of equal count: a resizing method changes it
    param_counts: list[list[int]] = field(default_factory=list)
    has_extra_loss: bool = False  # the method has added an extra loss term (the records then show "penalty")
    resumes: int = 0  # times the run was stopped and resumed: its whole-run time is not one stretch's
    boot_ids: list[str] = field(default_factory=list)  # the machine boot of each stretch it trained in

    # progress.json keys a checkpoint must hold; param_counts and has_extra_loss came later and are optional
    REQUIRED_KEYS = ("epoch", "batches_done_in_epoch", "global_step", "history", "train_seconds",
                     "eval_seconds", "step_seconds", "loss_sum", "penalty_sum", "loss_count")

    @classmethod
    def start(cls, device: torch.device, trainable_params: int) -> TrainingProgress:
        return cls(LossSums.zeros(device), LogWindow(LossSums.zeros(device)),
                   param_counts=[[0, trainable_params]])

    def add_loss(self, loss: torch.Tensor, extra: torch.Tensor | None) -> None:
        """One micro-batch trained."""
        self.batches_done_in_epoch += 1
        self.epoch_losses.add(loss, extra)
        self.since_log.losses.add(loss, extra)
        self.has_extra_loss = self.has_extra_loss or extra is not None

    def epoch_means(self) -> dict[str, float]:
        return self.epoch_losses.means(self.has_extra_loss)

    def note_param_count(self, count: int) -> None:
        """The trainable parameters after this optimizer step (a resize): a new stretch if the count
        changed."""
        if count != self.param_counts[-1][1]:
            self.param_counts.append([self.global_step + 1, count])

    def note_machine(self, boot_id: str | None) -> None:
        """The machine this stretch trains on (a resumed run's seconds may come from several); one that cannot
        be told is noted as unknown, so that a run resumed elsewhere never passes for one machine's."""
        boot_id = boot_id or UNKNOWN_MACHINE
        if boot_id not in self.boot_ids:
            self.boot_ids.append(boot_id)

    def finish_epoch(self, entry: dict) -> None:
        self.history.append(entry)
        self.epoch += 1
        self.batches_done_in_epoch = 0
        self.epoch_losses.reset()

    def to_dict(self) -> dict[str, Any]:
        """progress.json, under the key names checkpoints have always had (old checkpoints still load)."""
        return {"epoch": self.epoch, "batches_done_in_epoch": self.batches_done_in_epoch,
                "global_step": self.global_step, "history": self.history, "train_seconds": self.train_seconds,
                "eval_seconds": self.eval_seconds, "step_seconds": self.step_seconds,
                "loss_sum": float(self.epoch_losses.loss), "penalty_sum": float(self.epoch_losses.extra),
                "has_extra_loss": self.has_extra_loss, "param_counts": self.param_counts,
                "loss_count": self.epoch_losses.count, "resumes": self.resumes, "boot_ids": self.boot_ids}

    def load_dict(self, values: dict[str, Any]) -> None:
        """Take the saved progress (its REQUIRED_KEYS checked first); the loss sums are refilled in place, on
        this run's device; the window since the last log starts empty."""
        self.epoch, self.global_step = values["epoch"], values["global_step"]
        self.batches_done_in_epoch = values["batches_done_in_epoch"]
        self.history, self.step_seconds = values["history"], values["step_seconds"]
        self.train_seconds, self.eval_seconds = values["train_seconds"], values["eval_seconds"]
        self.param_counts = values.get("param_counts", self.param_counts)
        self.has_extra_loss = values.get("has_extra_loss", False)
        self.resumes = values.get("resumes", 0) + 1  # loading a checkpoint is resuming from it
        self.boot_ids = list(values.get("boot_ids", [UNKNOWN_MACHINE]))  # a checkpoint that did not say where
        self.epoch_losses.loss.fill_(values["loss_sum"])
        self.epoch_losses.extra.fill_(values["penalty_sum"])
        self.epoch_losses.count = values["loss_count"]
