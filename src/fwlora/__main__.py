"""`python -m fwlora ...` (also what torchrun and accelerate launch run with -m fwlora)."""

from fwlora.cli import entry

entry()
