"""widecut: LoRA trained wide, cut once to LoRA's budget (AdaLoRA's capacity without its allocation).

config.py (settings), cut.py (the library class; torch + peft + ../gradients/ + ../ranks.py), plugin.py.
"""

from fwlora.methods.widecut.config import WideCutConfig
from fwlora.methods.widecut.cut import STATE_FILE, WideCut

__all__ = ["STATE_FILE", "WideCut", "WideCutConfig"]
