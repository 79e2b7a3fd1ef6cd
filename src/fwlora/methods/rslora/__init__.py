"""rsLoRA: PEFT's LoRA scaled by alpha / sqrt(r)."""

from fwlora.methods.rslora.plugin import RsLoRA

__all__ = ["RsLoRA"]
