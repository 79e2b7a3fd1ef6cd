"""Measuring right on any device: clocks read after the device has finished (not when the host has queued
the work), per-step times without a host sync per step, a peak memory that belongs to one run, and the
float32 matmul precision (TF32) a run asks for."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import torch


def device_sync(device: torch.device) -> None:
    """Wait until the device has done all queued work (CUDA runs asynchronously; the CPU does not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_tf32(device: torch.device, allow: bool) -> None:
    """TF32 tensor cores for float32 matmuls and convolutions on CUDA (process-wide: set for every run, so a
    run that turns it off after one that had it is not left with it). Nothing on other devices."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.allow_tf32 = allow


def tf32_enabled(device: torch.device) -> bool | None:
    """Whether float32 matmuls may use TF32 on this device (None where there is no such thing)."""
    return bool(torch.backends.cuda.matmul.allow_tf32) if device.type == "cuda" else None


def warm_up_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, params: list[torch.Tensor],
                 batch: dict[str, Any], device: torch.device) -> None:
    """One forward, backward and optimizer step before anything is timed (kernel loading, cuBLAS and allocator
    set-up, thread pools, the first all-reduce), then undone: parameters, optimizer state, gradients, RNG and
    train/eval mode are as they were, so the run's numbers are those of a run without it. Without an optimizer
    (before a method's timed build) only the forward and backward: nothing changes but the gradients, cleared."""
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    saved = [p.detach().clone() for p in params] if optimizer is not None else []
    was_training = model.training
    model.train()
    try:
        loss = model(**batch).loss
        if loss.requires_grad:  # a frozen (4-bit) backbone before its adapter: the forward alone
            loss.backward()
        if optimizer is not None:
            optimizer.step()
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)
            for p in params:
                p.grad = None
        if optimizer is not None:
            optimizer.state.clear()  # AdamW makes its state at its first step
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)
        model.train(was_training)
        device_sync(device)


class StepClock:
    """Per-step wall times. On CUDA each step end records an event, without waiting for it; `read()`
    synchronises once and returns the times since the last read (call it at logging points only). On the
    CPU the host clock is the device's."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: list[Any] = []

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        """Start timing the next step (again after a pause that is not a step: evaluation, a checkpoint)."""
        self._marks = [self._mark()]

    def lap(self) -> None:
        """One step ended."""
        self._marks.append(self._mark())

    def read(self) -> list[float]:
        """The seconds of the steps that ended since the last read; the clock goes on from the last one."""
        marks = self._marks
        if len(marks) < 2:
            return []
        if self.cuda:
            marks[-1].synchronize()
            times = [a.elapsed_time(b) / 1000.0 for a, b in zip(marks, marks[1:])]
        else:
            times = [b - a for a, b in zip(marks, marks[1:])]
        self._marks = marks[-1:]
        return times


@dataclass
class PeakMemory:
    """The peak memory of one run, from its start: CUDA's allocator peak (reset at the start) on a GPU; on
    the CPU the process's peak resident set, reset at the start through /proc/self/clear_refs where Linux
    allows it, else the process's whole life (`since` says which)."""

    device: torch.device
    since: str = "run start"

    @classmethod
    def start(cls, device: torch.device) -> "PeakMemory":
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            return cls(device)
        try:
            with open("/proc/self/clear_refs", "w") as f:  # 5: reset the peak RSS to the current RSS
                f.write("5")
        except OSError:
            return cls(device, since="process start")
        return cls(device)

    def read(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            return {"kind": "cuda_max_allocated", "bytes": torch.cuda.max_memory_allocated(self.device),
                    "since": self.since}
        return {"kind": "process_peak_rss", "bytes": _peak_rss(), "since": self.since}


def _peak_rss() -> int:
    """VmHWM (what clear_refs resets) where /proc has it; else getrusage's lifetime maximum."""
    try:
        with open("/proc/self/status") as f:
            found = re.search(r"^VmHWM:\s+(\d+)\s+kB", f.read(), re.M)
        if found:
            return int(found.group(1)) * 1024
    except OSError:
        pass
    import resource
    import sys

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
