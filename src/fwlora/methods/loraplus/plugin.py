"""LoRA+ (Hayou et al. 2024), PEFT's create_loraplus_optimizer: plain LoRA trained by AdamW with B's learning rate
lr_ratio times A's. PEFT's grouping: every lora_B and every one-dimensional trained parameter at lr x ratio, the
rest (A) at lr; weight decay as the loop's, none on biases. The task head (modules_to_save) is not an adapter:
PEFT's rule would put its bias at lr x ratio, so it is moved to a group of its own that trains it exactly as
every other method's loop does (lr, the loop's weight decay)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fwlora.checks import is_real
from fwlora.errors import bad_setting
from fwlora.methods.base import with_help
from fwlora.methods.peft_lora import PeftLoRA
from fwlora.methods.registry import register


@dataclass
class LoraPlusSettings:
    lr_ratio: float = with_help(16.0, "LoRA+: B's learning rate over A's (the paper's 2^4)")

    def __post_init__(self) -> None:
        if not is_real(self.lr_ratio) or not 0 < self.lr_ratio < float("inf"):
            raise bad_setting(self, "lr_ratio", "must be a positive number")


@register
class LoraPlus(PeftLoRA):
    name, label = "loraplus", "LoRA+"
    Settings = LoraPlusSettings
    prefix = "loraplus_"
    search_space = {"loraplus_lr_ratio": {"type": "categorical", "choices": [4.0, 16.0, 64.0]}}
    colour, line_style = "crimson", ("-.", "8")

    def make_optimizer(self, model: nn.Module, lr: float, weight_decay: float, **options: Any) -> torch.optim.Optimizer:
        from peft.optimizers import create_loraplus_optimizer

        optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=self.settings.lr_ratio,
                                              loraplus_weight_decay=weight_decay, **options)
        head = [p for name, p in model.named_parameters() if p.requires_grad and ".modules_to_save." in name]
        head_ids = {id(p) for p in head}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in head_ids]
        if head:
            optimizer.add_param_group({"params": head, "lr": lr, "weight_decay": weight_decay})
        return optimizer

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "lr_ratio": self.settings.lr_ratio}
