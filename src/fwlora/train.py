"""The one training loop, for every method: same data order, optimiser, schedule, evaluation.

A recipe in three parts: `setup` builds data, model, optimiser and schedule from a TrainConfig;
`Trainer.fit` runs epochs (Accelerate: devices, data parallel, mixed precision, accumulation) and
evaluates after each; `train` ties them to a run directory that holds everything to re-run and to
analyse (records.py: config.json, result.json, adapter/, checkpoint/).

The loop never asks which method it runs: it calls the method's hooks (fwlora.methods.base). Per
optimizer step, after the backward pass of its last micro-batch:
    clip -> method.before_optimizer_step -> optimizer.step() -> method.after_optimizer_step
         -> (parameters changed: refresh the optimizer) -> scheduler.step() -> zero_grad
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import signal
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from fwlora import analysis, methods, models
from fwlora.budget import Budget, make_budget
from fwlora.config import TrainConfig
from fwlora.data import get_task, subset
from fwlora.errors import NonFiniteError, TrainingInterrupted, UserError
from fwlora.files import read_json, write_json
from fwlora.method import NonFiniteFisherError
from fwlora.methods.base import Method, RunInfo
from fwlora.records import ADAPTER_DIR, CHECKPOINT_DIR, RunRecord, Status, write_config, write_result
from fwlora.rundir import environment, prepare_run_dir

log = logging.getLogger(__name__)

# checkpoint every this many seconds of training when --checkpoint-every is not given
DEFAULT_CHECKPOINT_SECONDS = 600.0


# ---- setup -----------------------------------------------------------------------------------------


@dataclass
class Setup:
    """Everything a run is built from, resolved from its TrainConfig."""

    cfg: TrainConfig
    task: Any  # data.Task
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


def resolve_head(cfg: TrainConfig) -> str:
    return models.default_head(cfg.model) if cfg.head == "auto" else cfg.head


def setup(cfg: TrainConfig) -> Setup:
    """Data, model with its adapters, budget and schedule; deterministic given cfg.seed."""
    from transformers import set_seed

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = get_task(cfg.task)
    train_examples, eval_examples, source = task.load(cfg.data_dir)
    train_examples = subset(train_examples, cfg.train_limit)
    if cfg.eval_limit:
        eval_examples = eval_examples[: cfg.eval_limit]
    head = resolve_head(cfg)
    set_seed(cfg.seed)  # the head's and the adapters' initialisation
    model, tokenizer = models.load_backbone(cfg.model, task, head)
    targets = models.resolve_targets(model, cfg.target_modules)
    counts = models.count_params(model, targets)
    budget = make_budget(counts.per_rank, counts.backbone, counts.head, rank=cfg.rank, percent=cfg.budget_percent())

    steps_per_epoch = math.ceil(len(train_examples) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    method_cls = methods.get(cfg.method)
    run = RunInfo(total_steps=total_steps, seed=cfg.seed, rank=budget.rank, adapter_params=budget.adapter_params,
                  targets=list(targets), modules_to_save=models.head_modules(model), lora_alpha=cfg.lora_alpha,
                  lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM" if task.model_kind == "causal-lm" else None)
    method = method_cls(method_cls.make_settings(cfg.method_settings, run), run)
    notes = list(method.check())
    for note in notes:
        log.warning(note)
    model = method.build(model)
    models.check_head_not_adapted(model)
    return Setup(cfg=cfg, task=task, model=model, tokenizer=tokenizer,
                 train_data=task.encode(train_examples, tokenizer, cfg.max_length),
                 eval_data=task.encode_eval(eval_examples, tokenizer, cfg.max_length), budget=budget, head=head,
                 targets=targets, steps_per_epoch=steps_per_epoch, total_steps=total_steps, data_source=source,
                 method=method, majority=task.majority_baseline(eval_examples), notes=notes)


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


# ---- the loop --------------------------------------------------------------------------------------


class _StopSignals:
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
        self.accelerator = Accelerator(
            cpu=multi_cpu,
            gradient_accumulation_steps=self.cfg.grad_accum,
            mixed_precision=self.cfg.mixed_precision,
            dataloader_config=DataLoaderConfiguration(split_batches=True),  # batch_size is the global batch
        )
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
                                                   generator=torch.Generator().manual_seed(self.cfg.seed))
        eval_loader = torch.utils.data.DataLoader(s.eval_data, batch_size=self.cfg.eval_batch_size,
                                                  collate_fn=s.task.eval_collator(s.tokenizer))
        params = [p for p in s.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        scheduler = get_linear_schedule_with_warmup(optimizer, round(self.cfg.warmup_ratio * s.total_steps), s.total_steps)
        self.model, self.optimizer, self.train_loader, self.eval_loader, self.scheduler = self.accelerator.prepare(
            s.model, optimizer, train_loader, eval_loader, scheduler)
        self.params = params
        self.unwrapped = self.accelerator.unwrap_model(self.model)
        self.method.attach(self.unwrapped)
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
        self._first_bad_step = torch.full((), -1, dtype=torch.long, device=self.accelerator.device)
        self._last_checkpoint = time.perf_counter()

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _trainable_count(self) -> int:
        return sum(p.numel() for p in self.params)

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
        if self.cfg.max_grad_norm > 0:
            grad_norm = self.accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None]))
        bad = ~torch.isfinite(torch.as_tensor(grad_norm, device=self._first_bad_step.device))
        self._mark_bad(bad)
        scaler = self.accelerator.scaler
        self.method.before_optimizer_step(self.global_step, scaler.get_scale() if scaler is not None else None)
        self.optimizer.step()
        if self.method.after_optimizer_step(self.global_step):
            self._refresh_parameters()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1

    def _refresh_parameters(self) -> None:
        """The method changed the trainable parameters (a resize): the optimizer takes the new set, keeping
        the state of every parameter still present; the schedule goes on."""
        from fwlora.allocation import refresh_optimizer

        refresh_optimizer(self.optimizer, self.unwrapped)
        self.params = [p for p in self.unwrapped.parameters() if p.requires_grad]
        if self.accelerator.num_processes > 1:  # DDP registered the old parameters: wrap the model anew
            self.model = self.accelerator.prepare_model(self.unwrapped, device_placement=False)
        count = self._trainable_count()
        if count != self.param_counts[-1][1]:
            self.param_counts.append([self.global_step + 1, count])

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

    # -- the loop --

    def fit(self, stop: _StopSignals, on_epoch_end: Callable[[dict], None] | None = None) -> None:
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
            self._sync()
            epoch_start = time.perf_counter()
            step_start = epoch_start
            for batch in loader:
                with self.accelerator.accumulate(self.model):
                    loss = self.model(**batch).loss  # AdaLoRA's orthogonal regulariser is inside
                    extra = self.method.extra_loss()
                    total = loss + extra if extra is not None else loss
                    self.accelerator.backward(total)
                    self.batches_done_in_epoch += 1
                    self.loss_sum += loss.detach().float()
                    if extra is not None:
                        self.extra_sum += extra.detach().float()
                        self.has_extra_loss = True
                    self.loss_count += 1
                    self._mark_bad(~torch.isfinite(total.detach()))
                    if self.accelerator.sync_gradients:
                        self._optimizer_step()
                        now = time.perf_counter()
                        self.step_seconds.append(now - step_start)
                        step_start = now
                        bar.update(1)
                        if self.global_step % cfg.log_every == 0:
                            self._check_finite()
                            bar.set_postfix(self._running_losses(), refresh=False)
                        if stop.signum is not None or self._checkpoint_due():
                            self._sync()
                            self.train_seconds += time.perf_counter() - epoch_start
                            self._check_finite()
                            self.save_checkpoint()
                            if stop.signum is not None:
                                raise TrainingInterrupted(
                                    f"stopped by {signal.Signals(stop.signum).name} at step {self.global_step}; "
                                    f"checkpoint saved in {self.run_dir / CHECKPOINT_DIR}; continue with --resume",
                                    stop.signum)
                            epoch_start = step_start = time.perf_counter()  # the checkpoint is not training time
            self._sync()
            self.train_seconds += time.perf_counter() - epoch_start
            self._check_finite()
            losses = self._running_losses()
            metrics = self.evaluate()
            self.history.append({"epoch": self.epoch + 1, "step": self.global_step, **losses, **metrics,
                                 "train_seconds": self.train_seconds})
            if self.is_main:
                bar.write(f"epoch {self.epoch + 1}/{cfg.epochs}: " + ", ".join(
                    f"{k} {v:.4f}" for k, v in {**losses, **metrics}.items()))
            self.epoch += 1
            self.batches_done_in_epoch = 0
            self.loss_sum.zero_()
            self.extra_sum.zero_()
            self.loss_count = 0
            self.save_checkpoint()
            if on_epoch_end is not None:
                on_epoch_end(self.history[-1])  # may raise (a sweep's pruner): the checkpoint is saved
        bar.close()

    def _running_losses(self) -> dict[str, float]:
        n = max(self.loss_count, 1)
        out = {"loss": float(self.loss_sum) / n}
        if self.has_extra_loss:
            out["penalty"] = float(self.extra_sum) / n
        return out

    def _sync(self) -> None:
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize()

    # -- checkpoints: adapter + head, optimiser, schedule, RNG, the method's state, data position --

    def save_checkpoint(self) -> None:
        """Written to checkpoint.tmp, then swapped in: the previous checkpoint stays until the new one is whole."""
        from safetensors.torch import save_file

        self.accelerator.wait_for_everyone()
        self._last_checkpoint = time.perf_counter()
        if not self.is_main:
            return
        final = self.run_dir / CHECKPOINT_DIR
        tmp = self.run_dir / (CHECKPOINT_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        trainable = {n: p.detach().cpu().contiguous() for n, p in self.unwrapped.named_parameters() if p.requires_grad}
        save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, str(tmp / "rng.safetensors"))
        self.method.save_state(tmp)
        write_json(tmp / "progress.json", {
            "epoch": self.epoch, "batches_done_in_epoch": self.batches_done_in_epoch, "global_step": self.global_step,
            "history": self.history, "train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds,
            "step_seconds": self.step_seconds, "loss_sum": float(self.loss_sum), "penalty_sum": float(self.extra_sum),
            "has_extra_loss": self.has_extra_loss, "param_counts": self.param_counts,
            "loss_count": self.loss_count, "python_random": _python_rng_state(),
        })
        _fsync_tree(tmp)
        old = self.run_dir / (CHECKPOINT_DIR + ".old")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> None:
        from safetensors.torch import load_file

        directory = self.run_dir / CHECKPOINT_DIR
        # the method first: it may reshape the model (a resize after its warm-up) before the weights load
        if self.method.load_state(directory):
            self._refresh_parameters()
        trainable = load_file(str(directory / "trainable.safetensors"))
        params = dict(self.unwrapped.named_parameters())
        with torch.no_grad():
            for name, value in trainable.items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
        rng = load_file(str(directory / "rng.safetensors"))
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
        progress = read_json(directory / "progress.json")
        self.epoch = progress["epoch"]
        self.batches_done_in_epoch = progress["batches_done_in_epoch"]
        self.global_step = progress["global_step"]
        self.history = progress["history"]
        self.train_seconds = progress["train_seconds"]
        self.eval_seconds = progress["eval_seconds"]
        self.step_seconds = progress["step_seconds"]
        self.param_counts = progress.get("param_counts", self.param_counts)
        self.loss_sum.fill_(progress["loss_sum"])
        self.extra_sum.fill_(progress["penalty_sum"])
        self.has_extra_loss = progress.get("has_extra_loss", False)
        self.loss_count = progress["loss_count"]
        random.setstate(_python_rng_from_json(progress["python_random"]))
        log.info("resumed at epoch %d, step %d", self.epoch + 1, self.global_step)


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


# ---- the result ------------------------------------------------------------------------------------


def peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"kind": "cuda_max_allocated", "bytes": torch.cuda.max_memory_allocated(device)}
    import resource

    return {"kind": "process_peak_rss", "bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def timing_summary(t: Trainer) -> dict[str, Any]:
    steps = t.step_seconds
    out = {
        "train_seconds": t.train_seconds,
        "eval_seconds": t.eval_seconds,
        "optimizer_steps": t.global_step,
        "examples_per_second": len(t.s.train_data) * t.cfg.epochs / t.train_seconds if t.train_seconds else None,
        "step_seconds_median": statistics.median(steps) if steps else None,
        "peak_memory": peak_memory(t.accelerator.device),
    }
    k = t.method.warmup_steps()
    if k is not None and steps:
        k = min(k, len(steps))
        out["warmup_step_seconds_median"] = statistics.median(steps[:k])
        out["after_warmup_step_seconds_median"] = statistics.median(steps[k:]) if len(steps) > k else None
        out["warmup_seconds"] = sum(steps[:k])
    return out


def trained_params(t: Trainer) -> dict[str, Any]:
    """Adapter parameters trained: at the start, at the end, and averaged over the optimizer steps (a method
    that resizes its adapter, or AdaLoRA's init_r ranks, trains more or fewer than its final budget)."""
    head = t.s.budget.head_params
    segments = t.param_counts
    total = max(t.global_step, 1)
    weighted = sum((min(end, total) - start) * count for (start, count), end in
                   zip(segments, [s for s, _ in segments[1:]] + [total]))
    return {"trained_adapter_params_initial": segments[0][1] - head,
            "trained_adapter_params_final": segments[-1][1] - head,
            "trained_adapter_params_mean": weighted / total - head}


def summarise(t: Trainer, env: dict, load_seconds: float) -> RunRecord:
    s, cfg = t.s, t.cfg
    metric = s.task.metric
    pick = max if s.task.higher_is_better else min
    best = pick(t.history, key=lambda h: h[metric])
    deltas = models.delta_weights(t.unwrapped)
    trainable = sum(p.numel() for p in t.params)
    return RunRecord(
        status=Status.COMPLETE, task=cfg.task, method=cfg.method, seed=cfg.seed, config=cfg.to_dict(),
        metric=metric, higher_is_better=s.task.higher_is_better, final=t.history[-1], best=best, epochs=t.history,
        processes=t.accelerator.num_processes,
        budget={**s.budget.to_dict(), "trainable_params": trainable, "adapter_trainable_params": trainable - s.budget.head_params,
                **trained_params(t), "head": s.head, "lora_alpha": t.method.summary().get("lora_alpha"),
                "targets": s.targets},
        method_info=t.method.summary(),
        timing={**timing_summary(t), "load_seconds": load_seconds},
        matrices=analysis.matrix_table(deltas, **t.method.matrix_columns()),
        data={"source": s.data_source, "train_examples": len(s.train_data), "eval_examples": len(s.eval_data),
              "steps_per_epoch": s.steps_per_epoch, "total_steps": s.total_steps, "majority": s.majority},
        notes=s.notes, env=env)


# ---- entry point -----------------------------------------------------------------------------------


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
          on_epoch_end: Callable[[dict], None] | None = None) -> RunRecord:
    """Run one configuration into cfg.output_dir and return its record (also written to result.json).

    on_epoch_end(entry) is called after each epoch's evaluation with that epoch's metrics.

    Raises UserError for bad input, TrainingInterrupted after a signal (checkpoint saved), and
    NonFiniteError when training diverges, also inside a method's warm-up statistic (result.json
    records the failure with its step; the last good checkpoint is kept).
    """
    run_dir = Path(cfg.output_dir)
    resuming = prepare_run_dir(cfg, resume, overwrite)
    start = time.perf_counter()
    s = setup(cfg)
    env = environment()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, cfg.to_dict(), env)
    t = Trainer(s, run_dir)
    if resuming:
        t.load_checkpoint()
    load_seconds = time.perf_counter() - start
    if t.is_main:
        log.info("%s %s on %s: rank %d (budget %s adapter parameters, %.3f %% of %s), trains %s adapter + %s head "
                 "parameters, %d steps", cfg.method, cfg.task, cfg.model, s.budget.rank, f"{s.budget.adapter_params:,}",
                 s.budget.percent, f"{s.budget.backbone_params:,}", f"{t._trainable_count() - s.budget.head_params:,}",
                 f"{s.budget.head_params:,}", s.total_steps)

    def failed(status: Status, **extra: Any) -> RunRecord:
        return RunRecord(status=status, task=cfg.task, method=cfg.method, seed=cfg.seed, config=cfg.to_dict(),
                         metric=s.task.metric, epochs=t.history, step=t.global_step, env=env, **extra)

    try:
        with _StopSignals() as stop:
            try:
                t.fit(stop, on_epoch_end)
            except NonFiniteFisherError as e:  # a NaN/inf gradient inside a method's warm-up statistic
                raise NonFiniteError(f"{e}; try a lower --lr. The last good checkpoint is kept.") from None
    except TrainingInterrupted:
        if t.is_main:
            write_result(run_dir, failed(Status.INTERRUPTED))
        raise
    except NonFiniteError as e:
        if t.is_main:
            write_result(run_dir, failed(Status.FAILED, error=str(e)))
        raise
    record = summarise(t, env, load_seconds)
    if t.is_main:
        with warnings.catch_warnings():
            # AdaLoRA saves the matrices it pruned to rank 0 as (0, d) tensors, which PEFT mistakes for
            # ungathered ZeRO-3 / FSDP shards; the adapter is complete and loads back.
            warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
            t.unwrapped.save_pretrained(str(run_dir / ADAPTER_DIR))
        t.method.save_adapter_extras(run_dir / ADAPTER_DIR)
        write_result(run_dir, record)
        shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
    t.accelerator.wait_for_everyone()
    t.method.close()
    return record
