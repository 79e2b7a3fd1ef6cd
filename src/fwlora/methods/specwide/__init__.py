"""Spectral widecut (ours): widecut's train-wide-cut-once, started from LoRA-One's spectral initialisation."""

from fwlora.methods.specwide.plugin import SpectralWideCut, SpectralWideCutSettings

__all__ = ["SpectralWideCut", "SpectralWideCutSettings"]
