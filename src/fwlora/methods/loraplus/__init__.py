"""LoRA+: PEFT's optimizer with a higher learning rate for B."""

from fwlora.methods.loraplus.plugin import LoraPlus, LoraPlusSettings

__all__ = ["LoraPlus", "LoraPlusSettings"]
