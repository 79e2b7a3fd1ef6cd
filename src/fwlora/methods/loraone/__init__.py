"""LoRA-One: LoRA started from the top-r singular vectors of one full-batch gradient step, with a stable scale.

init.py (the math; torch only), plugin.py (settings and hooks; the gradient pass is ../weight_grads.py).
"""

from fwlora.methods.loraone.init import precondition_, spectral_init

__all__ = ["precondition_", "spectral_init"]
