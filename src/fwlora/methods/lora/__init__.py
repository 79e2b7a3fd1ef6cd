"""Plain LoRA: the reference."""

from fwlora.methods.lora.plugin import LoRA, default_alpha

__all__ = ["LoRA", "default_alpha"]
