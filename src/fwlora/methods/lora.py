"""Plain LoRA: the reference every other method is compared with."""

from __future__ import annotations

from torch import nn

from fwlora.methods import register
from fwlora.methods.base import Method, lora_config


def default_alpha(rank: int) -> float:
    """alpha = 2 r: a scaling alpha / r of 2 at every rank."""
    return 2.0 * rank


@register
class LoRA(Method):
    name, label = "lora", "LoRA"

    def build(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model

        self.lora_alpha = self.run.lora_alpha or default_alpha(self.run.rank)
        return get_peft_model(model, lora_config(self.run, self.run.rank, self.lora_alpha))

    def summary(self) -> dict:
        return {"lora_alpha": self.lora_alpha}
