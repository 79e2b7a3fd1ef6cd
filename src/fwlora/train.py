"""The one training loop for LoRA, AdaLoRA and FW-LoRA: same data order, optimiser, schedule, evaluation.

A recipe in three parts: `setup` builds data, model, optimiser and schedule from a TrainConfig;
`Trainer.fit` runs epochs (Accelerate: devices, data parallel, mixed precision, accumulation) and
evaluates after each; `train` ties them to a run directory that holds everything to re-run and to
analyse (config.json, result.json, adapter/, checkpoint/).

Per optimizer step, after the backward pass of its last micro-batch:
    clip -> fw.step() -> optimizer.step() -> adalora.update_and_allocate(step) -> scheduler.step() -> zero_grad
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fwlora import analysis, models
from fwlora.budget import Budget, adalora_ranks, make_budget
from fwlora.config import DEFAULT_BUDGET, TrainConfig
from fwlora.data import encode, load_task, subset, task_spec
from fwlora.errors import NonFiniteError, TrainingInterrupted, UserError
from fwlora.files import read_json, write_json
from fwlora.method import FisherWeightedLoRA, FWLoRAConfig

log = logging.getLogger(__name__)

CONFIG_FILE, RESULT_FILE, CHECKPOINT_DIR, ADAPTER_DIR = "config.json", "result.json", "checkpoint", "adapter"
# The head chosen for the offline backbone on evidence (README, "The head of the offline backbone").
OFFLINE_HEAD = "mean"


# ---- metrics ---------------------------------------------------------------------------------------


def classification_metrics(labels: np.ndarray, preds: np.ndarray, pair: bool) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    out = {"accuracy": float(accuracy_score(labels, preds)), "mcc": float(matthews_corrcoef(labels, preds))}
    if pair:
        out["f1"] = float(f1_score(labels, preds, average="binary" if labels.max() <= 1 else "macro"))
    return out


# ---- the run directory -----------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """Versions, git commit and machine: enough to tell where a number came from."""
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                 cwd=Path(__file__).resolve().parent)
            return out.stdout.strip() if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: version(p) for p in ("fwlora", "torch", "transformers", "peft", "accelerate", "datasets")},
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "command": " ".join(sys.argv),
    }


def run_status(run_dir: Path) -> str | None:
    """'complete', 'failed', 'interrupted', 'running', or None for an empty directory."""
    result = run_dir / RESULT_FILE
    if result.is_file():
        return read_json(result).get("status")
    return "running" if (run_dir / CONFIG_FILE).is_file() else None


def prepare_run_dir(cfg: TrainConfig, resume: bool, overwrite: bool) -> bool:
    """Claim cfg.output_dir; return True when a checkpoint there should be resumed.

    A directory holding another configuration is refused unless --overwrite; an unfinished run of the
    same configuration needs --resume (or --overwrite) so that finished work is never lost by accident.
    """
    run_dir = Path(cfg.output_dir)
    existing = run_dir / CONFIG_FILE
    if not existing.is_file():
        if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
            raise UserError(f"{run_dir} is not empty and holds no fwlora run: choose another --output-dir or pass --overwrite")
        if overwrite and run_dir.is_dir():
            shutil.rmtree(run_dir)
        return False
    if overwrite:
        shutil.rmtree(run_dir)
        return False
    old = read_json(existing).get("config", {})
    old_identity = {k: v for k, v in old.items() if k not in TrainConfig.NON_IDENTITY}
    if old_identity != cfg.identity():
        diff = sorted(k for k in set(old_identity) | set(cfg.identity()) if old_identity.get(k) != cfg.identity().get(k))
        shown = ", ".join(f"{k}: {old_identity.get(k)!r} -> {cfg.identity().get(k)!r}" for k in diff[:6])
        raise UserError(f"{run_dir} holds a run with a different configuration ({shown}); "
                        "use another --output-dir, or --overwrite to replace it")
    status = run_status(run_dir)
    if status == "complete":
        raise UserError(f"{run_dir} already holds this run, complete; pass --overwrite to train it again")
    if not resume:
        raise UserError(f"{run_dir} holds an unfinished run of this configuration ({status}); "
                        "pass --resume to continue it or --overwrite to start again")
    checkpoint, previous = run_dir / CHECKPOINT_DIR, run_dir / (CHECKPOINT_DIR + ".old")
    if not checkpoint.is_dir() and previous.is_dir():
        previous.rename(checkpoint)  # stopped between save_checkpoint's two renames: the old one is whole
    if not checkpoint.is_dir():
        log.warning("%s has no checkpoint (stopped before its first one): starting the run from the beginning", run_dir)
    return checkpoint.is_dir()


# ---- setup -----------------------------------------------------------------------------------------


@dataclass
class Setup:
    """Everything a run is built from, resolved from its TrainConfig."""

    cfg: TrainConfig
    spec: Any
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
    adalora_schedule: models.AdaLoraSchedule | None = None
    lora_alpha: float = 0.0
    notes: list[str] = field(default_factory=list)


def resolve_head(cfg: TrainConfig) -> str:
    if cfg.head != "auto":
        return cfg.head
    return OFFLINE_HEAD if cfg.model == models.OFFLINE_BACKBONE else "model"


def default_adalora_alpha(init_r: int) -> float:
    """AdaLoRA scales its update by alpha / init_r; its authors' GLUE scripts use alpha 32 with init_r 8
    on CoLA (a scaling of 4). We keep that scaling: alpha = 4 init_r. See README (AdaLoRA settings)."""
    return 4.0 * init_r


def setup(cfg: TrainConfig) -> Setup:
    """Data, model with its adapters, budget and schedule; deterministic given cfg.seed."""
    from transformers import set_seed

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    spec = task_spec(cfg.task)
    train_examples, eval_examples, source = load_task(cfg.task, cfg.data_dir)
    train_examples = subset(train_examples, cfg.train_limit)
    if cfg.eval_limit:
        eval_examples = eval_examples[: cfg.eval_limit]
    head = resolve_head(cfg)
    set_seed(cfg.seed)  # the head's and the adapters' initialisation
    model, tokenizer = models.load_backbone(cfg.model, spec.num_labels, head)
    targets = models.resolve_targets(model, cfg.target_modules)
    counts = models.count_params(model, targets)
    percent = None if cfg.rank is not None else (cfg.budget if cfg.budget is not None else DEFAULT_BUDGET)
    budget = make_budget(counts.per_rank, counts.backbone, counts.head, rank=cfg.rank, percent=percent)

    steps_per_epoch = math.ceil(len(train_examples) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    notes = []
    if cfg.method == "fwlora" and cfg.fw_warmup_steps >= total_steps:
        msg = (f"fw-warmup-steps = {cfg.fw_warmup_steps} >= the run's {total_steps} optimizer steps: "
               "the FW-LoRA penalty would never start (this run would be plain LoRA)")
        if not cfg.allow_late_penalty:
            raise UserError(msg + "; lower --fw-warmup-steps, or pass --allow-late-penalty")
        log.warning(msg)
        notes.append(msg)

    lora_alpha = cfg.lora_alpha or 2.0 * budget.rank
    schedule = None
    adalora_kwargs = None
    if cfg.method == "adalora":
        schedule = models.AdaLoraSchedule.scaled(total_steps, cfg.adalora_tinit, cfg.adalora_tfinal, cfg.adalora_delta)
        init_r, _ = adalora_ranks(budget.rank)
        lora_alpha = cfg.adalora_alpha or default_adalora_alpha(init_r)
        adalora_kwargs = dict(init_r=init_r, total_step=schedule.total_step, tinit=schedule.tinit,
                              tfinal=schedule.tfinal, deltaT=schedule.deltaT, beta1=cfg.adalora_beta1,
                              beta2=cfg.adalora_beta2, orth_reg_weight=cfg.adalora_orth_reg)
    model = models.build_peft_model(model, cfg.method, budget.rank, targets, lora_alpha=lora_alpha,
                                    lora_dropout=cfg.lora_dropout, adalora=adalora_kwargs)
    return Setup(cfg=cfg, spec=spec, model=model, tokenizer=tokenizer,
                 train_data=encode(train_examples, tokenizer, cfg.max_length),
                 eval_data=encode(eval_examples, tokenizer, cfg.max_length), budget=budget, head=head,
                 targets=targets, steps_per_epoch=steps_per_epoch, total_steps=total_steps, data_source=source,
                 adalora_schedule=schedule, lora_alpha=lora_alpha, notes=notes)


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
        from accelerate.utils import DataLoaderConfiguration
        from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup

        self.s, self.cfg, self.run_dir = s, s.cfg, run_dir
        # Under torchrun / accelerate launch without a GPU, Accelerate only sets up gloo data parallelism
        # when told the run is on the CPU.
        multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
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
        collator = DataCollatorWithPadding(s.tokenizer)
        self.sampler = EpochSampler(len(s.train_data), self.cfg.seed)
        # Its own generator: iter(DataLoader) draws a seed from `generator`, by default the global torch RNG,
        # which would shift the dropout stream of a run resumed mid-epoch (one extra draw) away from the
        # uninterrupted run's. The sampler does not use it; this keeps the global RNG for dropout alone.
        train_loader = torch.utils.data.DataLoader(s.train_data, batch_size=self.cfg.batch_size // self.cfg.grad_accum,
                                                   sampler=self.sampler, collate_fn=collator,
                                                   generator=torch.Generator().manual_seed(self.cfg.seed))
        eval_loader = torch.utils.data.DataLoader(s.eval_data, batch_size=self.cfg.eval_batch_size, collate_fn=collator)
        params = [p for p in s.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        scheduler = get_linear_schedule_with_warmup(optimizer, round(self.cfg.warmup_ratio * s.total_steps), s.total_steps)
        self.model, self.optimizer, self.train_loader, self.eval_loader, self.scheduler = self.accelerator.prepare(
            s.model, optimizer, train_loader, eval_loader, scheduler)
        self.params = params
        self.unwrapped = self.accelerator.unwrap_model(self.model)
        self.fw = None
        if self.cfg.method == "fwlora":
            self.fw = FisherWeightedLoRA(self.unwrapped, FWLoRAConfig(
                lambda_fw=self.cfg.lambda_fw, warmup_steps=self.cfg.fw_warmup_steps, beta=self.cfg.fw_beta,
                estimator=self.cfg.fw_estimator, sketch_size=self.cfg.fw_sketch_size,
                measure_every=self.cfg.fw_measure_every, normalization=self.cfg.fw_normalization, seed=self.cfg.seed))
        # progress, restored from a checkpoint on resume
        self.epoch = 0
        self.batches_done_in_epoch = 0  # micro-batches of the current epoch already trained
        self.global_step = 0
        self.history: list[dict] = []
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        self.step_seconds: list[float] = []
        self.loss_sum = torch.zeros((), device=self.accelerator.device)
        self.penalty_sum = torch.zeros((), device=self.accelerator.device)
        self.loss_count = 0
        self._first_bad_step = torch.full((), -1, dtype=torch.long, device=self.accelerator.device)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # -- evaluation --

    def evaluate(self) -> dict[str, float]:
        start = time.perf_counter()
        self.model.eval()
        preds, labels = [], []
        with torch.no_grad():
            for batch in self.eval_loader:
                logits = self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                p, y = self.accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"]))
                preds.append(p.cpu())
                labels.append(y.cpu())
        self.model.train()
        self.eval_seconds += time.perf_counter() - start
        return classification_metrics(torch.cat(labels).numpy(), torch.cat(preds).numpy(), self.s.spec.is_pair)

    # -- one optimizer step's closing --

    def _optimizer_step(self) -> None:
        grad_norm = None
        if self.cfg.max_grad_norm > 0:
            grad_norm = self.accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None]))
        bad = ~torch.isfinite(torch.as_tensor(grad_norm, device=self._first_bad_step.device))
        self._mark_bad(bad)
        if self.fw is not None:
            scaler = self.accelerator.scaler
            self.fw.step(grad_scale=scaler.get_scale() if scaler is not None else None)
        self.optimizer.step()
        if self.cfg.method == "adalora":
            # after backward, before zero_grad, once per optimizer step, with the 0-based step index
            # (PEFT's contract and the AdaLoRA authors' trainer)
            self.unwrapped.base_model.update_and_allocate(self.global_step)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1

    def _mark_bad(self, bad: torch.Tensor) -> None:
        """Remember the first step whose loss or gradient was not finite, without a host sync."""
        step = torch.full_like(self._first_bad_step, self.global_step + 1)
        self._first_bad_step = torch.where(bad & (self._first_bad_step < 0), step, self._first_bad_step)

    def _check_finite(self) -> None:
        bad_step = int(self._first_bad_step)
        if bad_step >= 0:
            raise NonFiniteError(f"the loss or gradient became NaN/inf at optimizer step {bad_step} "
                                 f"(epoch {self.epoch + 1}); try a lower --lr. The last good checkpoint is kept.")

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
                    penalty = self.fw.penalty() if self.fw is not None else None
                    total = loss + penalty if penalty is not None else loss
                    self.accelerator.backward(total)
                    self.batches_done_in_epoch += 1
                    self.loss_sum += loss.detach().float()
                    if penalty is not None:
                        self.penalty_sum += penalty.detach().float()
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
                        if stop.signum is not None:
                            self._sync()
                            self.train_seconds += time.perf_counter() - epoch_start
                            self._check_finite()
                            self.save_checkpoint()
                            raise TrainingInterrupted(
                                f"stopped by {signal.Signals(stop.signum).name} at step {self.global_step}; "
                                f"checkpoint saved in {self.run_dir / CHECKPOINT_DIR}; continue with --resume",
                                stop.signum)
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
            self.penalty_sum.zero_()
            self.loss_count = 0
            self.save_checkpoint()
            if on_epoch_end is not None:
                on_epoch_end(self.history[-1])  # may raise (a sweep's pruner): the checkpoint is saved
        bar.close()

    def _running_losses(self) -> dict[str, float]:
        n = max(self.loss_count, 1)
        out = {"loss": float(self.loss_sum) / n}
        if self.fw is not None:
            out["penalty"] = float(self.penalty_sum) / n
        return out

    def _sync(self) -> None:
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize()

    # -- checkpoints: adapter + head, optimiser, schedule, RNG, FW-LoRA and AdaLoRA state, data position --

    def save_checkpoint(self) -> None:
        from safetensors.torch import save_file

        self.accelerator.wait_for_everyone()
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
        if self.fw is not None:
            self.fw.save(tmp)
        if self.cfg.method == "adalora":
            self._save_adalora(tmp)
        write_json(tmp / "progress.json", {
            "epoch": self.epoch, "batches_done_in_epoch": self.batches_done_in_epoch, "global_step": self.global_step,
            "history": self.history, "train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds,
            "step_seconds": self.step_seconds, "loss_sum": float(self.loss_sum), "penalty_sum": float(self.penalty_sum),
            "loss_count": self.loss_count, "python_random": _python_rng_state(),
        })
        old = self.run_dir / (CHECKPOINT_DIR + ".old")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def _save_adalora(self, directory: Path) -> None:
        from safetensors.torch import save_file

        allocator = self.unwrapped.base_model.rankallocator
        tensors = {f"{kind}/{n}": t.detach().cpu().contiguous()
                   for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc") for n, t in getattr(allocator, kind).items()}
        if tensors:
            save_file(tensors, str(directory / "adalora_allocator.safetensors"))
        config = next(iter(self.unwrapped.peft_config.values()))
        write_json(directory / "adalora_rank_pattern.json", config.rank_pattern)

    def load_checkpoint(self) -> None:
        from safetensors.torch import load_file

        directory = self.run_dir / CHECKPOINT_DIR
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
        if self.fw is not None:
            self.fw.load(directory)
        if self.cfg.method == "adalora":
            allocator = self.unwrapped.base_model.rankallocator
            path = directory / "adalora_allocator.safetensors"
            for key, value in (load_file(str(path)) if path.is_file() else {}).items():
                kind, name = key.split("/", 1)
                getattr(allocator, kind)[name] = value.to(self.accelerator.device)
            config = next(iter(self.unwrapped.peft_config.values()))
            config.rank_pattern = read_json(directory / "adalora_rank_pattern.json")
        progress = read_json(directory / "progress.json")
        self.epoch = progress["epoch"]
        self.batches_done_in_epoch = progress["batches_done_in_epoch"]
        self.global_step = progress["global_step"]
        self.history = progress["history"]
        self.train_seconds = progress["train_seconds"]
        self.eval_seconds = progress["eval_seconds"]
        self.step_seconds = progress["step_seconds"]
        self.loss_sum.fill_(progress["loss_sum"])
        self.penalty_sum.fill_(progress["penalty_sum"])
        self.loss_count = progress["loss_count"]
        random.setstate(_python_rng_from_json(progress["python_random"]))
        log.info("resumed at epoch %d, step %d", self.epoch + 1, self.global_step)


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
    if t.cfg.method == "fwlora" and steps:
        k = min(t.cfg.fw_warmup_steps, len(steps))
        out["fw_warmup_step_seconds_median"] = statistics.median(steps[:k])
        out["fw_after_warmup_step_seconds_median"] = statistics.median(steps[k:]) if len(steps) > k else None
        out["fw_warmup_seconds"] = sum(steps[:k])
    return out


def summarise(t: Trainer, env: dict, load_seconds: float) -> dict[str, Any]:
    s, cfg = t.s, t.cfg
    metric = s.spec.metric
    best = max(t.history, key=lambda h: h[metric])
    deltas = models.delta_weights(t.unwrapped)
    extra: dict[str, dict[str, float]] = {}
    if t.fw is not None:
        names = {n: models.short_name(n) for n in t.fw.names}
        extra["fisher"] = {names[n]: v for n, v in t.fw.fisher.items()}
        extra["importance"] = {names[n]: v for n, v in t.fw.importance.items()}
    adalora_info = None
    if cfg.method == "adalora":
        extra["adalora_rank"] = models.adalora_rank_pattern(t.unwrapped)
        sch = s.adalora_schedule
        init_r, target_r = adalora_ranks(s.budget.rank)
        adalora_info = {"init_r": init_r, "target_r": target_r, "lora_alpha": s.lora_alpha,
                        "total_step": sch.total_step, "tinit": sch.tinit, "tfinal": sch.tfinal, "deltaT": sch.deltaT,
                        "orth_reg_weight": cfg.adalora_orth_reg, "beta1": cfg.adalora_beta1, "beta2": cfg.adalora_beta2,
                        "final_total_rank": sum(extra["adalora_rank"].values()) if extra["adalora_rank"] else None}
    trainable = sum(p.numel() for p in t.params)
    return {
        "status": "complete",
        "task": cfg.task, "method": cfg.method, "seed": cfg.seed, "metric": metric,
        "processes": t.accelerator.num_processes,
        "final": t.history[-1], "best": best,
        "epochs": t.history,
        "budget": {**s.budget.to_dict(), "trainable_params": trainable, "adapter_trainable_params": trainable - s.budget.head_params,
                   "head": s.head, "lora_alpha": s.lora_alpha, "targets": s.targets},
        "adalora": adalora_info,
        "timing": {**timing_summary(t), "load_seconds": load_seconds},
        "matrices": analysis.matrix_table(deltas, **extra),
        "data": {"source": s.data_source, "train_examples": len(s.train_data), "eval_examples": len(s.eval_data),
                 "steps_per_epoch": s.steps_per_epoch, "total_steps": s.total_steps},
        "notes": s.notes,
        "env": env,
    }


# ---- entry point -----------------------------------------------------------------------------------


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
          on_epoch_end: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Run one configuration into cfg.output_dir and return its result (also written to result.json).

    on_epoch_end(entry) is called after each epoch's evaluation with that epoch's metrics.

    Raises UserError for bad input, TrainingInterrupted after a signal (checkpoint saved), and
    NonFiniteError when training diverges (result.json records the failure; the checkpoint is kept).
    """
    run_dir = Path(cfg.output_dir)
    resuming = prepare_run_dir(cfg, resume, overwrite)
    start = time.perf_counter()
    s = setup(cfg)
    env = environment()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / CONFIG_FILE, {"config": cfg.to_dict(), "env": env})
    t = Trainer(s, run_dir)
    if resuming:
        t.load_checkpoint()
    load_seconds = time.perf_counter() - start
    if t.is_main:
        log.info("%s %s on %s: rank %d, %s adapter parameters (%.3f %% of %s), head %s parameters, %d steps",
                 cfg.method, cfg.task, cfg.model, s.budget.rank, f"{s.budget.adapter_params:,}", s.budget.percent,
                 f"{s.budget.backbone_params:,}", f"{s.budget.head_params:,}", s.total_steps)
    try:
        with _StopSignals() as stop:
            t.fit(stop, on_epoch_end)
    except TrainingInterrupted:
        if t.is_main:
            write_json(run_dir / RESULT_FILE, {"status": "interrupted", "step": t.global_step, "config": cfg.to_dict()})
        raise
    except NonFiniteError as e:
        if t.is_main:
            write_json(run_dir / RESULT_FILE, {"status": "failed", "error": str(e), "step": t.global_step,
                                                "config": cfg.to_dict(), "epochs": t.history})
        raise
    result = summarise(t, env, load_seconds)
    result["config"] = cfg.to_dict()
    if t.is_main:
        with warnings.catch_warnings():
            # AdaLoRA saves the matrices it pruned to rank 0 as (0, d) tensors, which PEFT mistakes for
            # ungathered ZeRO-3 / FSDP shards; the adapter is complete and loads back.
            warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
            t.unwrapped.save_pretrained(str(run_dir / ADAPTER_DIR))
        if t.fw is not None:
            t.fw.save(run_dir / ADAPTER_DIR)
        write_json(run_dir / RESULT_FILE, result)
        shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
    t.accelerator.wait_for_everyone()
    if t.fw is not None:
        t.fw.remove()
    return result


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' and PEFT's per-run chatter (newly initialised head weights etc.)."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
        transformers.logging.enable_progress_bar()
