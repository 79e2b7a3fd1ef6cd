"""One run's plan, computed in one place: its optimizer steps, its budget and rank, the modules it adapts and
the method object built for it. `fwlora train` plans from the model it has loaded; `bench` and `sweep` plan
without training (a warning, a refused trial) from a backbone loaded once per process.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from fwlora import methods, models
from fwlora.budget import Budget, make_budget
from fwlora.config import TrainConfig
from fwlora.methods.base import Method, RunInfo


@dataclass(frozen=True)
class RunPlan:
    """What a run will do, before it does it."""

    train_examples: int
    steps_per_epoch: int
    total_steps: int
    budget: Budget
    targets: list[str]
    head_modules: list[str]
    task_type: str | None  # PEFT's task type for a causal LM ("CAUSAL_LM"), None for a classifier

    def run_info(self, cfg: TrainConfig) -> RunInfo:
        """What the run's method may know of it."""
        return RunInfo(total_steps=self.total_steps, seed=cfg.seed, rank=self.budget.rank,
                       adapter_params=self.budget.adapter_params, targets=list(self.targets),
                       modules_to_save=list(self.head_modules), lora_alpha=cfg.lora_alpha,
                       lora_dropout=cfg.lora_dropout, task_type=self.task_type, quantized=cfg.load_in_4bit)


def optimizer_steps(train_examples: int, batch_size: int, epochs: int) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps): batch_size is the global batch, the last one may be short."""
    per_epoch = math.ceil(train_examples / batch_size)
    return per_epoch, per_epoch * epochs


def resolve_head(cfg: TrainConfig) -> str:
    """--head auto: mean pooling for the sentence-embedding backbones, the architecture's own head otherwise."""
    return models.default_head(cfg.model) if cfg.head == "auto" else cfg.head


def plan_run(cfg: TrainConfig, train_examples: int, counts: models.ParamCounts, targets: list[str],
             head_modules: list[str], causal_lm: bool) -> RunPlan:
    """The plan from what is known of the data (its size) and of the backbone (its parameter counts)."""
    budget = make_budget(counts.per_rank, counts.backbone, counts.head, rank=cfg.rank, percent=cfg.budget_percent())
    per_epoch, total = optimizer_steps(train_examples, cfg.batch_size, cfg.epochs)
    return RunPlan(train_examples=train_examples, steps_per_epoch=per_epoch, total_steps=total, budget=budget,
                   targets=list(targets), head_modules=list(head_modules), task_type="CAUSAL_LM" if causal_lm else None)


def build_method(cfg: TrainConfig, plan: RunPlan) -> Method:
    """The run's method object, its settings built (and so checked) with the run's own values filled in."""
    cls = methods.get(cfg.method)
    run = plan.run_info(cfg)
    return cls(cls.make_settings(cfg.method_setting_values, run), run)


# ---- planning without training (bench, sweep) --------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _backbone_facts(model: str, head: str, kind: str, num_labels: int | None,
                    target_modules: tuple[str, ...]) -> tuple[models.ParamCounts, tuple[str, ...], tuple[str, ...]]:
    backbone, _ = models.load_backbone(model, num_labels, head, kind=kind)
    targets = models.resolve_targets(backbone, list(target_modules) or None)
    return models.count_params(backbone, targets), tuple(targets), tuple(models.head_modules(backbone))


def backbone_facts(cfg: TrainConfig, task: Any) -> tuple[models.ParamCounts, list[str], list[str]]:
    """(parameter counts, target modules, head modules) of the run's backbone; loaded once per process."""
    counts, targets, heads = _backbone_facts(cfg.model, resolve_head(cfg), task.model_kind, task.num_labels,
                                             tuple(cfg.target_modules or ()))
    return counts, list(targets), list(heads)


def plan_without_training(cfg: TrainConfig, task: Any, train_examples: int) -> RunPlan:
    """The plan of a run not yet started. The backbone is loaded (once per process) only when a budget in %
    decides the rank; with --rank the counts that matter to a method's checks (steps, rank) need no model."""
    causal = task.model_kind == models.CAUSAL_LM
    if cfg.rank is not None:
        counts = models.ParamCounts(backbone=1, head=0, per_rank=0, adapted_matrices=0)
        return plan_run(cfg, train_examples, counts, list(cfg.target_modules or []), [], causal)
    counts, targets, heads = backbone_facts(cfg, task)
    return plan_run(cfg, train_examples, counts, targets, heads, causal)
