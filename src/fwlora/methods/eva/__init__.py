"""EVA: PEFT's explained-variance initialisation and rank redistribution."""

from fwlora.methods.eva.plugin import EVA, EVASettings

__all__ = ["EVA", "EVASettings"]
