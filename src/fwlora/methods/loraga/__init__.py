"""LoRA-GA: PEFT's gradient-approximation initialisation."""

from fwlora.methods.loraga.plugin import LoraGA, LoraGASettings

__all__ = ["LoraGA", "LoraGASettings"]
