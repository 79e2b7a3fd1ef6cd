"""PiSSA: PEFT's principal-singular-vector initialisation."""

from fwlora.methods.pissa.plugin import PiSSA, PiSSASettings

__all__ = ["PiSSA", "PiSSASettings"]
