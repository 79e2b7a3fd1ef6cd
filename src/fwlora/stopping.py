"""Why training stops before its last epoch: a signal (SIGINT/SIGTERM, then a checkpoint and --resume), or
divergence (a loss or gradient that is not finite; under fp16, a loss scale that keeps collapsing)."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import torch

from fwlora.errors import NonFiniteError

log = logging.getLogger(__name__)

# fp16: a loss scale below it (from 2**16, halved per skipped step) means an overflow even unscaled
MIN_LOSS_SCALE = 1.0


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each optimizer step."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python allows handlers there alone
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: finishing this step, saving a checkpoint, then stopping",
                    signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class DivergenceWatch:
    """The first optimizer step whose loss or gradient was not finite, kept on the device so that marking it
    needs no host sync per step; `check` reads it at logging points and before every checkpoint, so that a
    checkpoint never holds a diverged run."""

    def __init__(self, device: torch.device):
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.skipped_in_a_row = 0  # fp16: optimizer steps the GradScaler skipped, in a row

    def mark(self, bad: torch.Tensor, step: int) -> None:
        """Remember `step` (1-based) if `bad` holds and no earlier step was bad."""
        first = self.first_bad_step
        self.first_bad_step = torch.where(bad & (first < 0), torch.full_like(first, step), first)

    def check(self, epoch: int) -> None:
        """Raise NonFiniteError if a step was bad (epoch: 0-based, for the message)."""
        bad_step = int(self.first_bad_step)
        if bad_step >= 0:
            raise NonFiniteError(f"the loss or gradient became NaN/inf at optimizer step {bad_step} "
                                 f"(epoch {epoch + 1}); try a lower --lr. The last good checkpoint is kept.")

    def skipped(self, scale: float, scale_before: float, step: int, epoch: int) -> None:
        """The GradScaler skipped optimizer step `step` (1-based); a scale fallen below MIN_LOSS_SCALE is
        divergence."""
        if scale >= scale_before:  # it did step: the norm overflowed, not an entry (a gradient beyond 1e19)
            self.mark(torch.ones((), dtype=torch.bool, device=self.first_bad_step.device), step)
            return
        self.skipped_in_a_row += 1
        if scale < MIN_LOSS_SCALE:
            raise NonFiniteError(
                f"fp16: the gradient overflowed at {self.skipped_in_a_row} optimizer steps in a row "
                f"(up to step {step}, epoch {epoch + 1}) and the loss scale fell to {scale:g}: training "
                "diverged; try a lower --lr or --mixed-precision bf16. The last good checkpoint is kept.")
