"""GoRA: per-matrix ranks from |W * G| under LoRA's budget, and B fitted to the gradient through a random A.

allocation.py (the rank rule), init.py (B0 by the pseudo-inverse; torch only), plugin.py (settings and hooks;
the gradient pass is ../weight_grads.py, the resize ../ranks.py).
"""

from fwlora.methods.gora.allocation import gora_ranks, importance
from fwlora.methods.gora.init import fit_b

__all__ = ["fit_b", "gora_ranks", "importance"]
