"""FW-LoRA as a plug-in: LoRA plus the Fisher-weighted penalty (fisher_weighted.py holds the math).

Its settings are FWLoRAConfig's fields (names, defaults, help and checks), as training settings named
`lambda_fw` and `fw_<field>`; the sketch seed is the run's seed.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fwlora.errors import UserError
from fwlora.methods.base import WITHIN_LORA_TIME, Method, ReportView, lora_config, short_name
from fwlora.methods.fwlora.config import FWLoRAConfig
from fwlora.methods.fwlora.fisher_weighted import FisherWeightedLoRA
from fwlora.methods.fwlora.report_section import section
from fwlora.methods.lora.plugin import default_alpha
from fwlora.methods.registry import register

@dataclass(kw_only=True)
class FWLoRASettings(FWLoRAConfig):
    allow_late_penalty: bool = field(default=False, metadata={
        "help": "allow warmup_steps >= the run's optimizer steps (the penalty would never start)"})

    def to_config(self) -> FWLoRAConfig:
        return FWLoRAConfig(**{f.name: getattr(self, f.name) for f in fields(FWLoRAConfig)})


@register
class FWLoRA(Method):
    name, label = "fwlora", "FW-LoRA"
    Settings = FWLoRASettings
    prefix = "fw_"
    flat_names = {"lambda_fw": "lambda_fw", "allow_late_penalty": "allow_late_penalty"}
    run_fields = ("seed",)
    search_space = {
        "lambda_fw": {"type": "float", "low": 5e-5, "high": 5e-4, "log": True},
        "fw_warmup_steps": {"type": "categorical", "choices": [300, 500, 800]},
    }
    colour, line_style = "tab:green", (":", "^")
    time_hypothesis = WITHIN_LORA_TIME
    importance_column = "importance"
    figures = ("importance", "penalty_question")
    warmup_phase = "the Fisher warm-up"

    @classmethod
    def report_section(cls, view: ReportView) -> str | None:
        """The open question on its penalty, asked in every report (it says when a protocol cannot answer it)."""
        return section(view, cls.name)

    def config(self) -> FWLoRAConfig:
        """The library config with K counted in this run's optimizer steps."""
        return self.settings.to_config().resolve(self.run.total_steps)

    def check(self) -> list[str]:
        super().check()
        k, total = self.config().warmup_steps, self.run.total_steps
        if k < total:
            return []
        given = self.settings.warmup_steps if k == self.settings.warmup_steps else f"{self.settings.warmup_steps} ({k} steps)"
        msg = (f"fw-warmup-steps = {given} >= the run's {total} optimizer steps: "
               "the FW-LoRA penalty would never start (this run would be plain LoRA)")
        if not self.settings.allow_late_penalty:
            raise UserError(msg + "; lower --fw-warmup-steps, or pass --allow-late-penalty")
        return [msg]

    def build(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model

        self.lora_alpha = self.run.lora_alpha or default_alpha(self.run.rank)
        return get_peft_model(model, lora_config(self.run, self.run.rank, self.lora_alpha))

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        self.fw = FisherWeightedLoRA(model, self.config())  # a K past the run was allowed by check()

    def extra_loss(self) -> torch.Tensor | None:
        return self.fw.penalty()

    def before_optimizer_step(self, step: int, grad_scale: float | torch.Tensor | None) -> None:
        self.fw.step(grad_scale=grad_scale)

    def warmup_steps(self) -> int | None:
        return self.fw.config.warmup_steps

    def save_state(self, directory: Path) -> None:
        self.fw.save(directory)

    def load_state(self, directory: Path) -> bool:
        self.fw.load(directory)
        return False

    save_adapter_extras = save_state

    @classmethod
    def continued_state(cls, model: nn.Module, adapter_dir: Path) -> FisherWeightedLoRA:
        return FisherWeightedLoRA.from_pretrained(model, adapter_dir)

    def log_values(self, step: int) -> dict[str, float]:
        """At the warm-up's end: the importance of each matrix (for the trackers)."""
        if step + 1 != self.fw.config.warmup_steps or not self.fw.importance:
            return {}
        return {f"importance/{short_name(n)}": v for n, v in self.fw.importance.items()}

    def summary(self) -> dict[str, Any]:
        importance = list(self.fw.importance.values())
        return {"lora_alpha": self.lora_alpha, "warmup_steps": self.fw.config.warmup_steps,
                "measure_every": self.fw.config.measure_every,
                "importance_median": statistics.median(importance) if importance else None}

    def matrix_columns(self) -> dict[str, dict[str, float]]:
        return {"fisher": {short_name(n): v for n, v in self.fw.fisher.items()},
                "importance": {short_name(n): v for n, v in self.fw.importance.items()}}

    def close(self) -> None:
        self.fw.remove()
