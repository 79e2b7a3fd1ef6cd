"""fwrank: the ranks of a LoRA model re-allocated once, after a measuring warm-up, under LoRA's budget.

config.py (settings), rules.py (the allocation rules, pure), resize.py (the live PEFT resize and the optimizer
refresh), allocation.py (the library class; torch + peft + ../gradients.py), plugin.py (the experiment
system's hooks).
"""

from fwlora.methods.fwrank.allocation import RANK_STATE_FILE, FisherRankAllocation
from fwlora.methods.fwrank.config import FWRankConfig
from fwlora.methods.fwrank.resize import ResizeReport, refresh_optimizer, resize_lora_ranks
from fwlora.methods.fwrank.rules import allocate_proportional, allocate_spectrum, output_energy, update_spectrum

__all__ = ["FWRankConfig", "FisherRankAllocation", "RANK_STATE_FILE", "ResizeReport", "allocate_proportional",
           "allocate_spectrum", "output_energy", "refresh_optimizer", "resize_lora_ranks", "update_spectrum"]
