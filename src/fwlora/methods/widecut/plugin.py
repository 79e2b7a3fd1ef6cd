"""widecut as a plug-in: LoRA at a width above the budget's rank, cut once to the budget (cut.py holds the math).

Budget parity: after the cut the adapter is at most LoRA's size at the run's rank r (AdaLoRA's final budget at
target_r). Before it the model trains `width` ranks (default AdaLoRA's init_r = ceil(1.5 r)); the plug-in refuses
a width and cut time that would train more parameters on average over the run than AdaLoRA does (init_r
ranks throughout). The scaling alpha / r of every matrix is LoRA's 2 at the width and stays as it is at the cut
(alpha_pattern), so a unit of rank learns at the same speed before and after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import nn

from fwlora.errors import UserError
from fwlora.methods.base import Method, RunInfo, lora_config, short_name
from fwlora.methods.ranks import refresh_optimizer
from fwlora.methods.registry import register
from fwlora.methods.widecut.config import WideCutConfig
from fwlora.methods.widecut.cut import WideCut


@dataclass(kw_only=True)
class WideCutSettings(WideCutConfig):
    width: int | None = field(default=None, metadata={
        "help": "LoRA rank before the cut (default AdaLoRA's init_r = ceil(1.5 r)); a wider one must cut earlier: "
                "the mean trained parameters may not exceed AdaLoRA's"})

    def to_config(self) -> WideCutConfig:
        return WideCutConfig(**{f.name: getattr(self, f.name) for f in fields(WideCutConfig)})


@register
class WideCutLoRA(Method):
    name, label = "widecut", "widecut"
    Settings = WideCutSettings
    prefix = "widecut_"
    run_fields = ("target_rank",)
    search_space = {"widecut_cut_at": {"type": "categorical", "choices": [0.25, 0.5, 0.75]},
                    "widecut_rule": {"type": "categorical", "choices": ["uniform", "update"]}}
    colour, line_style = "tab:purple", (":", "X")
    rank_column = "widecut_rank"
    figures = ("ranks",)
    warmup_phase = "its wide phase"

    @classmethod
    def run_values(cls, run: RunInfo) -> dict[str, Any]:
        return {"target_rank": run.rank}

    def config(self) -> WideCutConfig:
        return self.settings.to_config().resolve(self.run.total_steps)

    def check(self) -> list[str]:
        super().check()
        s, run = self.settings, self.run
        cut_flag, width_flag = (self.flat_name(f).replace("_", "-") for f in ("cut_at", "width"))
        k, total = self.config().cut_at, run.total_steps
        if k >= total:
            given = s.cut_at if k == s.cut_at else f"{s.cut_at} ({k} steps)"
            raise UserError(f"{cut_flag} = {given} >= the run's {total} optimizer steps: the model would never be "
                            f"cut to the budget; lower --{cut_flag}")
        init_r = math.ceil(1.5 * run.rank)
        width = s.width if s.width is not None else init_r
        if width < run.rank:
            raise UserError(f"{width_flag} = {width} < the run's rank {run.rank}: nothing to cut")
        mean = (k * width + (total - k) * run.rank) / total
        if mean > init_r + 1e-9:
            raise UserError(f"{width_flag} = {width} until step {k} of {total} trains {mean:.2f} ranks on average, more "
                            f"than AdaLoRA's {init_r} (init_r at rank {run.rank}); cut earlier or train narrower")
        return []

    def build(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model

        self.width = self.settings.width or math.ceil(1.5 * self.run.rank)
        scaling = (self.run.lora_alpha / self.run.rank) if self.run.lora_alpha else 2.0
        self.lora_alpha = scaling * self.width
        return get_peft_model(model, lora_config(self.run, self.width, self.lora_alpha))

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        self.cut = WideCut(model, self.config())

    def after_optimizer_step(self, step: int) -> bool:
        return self.cut.step()  # after optimizer.step(): the cut step's update is in dW before it is cut

    def refresh_optimizer(self, optimizer: Any) -> None:
        refresh_optimizer(optimizer, self.model)

    def warmup_steps(self) -> int | None:
        return self.cut.config.cut_at

    def save_state(self, directory: Path) -> None:
        self.cut.save(directory)

    def load_state(self, directory: Path) -> bool:
        self.cut.load(directory)
        return self.cut.cut_done

    save_adapter_extras = save_state

    def log_values(self, step: int) -> dict[str, float]:
        if step + 1 != self.cut.config.cut_at or not self.cut.ranks:
            return {}
        return {f"rank/{short_name(n)}": float(r) for n, r in self.cut.ranks.items()}

    def summary(self) -> dict[str, Any]:
        c, ranks = self.cut, self.cut.ranks
        return {"lora_alpha": self.lora_alpha, "width": self.width, "rule": c.config.rule, "cut_at": c.config.cut_at,
                "budget_params": c.budget, "params": c.trained_params_over_run(self.run.total_steps),
                "final_total_rank": sum(ranks.values()) if ranks else None,
                "dropped_matrices": sum(r == 0 for r in ranks.values()) if ranks else None,
                "ranks": {short_name(n): r for n, r in ranks.items()}}

    def matrix_columns(self) -> dict[str, dict[str, float]]:
        return {"widecut_rank": {short_name(n): r for n, r in self.cut.ranks.items()}}

    def close(self) -> None:
        self.cut.remove()
