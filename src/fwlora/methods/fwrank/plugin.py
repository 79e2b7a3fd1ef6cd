"""fwrank as a plug-in: LoRA during a measuring warm-up, then Fisher-guided ranks at the same budget
(allocation.py holds the library class, rules.py the rules, resize.py the resize).

Budget parity: the allocation spends at most LoRA's adapter size at the run's rank r (also AdaLoRA's final
budget at target_r). The warm-up trains AdaLoRA's init_r = ceil(1.5 r) by default (fwrank_warmup_rank: at most
that), so both adaptive methods see the same trained budget early. The scaling alpha / r
of every matrix stays that of the warm-up, so a unit of rank learns at the same speed before and after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fwlora.errors import UserError
from fwlora.methods.base import WITHIN_LORA_TIME, Method, RunInfo, lora_config, short_name
from fwlora.methods.fwrank.allocation import FisherRankAllocation
from fwlora.methods.fwrank.config import FWRankConfig
from fwlora.methods.ranks import refresh_optimizer
from fwlora.methods.registry import register


@dataclass(kw_only=True)
class FWRankSettings(FWRankConfig):
    warmup_rank: int | None = field(default=None, metadata={
        "help": "LoRA rank during the warm-up, at most AdaLoRA's init_r = ceil(1.5 r) (the default: both adaptive "
                "methods then train the same budget early)"})

    def to_config(self) -> FWRankConfig:
        return FWRankConfig(**{f.name: getattr(self, f.name) for f in fields(FWRankConfig)})


@register
class FWRank(Method):
    name, label = "fwrank", "fwrank"
    Settings = FWRankSettings
    prefix = "fwrank_"
    run_fields = ("seed", "target_rank")
    search_space = {
        "fwrank_warmup_steps": {"type": "categorical", "choices": [100, 200, 300, 500]},
        "fwrank_r_max": {"type": "categorical", "choices": [4, 8, 16]},
    }
    colour, line_style = "tab:red", ("-.", "D")
    time_hypothesis = WITHIN_LORA_TIME
    importance_column, rank_column = "importance", "fwrank_rank"
    figures = ("ranks",)
    warmup_phase = "the Fisher warm-up"

    @classmethod
    def run_values(cls, run: RunInfo) -> dict[str, Any]:
        return {"seed": run.seed, "target_rank": run.rank}

    def config(self) -> FWRankConfig:
        """The library config with K counted in this run's optimizer steps."""
        return self.settings.to_config().resolve(self.run.total_steps)

    def check(self) -> list[str]:
        super().check()
        s, run = self.settings, self.run
        k = self.config().warmup_steps
        if k >= run.total_steps:
            given = s.warmup_steps if k == s.warmup_steps else f"{s.warmup_steps} ({k} steps)"
            raise UserError(f"fwrank-warmup-steps = {given} >= the run's {run.total_steps} optimizer steps: the ranks "
                            "would never be allocated; lower --fwrank-warmup-steps")
        init_r = math.ceil(1.5 * run.rank)
        if s.warmup_rank is not None and not 1 <= s.warmup_rank <= init_r:
            raise UserError(f"fwrank-warmup-rank = {s.warmup_rank}: must lie in [1, {init_r}] (AdaLoRA's init_r at "
                            f"rank {run.rank}), so no method trains more ranks than AdaLoRA does")
        return []

    def build(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model

        self.warmup_rank = self.settings.warmup_rank or math.ceil(1.5 * self.run.rank)
        # alpha / r = 2, as LoRA's default, at the warm-up rank (or the user's alpha at the run's rank)
        scaling = (self.run.lora_alpha / self.run.rank) if self.run.lora_alpha else 2.0
        self.lora_alpha = scaling * self.warmup_rank
        return get_peft_model(model, lora_config(self.run, self.warmup_rank, self.lora_alpha))

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        self.allocation = FisherRankAllocation(model, self.config())
        self._grad_scale: float | torch.Tensor | None = None

    def before_optimizer_step(self, step: int, grad_scale: float | torch.Tensor | None) -> None:
        self._grad_scale = grad_scale

    def after_optimizer_step(self, step: int) -> bool:
        # after optimizer.step(): the K-th update is in dW before the resize compresses it
        return self.allocation.step(grad_scale=self._grad_scale)

    def refresh_optimizer(self, optimizer: Any) -> None:
        refresh_optimizer(optimizer, self.model)

    def warmup_steps(self) -> int | None:
        return self.allocation.config.warmup_steps

    def save_state(self, directory: Path) -> None:
        self.allocation.save(directory)

    def load_state(self, directory: Path) -> bool:
        self.allocation.load(directory)
        return not self.allocation.in_warmup  # past K: the model was resized to the saved ranks

    save_adapter_extras = save_state

    @classmethod
    def continued_state(cls, model: nn.Module, adapter_dir: Path) -> FisherRankAllocation:
        return FisherRankAllocation.from_pretrained(model, adapter_dir)

    def summary(self) -> dict[str, Any]:
        a = self.allocation
        ranks = a.ranks
        return {"lora_alpha": self.lora_alpha, "warmup_rank": self.warmup_rank, "rule": a.config.rule,
                "warmup_steps": a.config.warmup_steps,
                "measure_every": a.config.measure_every,
                "budget_params": a.budget, "params": a.trained_params_over_run(self.run.total_steps),
                "final_total_rank": sum(ranks.values()) if ranks else None,
                "dropped_matrices": sum(r == 0 for r in ranks.values()) if ranks else None,
                "ranks": {short_name(n): r for n, r in ranks.items()}}

    def log_values(self, step: int) -> dict[str, float]:
        """At the resize: each matrix's new rank (for the trackers)."""
        if step + 1 != self.allocation.config.warmup_steps or not self.allocation.ranks:
            return {}
        return {f"rank/{short_name(n)}": float(r) for n, r in self.allocation.ranks.items()}

    def matrix_columns(self) -> dict[str, dict[str, float]]:
        fisher = self.allocation.fisher
        total = sum(fisher.values()) or 1.0
        columns = {"fwrank_rank": {short_name(n): r for n, r in self.allocation.ranks.items()},
                   "fisher": {short_name(n): v for n, v in fisher.items()},
                   "importance": {short_name(n): v / total for n, v in fisher.items()}}
        for signal, values in self.allocation.signals.items():  # record_signals: every rule's signal at step K
            if signal != "fisher":
                columns[f"signal_{signal}"] = {short_name(n): v for n, v in values.items()}
        return columns

    def close(self) -> None:
        self.allocation.remove()
