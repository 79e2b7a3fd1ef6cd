"""fwrank: the ranks of a LoRA model re-allocated once, after a measuring warm-up, under LoRA's budget.

config.py (settings), allocation.py (the library class; torch + peft + ../gradients/ + ../ranks.py, where the
allocation rules and the live resize live, shared with widecut), plugin.py (the experiment system's hooks).
"""

from fwlora.methods.fwrank.allocation import RANK_STATE_FILE, FisherRankAllocation
from fwlora.methods.fwrank.config import FWRankConfig
from fwlora.methods.ranks import (ResizeReport, allocate_proportional, allocate_spectrum, output_energy,
                                  refresh_optimizer, resize_lora_ranks, update_spectrum)

__all__ = ["FWRankConfig", "FisherRankAllocation", "RANK_STATE_FILE", "ResizeReport", "allocate_proportional",
           "allocate_spectrum", "output_energy", "refresh_optimizer", "resize_lora_ranks", "update_spectrum"]
