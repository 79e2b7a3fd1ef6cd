"""DoRA: PEFT's weight-decomposed LoRA."""

from fwlora.methods.dora.plugin import DoRA

__all__ = ["DoRA"]
