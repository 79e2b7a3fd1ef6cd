"""Spectral widecut as a plug-in: the two ideas the decomposition of AdaLoRA's edge and the gradient-driven
initialisations each carry, in one run, so that a bench beside LoRA, LoRA-One and widecut can say which part
of a gain is which:

- direction (LoRA-One's initialisation, ../loraone/init.py): before step 1 the adapters at the wide width w
  start from the top-w singular vectors of the mean full-weight gradient over `batches` training batches, at
  the stable scale (s B0 A0 = s [-G]_w / (gamma sigma_1));
- capacity (widecut, ../widecut/cut.py): train at width w = ceil(1.5 r) (AdaLoRA's init_r), cut once at
  `cut_at` to LoRA's budget at rank r by the truncated SVD of what each matrix learned, train on.

Budget parity is widecut's (never more mean trained parameters than AdaLoRA; LoRA's budget after the cut). The
gradient pass is read inside build(), so its seconds are the run's (timing.init_seconds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from fwlora.methods.base import TimeHypothesis, short_name
from fwlora.methods.loraone.start import SpectralStartSettings, spectral_start
from fwlora.methods.registry import register
from fwlora.methods.weight_grads import NEEDS_WEIGHT_GRADIENTS
from fwlora.methods.widecut.plugin import WideCutLoRA, WideCutSettings


@dataclass(kw_only=True)
class SpectralWideCutSettings(WideCutSettings, SpectralStartSettings):
    """widecut's settings and LoRA-One's start (its rank: the width)."""

    def __post_init__(self) -> None:
        WideCutSettings.__post_init__(self)
        SpectralStartSettings.__post_init__(self)


@register
class SpectralWideCut(WideCutLoRA):
    name, label = "specwide", "spectral widecut"
    Settings = SpectralWideCutSettings
    prefix = "specwide_"
    search_space = {"specwide_gamma": {"type": "categorical", "choices": [4.0, 16.0, 64.0]},
                    "specwide_cut_at": {"type": "categorical", "choices": [0.25, 0.5, 0.75]}}
    colour, line_style = "darkslategray", ("-.", "H")
    rank_column = "specwide_rank"
    # the goal it was built for (docs/method.md): its gain at no more than 1.01x LoRA's wall-clock time
    time_hypothesis = TimeHypothesis(1.0, limit=1.01, source="docs/method.md: spectral widecut, <= 1.01x LoRA")
    uses_data_pass = True
    refuses_quantized = NEEDS_WEIGHT_GRADIENTS

    def build(self, model: nn.Module) -> nn.Module:
        peft_model = super().build(model)  # LoRA at the width, PEFT's initialisation
        self.captured = spectral_start(peft_model, self.data_pass(), self.settings, self.width)
        return peft_model

    def summary(self) -> dict[str, Any]:
        shares = list(self.captured.values())
        return {**super().summary(), "batches": self.settings.batches, "gamma": self.settings.gamma,
                "initial_spectral_norm": self.lora_alpha / self.width / self.settings.gamma,
                "captured_mean": sum(shares) / len(shares) if shares else None}

    def matrix_columns(self) -> dict[str, dict[str, float]]:
        short = {n: short_name(n) for n in self.captured}
        return {"specwide_rank": {short[n]: r for n, r in self.cut.ranks.items() if n in short},
                "specwide_captured": {short[n]: v for n, v in self.captured.items()}}
