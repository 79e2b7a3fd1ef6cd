"""One training run, as a recipe in three parts: `setup` builds data, model (with the method's adapters),
budget and schedule from a TrainConfig; `Trainer.fit` (trainer.py) runs the epochs; `train` ties them to a run
directory that holds everything to re-run and to analyse (records.py: config.json, result.json, adapter/,
checkpoint/).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import statistics
import time
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from fwlora import analysis, models
from fwlora.checkpoint import PREVIOUS_DIR, TMP_DIR
from fwlora.config import TrainConfig
from fwlora.data_order import EpochSampler
from fwlora.device import device_sync, set_tf32, warm_up_step
from fwlora.errors import NonFiniteError, NonFiniteFisherError, TrainingInterrupted, UserError
from fwlora.methods.base import DataPass, Method
from fwlora.plan import build_method, plan_run, resolve_head
from fwlora.records import (ADAPTER_DIR, CHECKPOINT_DIR, RunBudget, RunRecord, RunTiming, Status, write_config,
                            write_result)
from fwlora.rundir import environment, prepare_run_dir
from fwlora.stopping import StopSignals
from fwlora.tasks import subset, task_for
from fwlora.trainer import Setup, Trainer

log = logging.getLogger(__name__)


# ---- data, tokenised once per process for every run that shares it -----------------------------------------

@dataclass(frozen=True)
class PreparedData:
    train: list[dict]
    eval: list[dict]
    source: str
    majority: dict[str, float] | None
    fingerprint: str
    label_names: list[str] | None


_PREPARED: OrderedDict[tuple, PreparedData] = OrderedDict()
_PREPARED_MAX = 4  # a bench's tasks (and a sweep's one): the runs of a task share its tokenised data


def data_fingerprint(train: list, evaluation: list) -> str:
    """sha256 of the examples a run trains and evaluates on (after --train-limit), in order."""
    digest = hashlib.sha256()
    for part, examples in (("train", train), ("eval", evaluation)):
        digest.update(part.encode())
        for e in examples:
            value = asdict(e) if is_dataclass(e) else e
            digest.update(json.dumps(value, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def prepare_data(cfg: TrainConfig, task: Any, tokenizer: Any) -> PreparedData:
    """Load, subset and tokenise a task's data once per (task, data, limits, tokenizer, max length)."""
    key = (task, cfg.data_dir, cfg.train_limit, cfg.eval_limit, cfg.model, cfg.max_length)
    if key in _PREPARED:
        _PREPARED.move_to_end(key)
        return _PREPARED[key]
    train_examples, eval_examples, source = task.load(cfg.data_dir)
    train_examples = subset(train_examples, cfg.train_limit)
    if cfg.eval_limit:
        eval_examples = eval_examples[: cfg.eval_limit]
    prepared = PreparedData(train=task.encode(train_examples, tokenizer, cfg.max_length),
                            eval=task.encode_eval(eval_examples, tokenizer, cfg.max_length), source=source,
                            majority=task.majority_baseline(eval_examples),
                            fingerprint=data_fingerprint(train_examples, eval_examples),
                            label_names=getattr(task, "label_names", None))
    _PREPARED[key] = prepared
    while len(_PREPARED) > _PREPARED_MAX:
        _PREPARED.popitem(last=False)
    return prepared


# ---- setup -------------------------------------------------------------------------------------------------

def setup(cfg: TrainConfig) -> Setup:
    """Data, model with its adapters, budget and schedule; deterministic given cfg.seed."""
    from transformers import set_seed

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = task_for(cfg)
    head = resolve_head(cfg)
    set_seed(cfg.seed)  # the head's and the adapters' initialisation
    model, tokenizer = models.load_backbone(cfg.model, task, head, dtype=cfg.dtype,
                                            load_in_4bit=cfg.load_in_4bit)
    data = prepare_data(cfg, task, tokenizer)
    targets = models.resolve_targets(model, cfg.target_modules)
    counts = models.count_params(model, targets)
    plan = plan_run(cfg, len(data.train), counts, targets, models.head_modules(model),
                    causal_lm=task.model_kind == models.CAUSAL_LM)
    method = build_method(cfg, plan)
    notes = list(method.check())
    for note in notes:
        log.warning(note)
    if cfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        models.enable_gradient_checkpointing(model)
    init_seconds = None
    if method.uses_data_pass or method.timed_init:
        model, init_seconds = timed_build(cfg, method, model, task, tokenizer, data.train, targets)
    else:
        model = method.build(model)
    models.check_head_not_adapted(model)
    return Setup(cfg=cfg, task=task, model=model, tokenizer=tokenizer, train_data=data.train,
                 eval_data=data.eval, budget=plan.budget, head=head, targets=targets,
                 steps_per_epoch=plan.steps_per_epoch, total_steps=plan.total_steps, data_source=data.source,
                 method=method, majority=data.majority,
                 notes=notes, data_fingerprint=data.fingerprint, label_names=data.label_names,
                 init_seconds=init_seconds)


def training_device() -> torch.device:
    """The device this process will train on (Accelerate's: its own GPU under torchrun); without CUDA the
    CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    from accelerate import PartialState

    return PartialState().device


def data_pass(cfg: TrainConfig, task: Any, tokenizer: Any, train_data: list[dict],
              device: torch.device) -> DataPass:
    """The run's training batches as the loop draws them (its micro-batch, its seeded order, epoch after
    epoch), on `device`, and the task's loss. Every process reads the same batches: an initialisation is the
    same on every rank."""
    from accelerate.utils import send_to_device

    collate, size = task.collator(tokenizer), cfg.batch_size // cfg.grad_accum

    def batches(n: int) -> Iterator[dict[str, torch.Tensor]]:
        done, epoch = 0, 0
        while train_data and done < n:
            sampler = EpochSampler(len(train_data), cfg.seed)
            sampler.set_epoch(epoch)
            order = list(sampler)
            for i in range(0, len(order), size):
                if done >= n:
                    return
                yield dict(send_to_device(collate([train_data[j] for j in order[i:i + size]]), device))
                done += 1
            epoch += 1

    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    return DataPass(batches, loss)


def timed_build(cfg: TrainConfig, method: Method, model: torch.nn.Module, task: Any, tokenizer: Any,
                train_data: list[dict], targets: list[str]) -> tuple[torch.nn.Module, float]:
    """The method's build where it does work of its own (a data pass, an SVD of every weight): on the training
    device, its seconds part of the run's training time (timing.init_seconds)."""
    device = training_device()
    set_tf32(device, cfg.tf32 == "on")  # the build's SVDs and passes at the run's matmul precision
    if not cfg.load_in_4bit:  # a 4-bit backbone is placed where it loads
        model = model.to(device)
    if method.uses_data_pass:
        method.data = data_pass(cfg, task, tokenizer, train_data, next(model.parameters()).device)
        warm_up_pass(model, method.data, targets, device)
    device_sync(device)
    start = time.perf_counter()
    # the data pass draws dropout masks: on a fork of the RNG, so the training's draws do not depend on how many
    # batches the pass read (they still differ from LoRA's, whose build draws A from the same generator)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = method.build(model)
    device_sync(device)
    return model, time.perf_counter() - start


def warm_up_pass(model: torch.nn.Module, data: DataPass, targets: list[str], device: torch.device) -> None:
    """The one-off costs of a first forward and backward (kernels, allocator, threads) are not the method's: LoRA
    pays them in the loop's untimed warm-up step, so a data pass pays them before its clock starts. Gradients
    only for the adapted matrices' weights (what a gradient pass takes at most, not a backbone-sized buffer);
    every flag and gradient is as it was afterwards."""
    first = next(data.batches(1), None)
    if first is None:
        return
    flags = {p: p.requires_grad for p in model.parameters()}
    adapted = {f"{name}.weight" for name in models.adapted_linear_names(model, targets)}
    try:
        for name, p in model.named_parameters():
            p.requires_grad_(name in adapted and p.is_floating_point())
        warm_up_step(model, None, [p for p in model.parameters() if p.requires_grad], first, device)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


# ---- the result --------------------------------------------------------------------------------------------

def timing_summary(trainer: Trainer, load_seconds: float) -> RunTiming:
    """Times from synchronised clocks (the device's events per step), after an untimed warm-up step; the peak
    memory since the run started (device.PeakMemory says how, and `since` from when). A method's timed build
    (init_seconds) is training time, not loading."""
    progress, init_seconds = trainer.progress, trainer.setup.init_seconds
    steps, train_seconds = progress.step_seconds, progress.train_seconds
    timing = RunTiming(
        train_seconds=train_seconds + (init_seconds or 0.0),
        init_seconds=init_seconds,
        eval_seconds=progress.eval_seconds,
        load_seconds=load_seconds - (init_seconds or 0.0),
        optimizer_steps=progress.global_step,
        examples_per_second=(len(trainer.setup.train_data) * trainer.cfg.epochs / train_seconds
                             if train_seconds else None),
        step_seconds_median=statistics.median(steps) if steps else None,
        peak_memory=trainer.memory.read(),
        resumes=progress.resumes,
        boot_ids=list(progress.boot_ids) or None,
    )
    warmup = trainer.method.warmup_steps()  # a method with a warm-up: its steps timed apart
    if warmup is not None and steps:
        warmup = min(warmup, len(steps))
        after = steps[warmup:]
        timing.warmup_step_seconds_median = statistics.median(steps[:warmup])
        timing.after_warmup_step_seconds_median = statistics.median(after) if after else None
        timing.warmup_seconds = sum(steps[:warmup])
    return timing


def budget_summary(trainer: Trainer) -> RunBudget:
    """The budget the run was given and the adapter parameters it trained: at the start, at the end, and
    averaged over the optimizer steps (a method that resizes its adapter, or AdaLoRA's init_r ranks, trains
    more or fewer than its final budget)."""
    run, head = trainer.setup, trainer.setup.budget.head_params
    stretches = trainer.progress.param_counts  # [first step, count] each
    total = max(trainer.progress.global_step, 1)
    ends = [start for start, _ in stretches[1:]] + [total]
    weighted = sum((min(end, total) - start) * count for (start, count), end in zip(stretches, ends))
    trainable = sum(p.numel() for p in trainer.params)
    given = run.budget
    return RunBudget(rank=given.rank, adapter_params=given.adapter_params, backbone_params=given.backbone_params,
                     head_params=head, percent=given.percent, requested_percent=given.requested_percent,
                     trainable_params=trainable, adapter_trainable_params=trainable - head,
                     trained_adapter_params_initial=stretches[0][1] - head,
                     trained_adapter_params_final=stretches[-1][1] - head,
                     trained_adapter_params_mean=weighted / total - head, head=run.head,
                     lora_alpha=trainer.method.summary().get("lora_alpha"), targets=list(run.targets))


def summarise(trainer: Trainer, env: dict, load_seconds: float) -> RunRecord:
    run, cfg, method, history = trainer.setup, trainer.cfg, trainer.method, trainer.progress.history
    metric = run.task.metric
    pick = max if run.task.higher_is_better else min
    best = pick(history, key=lambda entry: entry[metric])
    # the update training made, per matrix: the main process alone writes the record, so it alone takes the
    # SVDs
    deltas = method.delta_weights(models.delta_weights(trainer.unwrapped)) if trainer.is_main else {}
    return RunRecord(
        status=Status.COMPLETE, task=cfg.task, method=cfg.method, seed=cfg.seed, config=cfg.to_dict(),
        metric=metric, higher_is_better=run.task.higher_is_better, final=history[-1], best=best,
        epochs=history,
        processes=trainer.accelerator.num_processes,
        budget=budget_summary(trainer),
        method_info=method.summary(),
        timing=timing_summary(trainer, load_seconds),
        matrices=analysis.matrix_table(deltas, **method.matrix_columns()) if trainer.is_main else [],
        data={"source": run.data_source, "train_examples": len(run.train_data),
              "eval_examples": len(run.eval_data), "steps_per_epoch": run.steps_per_epoch,
              "total_steps": run.total_steps, "majority": run.majority,
              "fingerprint": run.data_fingerprint, "label_names": run.label_names,
              "model_kind": run.task.model_kind, "num_labels": run.task.num_labels},
        notes=run.notes, env=env)


# ---- entry point -----------------------------------------------------------------------------------------


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
    check_output_dir(run_dir)  # checked now, made after setup: a bad input is refused before it exists
    run = setup(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(run, run_dir)
    env = {**environment(trainer.accelerator.device, cfg), "fused_adamw": trainer.fused_adamw,
           "pin_memory": trainer.cuda}
    write_config(run_dir, cfg.to_dict(), env)
    if resuming:
        trainer.load_checkpoint()
    trainer.progress.note_machine(env.get("boot_id"))
    load_seconds = time.perf_counter() - start
    if trainer.is_main:
        log_start(trainer)
    fit_or_record_failure(trainer, env, on_epoch_end)
    trainer.end()
    record = summarise(trainer, env, load_seconds)
    if trainer.is_main:
        save_outputs(trainer, run_dir, record)
    trainer.accelerator.wait_for_everyone()
    trainer.method.close()
    return record


def check_output_dir(run_dir: Path) -> None:
    """Refuse an --output-dir that is, or lies under, a file."""
    for existing in (p for p in (run_dir, *run_dir.parents) if p.exists()):  # the nearest that exists
        if not existing.is_dir():
            raise UserError(f"--output-dir {run_dir}: {existing} is a file; choose another --output-dir")
        break


def fit_or_record_failure(trainer: Trainer, env: dict, on_epoch_end: Callable[[dict], None] | None) -> None:
    """Train; a run stopped by a signal or by divergence writes its result.json (with the epochs done and the
    step reached) before the error goes on."""
    cfg, run_dir = trainer.cfg, trainer.run_dir

    def failed(status: Status, **extra: Any) -> RunRecord:
        return RunRecord(status=status, task=cfg.task, method=cfg.method, seed=cfg.seed, config=cfg.to_dict(),
                         metric=trainer.setup.task.metric, epochs=trainer.progress.history,
                         step=trainer.progress.global_step, env=env, **extra)

    try:
        with StopSignals() as stop:
            try:
                trainer.fit(stop, on_epoch_end)
            except NonFiniteFisherError as e:  # a NaN/inf gradient inside a method's warm-up statistic
                raise NonFiniteError(f"{e}; try a lower --lr. The last good checkpoint is kept.") from None
    except TrainingInterrupted:
        trainer.end()
        if trainer.is_main:
            write_result(run_dir, failed(Status.INTERRUPTED))
        raise
    except NonFiniteError as e:
        trainer.end()
        if trainer.is_main:
            write_result(run_dir, failed(Status.FAILED, error=str(e)))
        raise


def log_start(trainer: Trainer) -> None:
    cfg, budget = trainer.cfg, trainer.setup.budget
    log.info("%s %s on %s: rank %d (budget %s adapter parameters, %.3f %% of %s), trains %s adapter + %s "
             "head parameters, %d steps", cfg.method, cfg.task, cfg.model, budget.rank,
             f"{budget.adapter_params:,}", budget.percent, f"{budget.backbone_params:,}",
             f"{trainer._trainable_count() - budget.head_params:,}", f"{budget.head_params:,}",
             trainer.setup.total_steps)


def save_outputs(trainer: Trainer, run_dir: Path, record: RunRecord) -> None:
    """The main process's last writes: the adapter (with the tokenizer and the method's extras), result.json;
    the checkpoints go only after the result is written (never lose results)."""
    adapter_dir = run_dir / ADAPTER_DIR
    with warnings.catch_warnings():
        # AdaLoRA saves the matrices it pruned to rank 0 as (0, d) tensors, which PEFT mistakes for
        # ungathered ZeRO-3 / FSDP shards; the adapter is complete and loads back.
        warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
        trainer.unwrapped.save_pretrained(str(adapter_dir))
    trainer.setup.tokenizer.save_pretrained(str(adapter_dir))  # what `fwlora predict` tokenises with
    trainer.method.save_adapter_extras(adapter_dir)
    write_result(run_dir, record)
    for name in (CHECKPOINT_DIR, PREVIOUS_DIR, TMP_DIR):  # checkpoint.unreadable stays, to be looked at
        shutil.rmtree(run_dir / name, ignore_errors=True)
