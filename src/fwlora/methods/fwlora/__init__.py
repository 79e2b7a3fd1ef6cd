"""FW-LoRA: plain LoRA plus a Fisher-weighted penalty on each matrix's update (docs/method.md).

config.py (settings), penalty.py (the Gram-form norm and the weights), fisher_weighted.py (the warm-up and
the penalty on a PEFT model; torch + peft + ../gradients/), plugin.py (the experiment system's hooks).
"""

from fwlora.methods.fwlora.config import FWLoRAConfig
from fwlora.methods.fwlora.fisher_weighted import STATE_FILE, FisherWeightedLoRA
from fwlora.methods.fwlora.penalty import delta_weight_sq_norm

__all__ = ["FWLoRAConfig", "FisherWeightedLoRA", "STATE_FILE", "delta_weight_sq_norm"]
