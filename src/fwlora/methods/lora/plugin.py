"""Plain LoRA (PEFT's): the reference every other method is compared with and timed against."""

from __future__ import annotations

from torch import nn

from fwlora.methods.base import REFERENCE, Method, lora_config
from fwlora.methods.registry import register


def default_alpha(rank: int) -> float:
    """alpha = 2 r: a scaling alpha / r of 2 at every rank."""
    return 2.0 * rank


@register
class LoRA(Method):
    name, label = "lora", "LoRA"
    ships_with = "peft"
    colour, line_style, role = "tab:blue", ("-", "o"), REFERENCE

    def build(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model

        self.lora_alpha = self.run.lora_alpha or default_alpha(self.run.rank)
        return get_peft_model(model, lora_config(self.run, self.run.rank, self.lora_alpha))

    def summary(self) -> dict:
        return {"lora_alpha": self.lora_alpha}
