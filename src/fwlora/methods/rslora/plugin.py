"""rsLoRA (Kalajdzievski 2023), PEFT's use_rslora: LoRA whose update is scaled by alpha / sqrt(r) instead of
alpha / r, so that the rank does not shrink its learning speed. Same alpha as LoRA (2 r unless --lora-alpha)."""

from __future__ import annotations

from typing import Any

from fwlora.methods.peft_lora import PeftLoRA
from fwlora.methods.registry import register


@register
class RsLoRA(PeftLoRA):
    name, label = "rslora", "rsLoRA"
    colour, line_style = "navy", ("-", "d")

    def config_fields(self) -> dict[str, Any]:
        return {"use_rslora": True}
