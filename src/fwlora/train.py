"""One training run, as a recipe in three parts: `setup` builds data, model (with the method's adapters), budget
and schedule from a TrainConfig; `Trainer.fit` (trainer.py) runs the epochs; `train` ties them to a run directory
that holds everything to re-run and to analyse (records.py: config.json, result.json, adapter/, checkpoint/).
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
from fwlora.checkpoint import PREVIOUS_DIR
from fwlora.config import TrainConfig
from fwlora.device import device_sync
from fwlora.errors import NonFiniteError, NonFiniteFisherError, TrainingInterrupted, UserError
from fwlora.methods.base import DataPass, Method
from fwlora.plan import build_method, plan_run, resolve_head
from fwlora.records import ADAPTER_DIR, CHECKPOINT_DIR, RunRecord, Status, write_config, write_result
from fwlora.rundir import environment, prepare_run_dir
from fwlora.tasks import subset, task_for
from fwlora.trainer import EpochSampler, Setup, StopSignals, Trainer

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
    model, tokenizer = models.load_backbone(cfg.model, task, head, dtype=cfg.dtype, load_in_4bit=cfg.load_in_4bit)
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
        model, init_seconds = timed_build(cfg, method, model, task, tokenizer, data.train)
    else:
        model = method.build(model)
    models.check_head_not_adapted(model)
    return Setup(cfg=cfg, task=task, model=model, tokenizer=tokenizer, train_data=data.train, eval_data=data.eval,
                 budget=plan.budget, head=head, targets=targets, steps_per_epoch=plan.steps_per_epoch,
                 total_steps=plan.total_steps, data_source=data.source, method=method, majority=data.majority,
                 notes=notes, data_fingerprint=data.fingerprint, label_names=data.label_names,
                 init_seconds=init_seconds)


def training_device() -> torch.device:
    """The device this process will train on (Accelerate's: its own GPU under torchrun), the CPU without CUDA."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    from accelerate import PartialState

    return PartialState().device


def data_pass(cfg: TrainConfig, task: Any, tokenizer: Any, train_data: list[dict], device: torch.device) -> DataPass:
    """The run's training batches as the loop draws them (its micro-batch, its seeded order, epoch after epoch),
    on `device`, and the task's loss. Every process reads the same batches: an initialisation is the same on
    every rank."""
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
                train_data: list[dict]) -> tuple[torch.nn.Module, float]:
    """The method's build where it does work of its own (a data pass, an SVD of every weight): on the training
    device, its seconds part of the run's training time (timing.init_seconds)."""
    device = training_device()
    if not cfg.load_in_4bit:  # a 4-bit backbone is placed where it loads
        model = model.to(device)
    if method.uses_data_pass:
        method.data = data_pass(cfg, task, tokenizer, train_data, next(model.parameters()).device)
    device_sync(device)
    start = time.perf_counter()
    model = method.build(model)
    device_sync(device)
    return model, time.perf_counter() - start


# ---- the result --------------------------------------------------------------------------------------------

def timing_summary(t: Trainer) -> dict[str, Any]:
    """Times from synchronised clocks (the device's events per step), after an untimed warm-up step; the peak
    memory since the run started (device.PeakMemory says how, and `since` from when)."""
    steps = t.step_seconds
    out = {
        "train_seconds": t.train_seconds,
        "eval_seconds": t.eval_seconds,
        "optimizer_steps": t.global_step,
        "examples_per_second": len(t.s.train_data) * t.cfg.epochs / t.train_seconds if t.train_seconds else None,
        "step_seconds_median": statistics.median(steps) if steps else None,
        "peak_memory": t.memory.read(),
    }
    if t.s.init_seconds is not None:  # the method's timed build: part of its training time
        out["init_seconds"] = t.s.init_seconds
        out["train_seconds"] = t.train_seconds + t.s.init_seconds
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
    # the update training made, per matrix: the main process alone writes the record, so it alone takes the SVDs
    deltas = t.method.delta_weights(models.delta_weights(t.unwrapped)) if t.is_main else {}
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
        matrices=analysis.matrix_table(deltas, **t.method.matrix_columns()) if t.is_main else [],
        data={"source": s.data_source, "train_examples": len(s.train_data), "eval_examples": len(s.eval_data),
              "steps_per_epoch": s.steps_per_epoch, "total_steps": s.total_steps, "majority": s.majority,
              "fingerprint": s.data_fingerprint, "label_names": s.label_names, "model_kind": s.task.model_kind,
              "num_labels": s.task.num_labels},
        notes=s.notes, env=env)


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
    for existing in (p for p in (run_dir, *run_dir.parents) if p.exists()):  # checked now, made after setup:
        if not existing.is_dir():  # a bad input is refused before the run directory exists
            raise UserError(f"--output-dir {run_dir}: {existing} is a file; choose another --output-dir")
        break
    s = setup(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    t = Trainer(s, run_dir)
    env = {**environment(t.accelerator.device, cfg), "fused_adamw": t.fused_adamw, "pin_memory": t.cuda}
    write_config(run_dir, cfg.to_dict(), env)
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
        with StopSignals() as stop:
            try:
                t.fit(stop, on_epoch_end)
            except NonFiniteFisherError as e:  # a NaN/inf gradient inside a method's warm-up statistic
                raise NonFiniteError(f"{e}; try a lower --lr. The last good checkpoint is kept.") from None
    except TrainingInterrupted:
        t.end()
        if t.is_main:
            write_result(run_dir, failed(Status.INTERRUPTED))
        raise
    except NonFiniteError as e:
        t.end()
        if t.is_main:
            write_result(run_dir, failed(Status.FAILED, error=str(e)))
        raise
    t.end()
    record = summarise(t, env, load_seconds)
    if t.is_main:
        with warnings.catch_warnings():
            # AdaLoRA saves the matrices it pruned to rank 0 as (0, d) tensors, which PEFT mistakes for
            # ungathered ZeRO-3 / FSDP shards; the adapter is complete and loads back.
            warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
            t.unwrapped.save_pretrained(str(run_dir / ADAPTER_DIR))
        s.tokenizer.save_pretrained(str(run_dir / ADAPTER_DIR))  # what `fwlora predict` tokenises with
        t.method.save_adapter_extras(run_dir / ADAPTER_DIR)
        write_result(run_dir, record)
        for name in (CHECKPOINT_DIR, PREVIOUS_DIR):
            shutil.rmtree(run_dir / name, ignore_errors=True)
    t.accelerator.wait_for_everyone()
    t.method.close()
    return record
