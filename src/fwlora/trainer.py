"""The one training loop, for every method: same data order, optimiser, schedule, evaluation.

`Trainer.fit` runs epochs (Accelerate: devices, data parallel, mixed precision, accumulation, trackers) and
evaluates after each; where the run stands is one TrainingProgress (progress.py), which a checkpoint saves.
The loop never asks which method it runs: it calls the method's hooks (methods/base.py). Per optimizer step,
after the backward pass of its last micro-batch:
    clip (gradients unscaled) -> method.before_optimizer_step -> optimizer.step()
         -> method.after_optimizer_step -> (parameters changed: method.refresh_optimizer)
         -> scheduler.step() -> zero_grad
Every --log-every steps the trackers get the loss, the method's extra loss term, the learning rate, the
gradient norm and the step time; at each evaluation its metrics; whatever the method logs (log_values).

Time: an untimed, undone warm-up step first; step times from device events read at logging points (no host
sync per step). fp16: a step the GradScaler skips is normal, not divergence; a collapsing loss scale is.
"""

from __future__ import annotations

import gc
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
from fwlora.data_order import EpochSampler, length_order
from fwlora.device import PeakMemory, StepClock, device_sync, set_tf32, warm_up_step
from fwlora.errors import TrainingInterrupted, UserError
from fwlora.methods.base import Method
from fwlora.progress import TrainingProgress
from fwlora.records import CHECKPOINT_DIR
from fwlora.stopping import DivergenceWatch, StopSignals
from fwlora.tracking import start_trackers

__all__ = ["EpochSampler", "Setup", "StopSignals", "Trainer", "length_order"]  # the loop's parts

# checkpoint every this many seconds of training when --checkpoint-every is not given
DEFAULT_CHECKPOINT_SECONDS = 600.0


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


class Trainer:
    """Owns the Accelerate objects of one run and the loop over its epochs; `progress` says where it is."""

    def __init__(self, setup: Setup, run_dir: Path):
        self.setup, self.cfg, self.run_dir, self.method = setup, setup.cfg, run_dir, setup.method
        self.accelerator = self._make_accelerator(run_dir)
        device = self.accelerator.device
        self.cuda = device.type == "cuda"
        gc.collect()  # the previous run of a bench: its tensors are freed before this run's peak starts
        self.memory = PeakMemory.start(device)
        set_tf32(device, self.cfg.tf32 == "on")
        world = self.accelerator.num_processes
        if self.cfg.batch_size % (self.cfg.grad_accum * world):
            raise UserError(f"batch-size {self.cfg.batch_size} must be divisible by grad-accum x processes = "
                            f"{self.cfg.grad_accum * world}")
        self.params = [p for p in setup.model.parameters() if p.requires_grad]
        self.fused_adamw = self.cuda  # one kernel for all parameters (the adapters are many small tensors)
        collator = setup.task.collator(setup.tokenizer)
        self._prepare(collator)
        self.unwrapped = self.accelerator.unwrap_model(self.model)
        self._warm_up(collator)  # before the method's hooks are attached: they must not see it
        self.method.attach(self.unwrapped)
        self.tracking = self.cfg.report_to != "none" and start_trackers(self.accelerator, self.cfg, run_dir)
        self.progress = TrainingProgress.start(device, self._trainable_count())  # a resume loads it
        # not saved: a checkpoint is only written after the watch's check passed
        self.divergence = DivergenceWatch(device)
        self._grad_norm: torch.Tensor | None = None  # the last step's, for the trackers
        self.clock = StepClock(device)
        self._stretch_start = time.perf_counter()  # the start of the training time not yet counted
        self._last_checkpoint = time.perf_counter()

    def _make_accelerator(self, run_dir: Path) -> Any:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DataLoaderConfiguration

        # Under torchrun / accelerate launch without a GPU, Accelerate only sets up gloo data parallelism
        # when told the run is on the CPU.
        multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        # Accelerate keeps one precision per process; a bench or sweep trains many runs in one process, and
        # a run with another --mixed-precision would be refused. The process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        return Accelerator(
            cpu=multi_cpu, gradient_accumulation_steps=self.cfg.grad_accum,
            mixed_precision=self.cfg.mixed_precision,
            # batch_size is the global batch; on CUDA batches are copied from pinned memory without waiting
            dataloader_config=DataLoaderConfiguration(split_batches=True,
                                                      non_blocking=torch.cuda.is_available()),
            log_with=None if self.cfg.report_to == "none" else [self.cfg.report_to], project_dir=str(run_dir))

    def _prepare(self, collator: Callable) -> None:
        """Loaders, optimizer (the method's, else AdamW) and linear schedule, prepared by Accelerate."""
        from transformers import get_linear_schedule_with_warmup

        setup, cfg = self.setup, self.cfg
        self.sampler = EpochSampler(len(setup.train_data), cfg.seed)
        # Its own generator: iter(DataLoader) draws a seed from `generator`, by default the global torch RNG,
        # which would shift the dropout stream of a run resumed mid-epoch (one extra draw) away from the
        # uninterrupted run's. The sampler does not use it; this keeps the global RNG for dropout alone.
        train_loader = torch.utils.data.DataLoader(
            setup.train_data, batch_size=cfg.batch_size // cfg.grad_accum, sampler=self.sampler,
            collate_fn=collator, generator=torch.Generator().manual_seed(cfg.seed), pin_memory=self.cuda)
        eval_loader = torch.utils.data.DataLoader(
            setup.eval_data, batch_size=cfg.eval_batch_size, sampler=length_order(setup.eval_data),
            collate_fn=setup.task.eval_collator(setup.tokenizer), pin_memory=self.cuda)
        adamw = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "fused": True if self.fused_adamw else None}
        optimizer = (self.method.make_optimizer(setup.model, **adamw)  # the method's own, if it has one
                     or torch.optim.AdamW(self.params, **adamw))
        scheduler = get_linear_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * setup.total_steps),
                                                    setup.total_steps)
        prepared = self.accelerator.prepare(setup.model, optimizer, train_loader, eval_loader, scheduler)
        self.model, self.optimizer, self.train_loader, self.eval_loader, self.scheduler = prepared

    # what callers and tests read of the progress, under the names they have always had
    global_step = property(lambda self: self.progress.global_step)
    history = property(lambda self: self.progress.history)
    step_seconds = property(lambda self: self.progress.step_seconds)
    loss_sum = property(lambda self: self.progress.epoch_losses.loss)  # this epoch's so far
    loss_count = property(lambda self: self.progress.epoch_losses.count)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _trainable_count(self) -> int:
        return sum(p.numel() for p in self.params)

    def _warm_up(self, collator: Callable) -> None:
        """An untimed, undone step (device.warm_up_step) on the first training examples, at this run's
        micro-batch; with the torch optimizer under Accelerate's: no GradScaler, whose scale must not move."""
        from accelerate.utils import send_to_device

        micro = max(1, self.cfg.batch_size // self.cfg.grad_accum // self.accelerator.num_processes)
        batch = send_to_device(collator(self.setup.train_data[:micro]), self.accelerator.device)
        warm_up_step(self.model, self.optimizer.optimizer, self.params, batch, self.accelerator.device)
        self.optimizer.zero_grad(set_to_none=True)

    def evaluate(self) -> dict[str, float]:
        start = time.perf_counter()
        self.model.eval()
        metrics = self.setup.task.evaluate(self.model, self.eval_loader, self.accelerator,
                                           self.setup.tokenizer, max_new_tokens=self.cfg.max_new_tokens)
        self.model.train()
        self.progress.eval_seconds += time.perf_counter() - start
        return metrics

    # -- one optimizer step's closing --

    def _optimizer_step(self) -> None:
        scaler = self.accelerator.scaler
        if self.cfg.max_grad_norm > 0:
            # Accelerate unscales first (fp16)
            grad_norm = self.accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        else:
            self.accelerator.unscale_gradients()  # fp16: the norm and the methods see the true gradient
            grad_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in self.params if p.grad is not None]))
        self._grad_norm = torch.as_tensor(grad_norm, device=self.accelerator.device)
        grad_scale, overflow = None, False
        if scaler is None:
            self.divergence.mark(~torch.isfinite(self._grad_norm), self.progress.global_step + 1)
        else:  # fp16: a non-finite gradient is an overflow the scaler skips, not divergence (a host sync, as
            # the scaler's own step makes); the methods get the backward's scale and leave such a step out
            overflow = not bool(torch.isfinite(self._grad_norm))
            grad_scale = scaler.get_scale()
        self.method.before_optimizer_step(self.progress.global_step, grad_scale)
        self.optimizer.step()
        if overflow:
            self.divergence.skipped(scaler.get_scale(), grad_scale, self.progress.global_step + 1,
                                    self.progress.epoch)
        else:
            self.divergence.skipped_in_a_row = 0
        if self.method.after_optimizer_step(self.progress.global_step):
            self.refresh_parameters()
        if not overflow:  # the schedule moves with the updates (Accelerate's rule, also for a fused AdamW)
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.global_step += 1

    def refresh_parameters(self) -> None:
        """The method changed the trainable parameters (a resize): the optimizer takes the new set, keeping
        the state of every parameter still present (the method says how); the schedule goes on."""
        self.method.refresh_optimizer(self.optimizer)
        self.params = [p for p in self.unwrapped.parameters() if p.requires_grad]
        if self.accelerator.num_processes > 1:  # DDP registered the old parameters: wrap the model anew
            self._rewrap()
        self.progress.note_param_count(self._trainable_count())

    def _rewrap(self) -> None:
        """Release the old DDP wrapper, then wrap the resized model in a new one. The old reducer holds every
        old parameter, a gradient bucket the size of all of them, and autograd hooks on the ones that stay
        (torch's DDP._remove_autograd_hooks is for re-wrapping a model). Accelerate's prepare_model lists the
        model in accelerator._models again and wraps its forward in autocast again: it is unlisted and its
        forward restored first, so that the accelerator holds one model, prepared once."""
        old, accelerator = self.model, self.accelerator
        if isinstance(old, torch.nn.parallel.DistributedDataParallel):
            old._remove_autograd_hooks()
        accelerator._models[:] = [m for m in accelerator._models if m is not old and m is not self.unwrapped]
        self.model = None
        del old
        self.unwrapped = accelerator.unwrap_model(self.unwrapped, keep_fp32_wrapper=False)
        self.model = accelerator.prepare_model(self.unwrapped, device_placement=False)

    def _checkpoint_due(self) -> bool:
        every = self.cfg.checkpoint_every
        if every is None:  # by time, and only for runs long enough to be worth it
            return (self.setup.total_steps >= 200
                    and time.perf_counter() - self._last_checkpoint >= DEFAULT_CHECKPOINT_SECONDS)
        return every > 0 and self.progress.global_step % every == 0

    # -- the loop --

    def fit(self, stop: StopSignals, on_epoch_end: Callable[[dict], None] | None = None,
            max_steps: int | None = None) -> None:
        """Train the remaining epochs (evaluating after each). max_steps: stop after that many optimizer steps
        without evaluating (a probe of the first steps; the schedule still spans the whole run)."""
        from tqdm.auto import tqdm

        cfg, budget = self.cfg, self.setup.budget
        bar = tqdm(total=self.setup.total_steps, initial=self.progress.global_step, disable=not self.is_main,
                   desc=f"{cfg.task} {cfg.method} r{budget.rank} seed {cfg.seed}", unit="step", leave=False,
                   dynamic_ncols=True)
        self.model.train()
        while self.progress.epoch < cfg.epochs:
            if not self._train_epoch(stop, bar, max_steps):
                break
            self._end_epoch(bar, on_epoch_end)
        bar.close()

    def _train_epoch(self, stop: StopSignals, bar: Any, max_steps: int | None) -> bool:
        """The current epoch's remaining micro-batches; False when max_steps ended training within it."""
        loader = self._epoch_loader()
        device_sync(self.accelerator.device)
        self._start_stretch()
        for batch in loader:
            if not self._train_micro_batch(batch):
                continue  # accumulating: no optimizer step yet
            self._after_optimizer_step(bar)
            if max_steps is not None and self.progress.global_step >= max_steps:
                self._end_stretch()
                return False
            if stop.signum is not None or self._checkpoint_due():
                self._checkpoint_within_epoch(stop)
        self._end_stretch()
        return True

    def _epoch_loader(self) -> Any:
        """The training loader at the current epoch's order, past the micro-batches a resumed run has done."""
        epoch, done = self.progress.epoch, self.progress.batches_done_in_epoch
        # Accelerate's loader sets its sampler's epoch to its own count of iterations on every
        # iter(): set that count too, or a resumed run (a fresh loader, count 0) replays epoch 0's order.
        self.sampler.set_epoch(epoch)
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(epoch)
        return self.accelerator.skip_first_batches(self.train_loader, done) if done else self.train_loader

    def _train_micro_batch(self, batch: dict) -> bool:
        """Forward and backward of one micro-batch, then the optimizer step if it closes an accumulation
        (returns whether it did)."""
        with self.accelerator.accumulate(self.model):
            loss = self.model(**batch).loss  # AdaLoRA's orthogonal regulariser is inside
            extra = self.method.extra_loss()
            total = loss + extra if extra is not None else loss
            self.accelerator.backward(total)
            self.progress.add_loss(loss, extra)
            self.divergence.mark(~torch.isfinite(total.detach()), self.progress.global_step + 1)
            if not self.accelerator.sync_gradients:
                return False
            self._optimizer_step()
            return True

    def _after_optimizer_step(self, bar: Any) -> None:
        """The step's time, the bar, the method's values; every --log-every steps the divergence check and the
        trackers' log."""
        self.clock.lap()
        bar.update(1)
        step = self.progress.global_step
        method_values = self.method.log_values(step - 1)
        if self.tracking and method_values:
            self.accelerator.log(method_values, step=step)
        if step % self.cfg.log_every == 0:
            self._read_clock()
            self.divergence.check(self.progress.epoch)
            bar.set_postfix(self.progress.epoch_means(), refresh=False)
            if self.tracking:
                self._log_window()

    def _checkpoint_within_epoch(self, stop: StopSignals) -> None:
        """A checkpoint inside an epoch (due, or a signal came: then training stops, resumable)."""
        self._end_stretch()
        self.divergence.check(self.progress.epoch)  # a diverged run keeps its last good checkpoint
        self.save_checkpoint()
        if stop.signum is not None:
            raise TrainingInterrupted(
                f"stopped by {signal.Signals(stop.signum).name} at step {self.progress.global_step}; "
                f"checkpoint saved in {self.run_dir / CHECKPOINT_DIR}; continue with --resume", stop.signum)
        self._start_stretch()  # saving the checkpoint was not training time

    def _end_epoch(self, bar: Any, on_epoch_end: Callable[[dict], None] | None) -> None:
        """Evaluate, record the epoch in the history and the trackers, save a checkpoint."""
        self.divergence.check(self.progress.epoch)
        progress = self.progress
        losses = progress.epoch_means()
        metrics = self.evaluate()
        entry = {"epoch": progress.epoch + 1, "step": progress.global_step, **losses, **metrics,
                 "train_seconds": progress.train_seconds}
        if self.tracking:
            self.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=progress.global_step)
        if self.is_main:
            bar.write(f"epoch {progress.epoch + 1}/{self.cfg.epochs}: "
                      + ", ".join(f"{k} {v:.4f}" for k, v in {**losses, **metrics}.items()))
        progress.finish_epoch(entry)
        self.save_checkpoint()
        if on_epoch_end is not None:
            on_epoch_end(entry)  # may raise (a sweep's pruner): the checkpoint is saved

    # -- time and the trackers --

    def _start_stretch(self) -> None:
        """Training time runs from here (an epoch's start, the end of a checkpoint)."""
        self._stretch_start = time.perf_counter()
        self.clock.start()

    def _end_stretch(self) -> None:
        """Count the training time since _start_stretch, and its step times."""
        self._read_clock()
        self.progress.train_seconds += time.perf_counter() - self._stretch_start

    def _read_clock(self) -> None:
        """Synchronise and take the step times since the last read (a logging point, a checkpoint, an epoch's
        end): the device's events need no host sync per step."""
        device_sync(self.accelerator.device)
        times = self.clock.read()
        self.progress.step_seconds.extend(times)
        self.progress.since_log.add_times(times)

    def _log_window(self) -> None:
        """The mean loss (and extra term) since the last log, learning rate, gradient norm and step time."""
        window = self.progress.since_log
        if not window.losses.count:
            return
        values = window.take_values(self.scheduler.get_last_lr()[0], self.progress.has_extra_loss)
        if self._grad_norm is not None:
            values["train/grad_norm"] = float(self._grad_norm)
        self.accelerator.log(values, step=self.progress.global_step)

    # -- checkpoints and the end --

    def save_checkpoint(self) -> None:
        self._last_checkpoint = time.perf_counter()  # the next by time: DEFAULT_CHECKPOINT_SECONDS from here
        save_checkpoint(self)

    def load_checkpoint(self) -> None:
        load_checkpoint(self)

    def end(self) -> None:
        """Close the trackers (their files are complete afterwards). Not Accelerator.end_training(): that
        also destroys the process group, which a run under torchrun still needs, as does a bench's next
        run."""
        if self.tracking:
            self.accelerator.wait_for_everyone()
            if self.is_main:
                for tracker in self.accelerator.trackers:
                    tracker.finish()
            self.accelerator.trackers = []
            self.tracking = False
