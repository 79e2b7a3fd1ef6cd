"""The one training loop, for every method: same data order, optimiser, schedule, evaluation.

`Trainer.fit` runs epochs (Accelerate: devices, data parallel, mixed precision, accumulation, trackers) and
evaluates after each. The loop never asks which method it runs: it calls the method's hooks
(methods/base.py). Per optimizer step, after the backward pass of its last micro-batch:
    clip (gradients unscaled) -> method.before_optimizer_step -> optimizer.step() -> method.after_optimizer_step
         -> (parameters changed: method.refresh_optimizer) -> scheduler.step() -> zero_grad
Every --log-every steps the trackers get the loss, the method's extra loss term, the learning rate, the
gradient norm and the step time; at each evaluation its metrics; whatever the method logs (log_values).

Time: an untimed, undone warm-up step first; step times from device events read at logging points (no host
sync per step). fp16: a step the GradScaler skips is normal, not divergence; a collapsing loss scale is.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from fwlora.budget import Budget
from fwlora.checkpoint import load_checkpoint, save_checkpoint
from fwlora.config import TrainConfig
from fwlora.device import PeakMemory, StepClock, device_sync, set_tf32, warm_up_step
from fwlora.errors import NonFiniteError, TrainingInterrupted, UserError
from fwlora.methods.base import Method
from fwlora.records import CHECKPOINT_DIR
from fwlora.tracking import start_trackers

log = logging.getLogger(__name__)

# checkpoint every this many seconds of training when --checkpoint-every is not given
DEFAULT_CHECKPOINT_SECONDS = 600.0
MIN_LOSS_SCALE = 1.0  # fp16: a scale below it (from 2**16, halved per skipped step) means overflow even unscaled


@dataclass
class Setup:
    """Everything a run is built from, resolved from its TrainConfig (train.setup builds it)."""

    cfg: TrainConfig
    task: Any  # tasks.Task
    model: torch.nn.Module
    tokenizer: Any
    train_data: list[dict]
    eval_data: list[dict]
    budget: Budget
    head: str
    targets: list[str]
    steps_per_epoch: int
    total_steps: int
    data_source: str
    method: Method
    majority: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)
    data_fingerprint: str | None = None
    label_names: list[str] | None = None
    init_seconds: float | None = None  # the method's timed build (its data pass, its SVDs): training time


class EpochSampler(torch.utils.data.Sampler):
    """A fresh permutation per epoch from (seed, epoch) alone: the same order for every method, and
    a resumed run can rebuild any epoch's order without replaying the ones before."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self) -> int:
        return self.n


def length_order(examples: list[dict]) -> list[int]:
    """Evaluation order: longest first, so that each batch pads little (ties keep their order). Metrics are
    sums over examples, so the order cannot change them; predictions are put back in file order."""
    return sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each optimizer step."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
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


class Trainer:
    """Owns the Accelerate objects of one run and the loop over its epochs."""

    def __init__(self, s: Setup, run_dir: Path):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DataLoaderConfiguration
        from transformers import get_linear_schedule_with_warmup

        self.s, self.cfg, self.run_dir, self.method = s, s.cfg, run_dir, s.method
        # Under torchrun / accelerate launch without a GPU, Accelerate only sets up gloo data parallelism
        # when told the run is on the CPU.
        multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        # Accelerate keeps one precision per process; a bench or sweep trains many runs in one process, and
        # a run with another --mixed-precision would be refused. The process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        trackers = [] if self.cfg.report_to == "none" else [self.cfg.report_to]
        self.accelerator = Accelerator(
            cpu=multi_cpu,
            gradient_accumulation_steps=self.cfg.grad_accum,
            mixed_precision=self.cfg.mixed_precision,
            # batch_size is the global batch; on CUDA batches are copied from pinned memory without waiting
            dataloader_config=DataLoaderConfiguration(split_batches=True, non_blocking=torch.cuda.is_available()),
            log_with=trackers or None,
            project_dir=str(run_dir),
        )
        device = self.accelerator.device
        self.cuda = device.type == "cuda"
        gc.collect()  # the previous run of a bench: its tensors are freed before this run's peak starts
        self.memory = PeakMemory.start(device)
        set_tf32(device, self.cfg.tf32 == "on")
        world = self.accelerator.num_processes
        if self.cfg.batch_size % (self.cfg.grad_accum * world):
            raise UserError(f"batch-size {self.cfg.batch_size} must be divisible by grad-accum x processes = "
                            f"{self.cfg.grad_accum * world}")
        collator = s.task.collator(s.tokenizer)
        self.sampler = EpochSampler(len(s.train_data), self.cfg.seed)
        # Its own generator: iter(DataLoader) draws a seed from `generator`, by default the global torch RNG,
        # which would shift the dropout stream of a run resumed mid-epoch (one extra draw) away from the
        # uninterrupted run's. The sampler does not use it; this keeps the global RNG for dropout alone.
        train_loader = torch.utils.data.DataLoader(s.train_data, batch_size=self.cfg.batch_size // self.cfg.grad_accum,
                                                   sampler=self.sampler, collate_fn=collator,
                                                   generator=torch.Generator().manual_seed(self.cfg.seed),
                                                   pin_memory=self.cuda)
        eval_loader = torch.utils.data.DataLoader(s.eval_data, batch_size=self.cfg.eval_batch_size,
                                                  sampler=length_order(s.eval_data),
                                                  collate_fn=s.task.eval_collator(s.tokenizer), pin_memory=self.cuda)
        params = [p for p in s.model.parameters() if p.requires_grad]
        # fused: one kernel for all parameters on CUDA (the adapters are many small tensors)
        self.fused_adamw = self.cuda
        adamw = {"lr": self.cfg.lr, "weight_decay": self.cfg.weight_decay, "fused": True if self.fused_adamw else None}
        optimizer = self.method.make_optimizer(s.model, **adamw) or torch.optim.AdamW(params, **adamw)  # or the method's
        scheduler = get_linear_schedule_with_warmup(optimizer, round(self.cfg.warmup_ratio * s.total_steps), s.total_steps)
        self.model, self.optimizer, self.train_loader, self.eval_loader, self.scheduler = self.accelerator.prepare(
            s.model, optimizer, train_loader, eval_loader, scheduler)
        self.params = params
        self.unwrapped = self.accelerator.unwrap_model(self.model)
        self._warm_up(collator)  # before the method's hooks are attached: they must not see it
        self.method.attach(self.unwrapped)
        self.tracking = bool(trackers) and start_trackers(self.accelerator, self.cfg, run_dir)
        # progress, restored from a checkpoint on resume
        self.epoch = 0
        self.batches_done_in_epoch = 0  # micro-batches of the current epoch already trained
        self.global_step = 0
        self.history: list[dict] = []
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        self.step_seconds: list[float] = []
        self.param_counts: list[list[int]] = [[0, self._trainable_count()]]  # [first step, trainable params] segments
        self.loss_sum = torch.zeros((), device=self.accelerator.device)
        self.extra_sum = torch.zeros((), device=self.accelerator.device)
        self.has_extra_loss = False
        self.loss_count = 0
        self._window = {"loss": torch.zeros((), device=self.accelerator.device),
                        "extra": torch.zeros((), device=self.accelerator.device), "count": 0, "seconds": 0.0,
                        "steps": 0}
        self._grad_norm: torch.Tensor | None = None
        self._first_bad_step = torch.full((), -1, dtype=torch.long, device=self.accelerator.device)
        self._skipped_in_a_row = 0  # fp16: optimizer steps the GradScaler skipped, in a row
        self.clock = StepClock(device)
        self._last_checkpoint = time.perf_counter()

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _trainable_count(self) -> int:
        return sum(p.numel() for p in self.params)

    def _warm_up(self, collator: Callable) -> None:
        """An untimed, undone step (device.warm_up_step) on the first training examples, at this run's micro-batch;
        with the torch optimizer under Accelerate's: no GradScaler, whose scale must not move."""
        from accelerate.utils import send_to_device

        micro = max(1, self.cfg.batch_size // self.cfg.grad_accum // self.accelerator.num_processes)
        batch = send_to_device(collator(self.s.train_data[:micro]), self.accelerator.device)
        warm_up_step(self.model, self.optimizer.optimizer, self.params, batch, self.accelerator.device)
        self.optimizer.zero_grad(set_to_none=True)

    # -- evaluation --

    def evaluate(self) -> dict[str, float]:
        start = time.perf_counter()
        self.model.eval()
        metrics = self.s.task.evaluate(self.model, self.eval_loader, self.accelerator, self.s.tokenizer,
                                       max_new_tokens=self.cfg.max_new_tokens)
        self.model.train()
        self.eval_seconds += time.perf_counter() - start
        return metrics

    # -- one optimizer step's closing --

    def _optimizer_step(self) -> None:
        scaler = self.accelerator.scaler
        if self.cfg.max_grad_norm > 0:
            grad_norm = self.accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm)  # unscales first
        else:
            self.accelerator.unscale_gradients()  # fp16: the norm and the methods see the true gradient
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None]))
        self._grad_norm = torch.as_tensor(grad_norm, device=self._first_bad_step.device)
        grad_scale, overflow = None, False
        if scaler is None:
            self._mark_bad(~torch.isfinite(self._grad_norm))
        else:  # fp16: a non-finite gradient is an overflow the scaler skips, not divergence (a host sync, as the
            # scaler's own step makes); the methods get the backward's scale and leave such a step out
            overflow = not bool(torch.isfinite(self._grad_norm))
            grad_scale = scaler.get_scale()
        self.method.before_optimizer_step(self.global_step, grad_scale)
        self.optimizer.step()
        if overflow:
            self._skipped_step(scaler.get_scale(), grad_scale)
        else:
            self._skipped_in_a_row = 0
        if self.method.after_optimizer_step(self.global_step):
            self.refresh_parameters()
        if not overflow:  # the schedule moves with the updates (Accelerate's rule, also for a fused AdamW)
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1

    def _skipped_step(self, scale: float, scale_before: float) -> None:
        """The GradScaler skipped this step; a scale fallen below MIN_LOSS_SCALE is divergence."""
        if scale >= scale_before:  # it did step: the norm overflowed, not an entry (a gradient beyond 1e19)
            self._mark_bad(torch.ones((), dtype=torch.bool, device=self._first_bad_step.device))
            return
        self._skipped_in_a_row += 1
        if scale < MIN_LOSS_SCALE:
            raise NonFiniteError(
                f"fp16: the gradient overflowed at {self._skipped_in_a_row} optimizer steps in a row (up to step "
                f"{self.global_step + 1}, epoch {self.epoch + 1}) and the loss scale fell to {scale:g}: training "
                "diverged; try a lower --lr or --mixed-precision bf16. The last good checkpoint is kept.")

    def refresh_parameters(self) -> None:
        """The method changed the trainable parameters (a resize): the optimizer takes the new set, keeping
        the state of every parameter still present (the method says how); the schedule goes on."""
        self.method.refresh_optimizer(self.optimizer)
        self.params = [p for p in self.unwrapped.parameters() if p.requires_grad]
        if self.accelerator.num_processes > 1:  # DDP registered the old parameters: wrap the model anew
            self._rewrap()
        count = self._trainable_count()
        if count != self.param_counts[-1][1]:
            self.param_counts.append([self.global_step + 1, count])

    def _rewrap(self) -> None:
        """Release the old DDP wrapper, then wrap the resized model in a new one. The old reducer holds every
        old parameter, a gradient bucket the size of all of them, and autograd hooks on the ones that stay
        (torch's DDP._remove_autograd_hooks is for re-wrapping a model). Accelerate's prepare_model lists the
        model in accelerator._models again and wraps its forward in autocast again: it is unlisted and its
        forward restored first, so that the accelerator holds one model, prepared once."""
        old, acc = self.model, self.accelerator
        if isinstance(old, torch.nn.parallel.DistributedDataParallel):
            old._remove_autograd_hooks()
        acc._models[:] = [m for m in acc._models if m is not old and m is not self.unwrapped]
        self.model = None
        del old
        self.unwrapped = acc.unwrap_model(self.unwrapped, keep_fp32_wrapper=False)
        self.model = acc.prepare_model(self.unwrapped, device_placement=False)

    def _mark_bad(self, bad: torch.Tensor) -> None:
        """Remember the first step whose loss or gradient was not finite, without a host sync."""
        step = torch.full_like(self._first_bad_step, self.global_step + 1)
        self._first_bad_step = torch.where(bad & (self._first_bad_step < 0), step, self._first_bad_step)

    def _check_finite(self) -> None:
        bad_step = int(self._first_bad_step)
        if bad_step >= 0:
            raise NonFiniteError(f"the loss or gradient became NaN/inf at optimizer step {bad_step} "
                                 f"(epoch {self.epoch + 1}); try a lower --lr. The last good checkpoint is kept.")

    def _checkpoint_due(self) -> bool:
        every = self.cfg.checkpoint_every
        if every is None:
            return self.s.total_steps >= 200 and time.perf_counter() - self._last_checkpoint >= DEFAULT_CHECKPOINT_SECONDS
        return every > 0 and self.global_step % every == 0

    # -- logging to the trackers --

    def _log_window(self) -> None:
        """The mean loss (and extra term) since the last log, learning rate, gradient norm and step time."""
        w = self._window
        if not w["count"]:
            return
        values = {"train/loss": float(w["loss"]) / w["count"], "train/lr": self.scheduler.get_last_lr()[0],
                  "train/step_seconds": w["seconds"] / max(1, w["steps"])}
        if self.has_extra_loss:
            values["train/extra_loss"] = float(w["extra"]) / w["count"]
        if self._grad_norm is not None:
            values["train/grad_norm"] = float(self._grad_norm)
        self.accelerator.log(values, step=self.global_step)
        w["loss"].zero_()
        w["extra"].zero_()
        w.update(count=0, seconds=0.0, steps=0)

    # -- the loop --

    def fit(self, stop: StopSignals, on_epoch_end: Callable[[dict], None] | None = None,
            max_steps: int | None = None) -> None:
        """Train the remaining epochs (evaluating after each). max_steps: stop after that many optimizer steps
        without evaluating (a probe of the first steps; the schedule still spans the whole run)."""
        from tqdm.auto import tqdm

        cfg, s = self.cfg, self.s
        bar = tqdm(total=s.total_steps, initial=self.global_step, disable=not self.is_main, dynamic_ncols=True,
                   desc=f"{cfg.task} {cfg.method} r{s.budget.rank} seed {cfg.seed}", unit="step", leave=False)
        self.model.train()
        while self.epoch < cfg.epochs:
            # Accelerate's loader sets its sampler's epoch to its own count of iterations on every
            # iter(): set that count too, or a resumed run (a fresh loader, count 0) replays epoch 0's order.
            self.sampler.set_epoch(self.epoch)
            if hasattr(self.train_loader, "set_epoch"):
                self.train_loader.set_epoch(self.epoch)
            loader = self.train_loader
            if self.batches_done_in_epoch:
                loader = self.accelerator.skip_first_batches(self.train_loader, self.batches_done_in_epoch)
            device_sync(self.accelerator.device)
            epoch_start = time.perf_counter()
            self.clock.start()
            for batch in loader:
                with self.accelerator.accumulate(self.model):
                    loss = self.model(**batch).loss  # AdaLoRA's orthogonal regulariser is inside
                    extra = self.method.extra_loss()
                    total = loss + extra if extra is not None else loss
                    self.accelerator.backward(total)
                    self.batches_done_in_epoch += 1
                    self.loss_sum += loss.detach().float()
                    self._window["loss"] += loss.detach().float()
                    if extra is not None:
                        self.extra_sum += extra.detach().float()
                        self._window["extra"] += extra.detach().float()
                        self.has_extra_loss = True
                    self.loss_count += 1
                    self._window["count"] += 1
                    self._mark_bad(~torch.isfinite(total.detach()))
                    if self.accelerator.sync_gradients:
                        self._optimizer_step()
                        self.clock.lap()
                        bar.update(1)
                        extra_values = self.method.log_values(self.global_step - 1)
                        if self.tracking and extra_values:
                            self.accelerator.log(extra_values, step=self.global_step)
                        if self.global_step % cfg.log_every == 0:
                            self._read_clock()
                            self._check_finite()
                            bar.set_postfix(self._running_losses(), refresh=False)
                            if self.tracking:
                                self._log_window()
                        if max_steps is not None and self.global_step >= max_steps:
                            self._read_clock()
                            self.train_seconds += time.perf_counter() - epoch_start
                            bar.close()
                            return
                        if stop.signum is not None or self._checkpoint_due():
                            self._read_clock()
                            self.train_seconds += time.perf_counter() - epoch_start
                            self._check_finite()
                            save_checkpoint(self)
                            if stop.signum is not None:
                                raise TrainingInterrupted(
                                    f"stopped by {signal.Signals(stop.signum).name} at step {self.global_step}; "
                                    f"checkpoint saved in {self.run_dir / CHECKPOINT_DIR}; continue with --resume",
                                    stop.signum)
                            epoch_start = time.perf_counter()  # the checkpoint is not training time
                            self.clock.start()
            self._read_clock()
            self.train_seconds += time.perf_counter() - epoch_start
            self._check_finite()
            losses = self._running_losses()
            metrics = self.evaluate()
            self.history.append({"epoch": self.epoch + 1, "step": self.global_step, **losses, **metrics,
                                 "train_seconds": self.train_seconds})
            if self.tracking:
                self.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=self.global_step)
            if self.is_main:
                bar.write(f"epoch {self.epoch + 1}/{cfg.epochs}: " + ", ".join(
                    f"{k} {v:.4f}" for k, v in {**losses, **metrics}.items()))
            self.epoch += 1
            self.batches_done_in_epoch = 0
            self.loss_sum.zero_()
            self.extra_sum.zero_()
            self.loss_count = 0
            save_checkpoint(self)
            if on_epoch_end is not None:
                on_epoch_end(self.history[-1])  # may raise (a sweep's pruner): the checkpoint is saved
        bar.close()

    def _running_losses(self) -> dict[str, float]:
        n = max(self.loss_count, 1)
        out = {"loss": float(self.loss_sum) / n}
        if self.has_extra_loss:
            out["penalty"] = float(self.extra_sum) / n
        return out

    def _read_clock(self) -> None:
        """Synchronise and take the step times since the last read (a logging point, a checkpoint, an epoch's end)."""
        device_sync(self.accelerator.device)
        times = self.clock.read()
        self.step_seconds.extend(times)
        self._window["seconds"] += sum(times)
        self._window["steps"] += len(times)

    def save_checkpoint(self) -> None:
        save_checkpoint(self)

    def load_checkpoint(self) -> None:
        load_checkpoint(self)

    def end(self) -> None:
        """Close the trackers (their files are complete afterwards). Not Accelerator.end_training(): that also
        destroys the process group, which a run under torchrun still needs, as does the next run of a bench."""
        if self.tracking:
            self.accelerator.wait_for_everyone()
            if self.is_main:
                for tracker in self.accelerator.trackers:
                    tracker.finish()
            self.accelerator.trackers = []
            self.tracking = False
