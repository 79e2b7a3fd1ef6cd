"""OLoRA: PEFT's orthonormal (QR) initialisation."""

from fwlora.methods.olora.plugin import OLoRA

__all__ = ["OLoRA"]
