"""LoRA-One as a plug-in: LoRA at the run's rank whose A and B start from the top-r singular vectors of one
full-batch gradient step (init.py holds the math, ../weight_grads.py the gradient pass).

Budget parity: the adapter is LoRA's at the run's rank r, the scaling LoRA's (alpha / r = 2, or the user's
alpha); only the starting point differs (and, with --loraone-preconditioner riemannian, the gradient the
optimizer sees). The gradient pass reads the run's first `batches` training batches inside build(), so its
cost is the run's (the loop times build where a method reads data).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from fwlora.checks import is_real
from fwlora.errors import bad_setting
from fwlora.methods.base import Method, lora_config, short_name
from fwlora.methods.gradients import find_lora_layers
from fwlora.methods.loraone.init import precondition_
from fwlora.methods.loraone.start import SpectralStartSettings, spectral_start
from fwlora.methods.registry import register
from fwlora.methods.weight_grads import NEEDS_WEIGHT_GRADIENTS

PRECONDITIONERS = ("none", "riemannian")


@dataclass(kw_only=True)
class LoRAOneSettings(SpectralStartSettings):
    preconditioner: Literal["none", "riemannian"] = field(default="none", metadata={
        "help": "'riemannian': multiply the gradients of A and B by (B^T B + eps I)^-1 and (A A^T + eps I)^-1 before "
                "each optimizer step, as the paper's full algorithm does; 'none': plain LoRA updates"})
    precondition_eps: float = field(default=1e-6, metadata={
        "help": "eps of the preconditioner's (B^T B + eps I) and (A A^T + eps I)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.preconditioner not in PRECONDITIONERS:
            raise bad_setting(self, "preconditioner", "must be one of " + ", ".join(f"'{p}'" for p in PRECONDITIONERS))
        if not is_real(self.precondition_eps) or not 0 < self.precondition_eps < float("inf"):
            raise bad_setting(self, "precondition_eps", "must be a finite number > 0")


@register
class LoRAOne(Method):
    name, label = "loraone", "LoRA-One"
    Settings = LoRAOneSettings
    prefix = "loraone_"
    search_space = {"loraone_gamma": {"type": "categorical", "choices": [4.0, 16.0, 64.0]},
                    "loraone_preconditioner": {"type": "categorical", "choices": list(PRECONDITIONERS)}}
    colour, line_style = "tab:cyan", ("--", "v")
    uses_data_pass = True
    refuses_quantized = NEEDS_WEIGHT_GRADIENTS

    def build(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model

        self.lora_alpha = self.run.lora_alpha or 2.0 * self.run.rank  # LoRA's default: s = alpha / r = 2
        peft_model = get_peft_model(model, lora_config(self.run, self.run.rank, self.lora_alpha))
        self.captured = spectral_start(peft_model, self.data_pass(), self.settings, self.run.rank)
        return peft_model

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        self.layers = find_lora_layers(model) if self.settings.preconditioner != "none" else {}

    def before_optimizer_step(self, step: int, grad_scale: float | torch.Tensor | None) -> None:
        # after clipping, on the unscaled .grad; an fp16 overflow stays non-finite and the scaler skips the step
        for layer in self.layers.values():
            adapter = layer.active_adapters[0]
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            precondition_(a.detach(), b.detach(), a.grad, b.grad, self.settings.precondition_eps)

    def summary(self) -> dict[str, Any]:
        s = self.settings
        shares = list(self.captured.values())
        return {"lora_alpha": self.lora_alpha, "batches": s.batches, "gamma": s.gamma,
                "preconditioner": s.preconditioner, "initial_spectral_norm": self.lora_alpha / self.run.rank / s.gamma,
                "captured_mean": sum(shares) / len(shares) if shares else None}

    def matrix_columns(self) -> dict[str, dict[str, float]]:
        return {"loraone_captured": {short_name(n): v for n, v in self.captured.items()}}
