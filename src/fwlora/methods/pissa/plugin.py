"""PiSSA (Meng et al. 2024), PEFT's init_lora_weights="pissa_niter_N": B0 A0 = the top r singular triplets of W
(a randomised SVD with N subspace iterations, or the exact SVD), trained on W - s B0 A0 (peft_lora.ResidualInit:
saved as a plain LoRA on W, dW measured from the start)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fwlora.checks import is_int
from fwlora.errors import bad_setting
from fwlora.methods.base import with_help
from fwlora.methods.peft_lora import ResidualInit
from fwlora.methods.registry import register


@dataclass
class PiSSASettings:
    niter: int = with_help(4, "PiSSA: subspace iterations of PEFT's randomised SVD (init pissa_niter_N, PEFT's "
                              "recommendation 4); 0: the exact SVD (init pissa)")

    def __post_init__(self) -> None:
        if not is_int(self.niter) or self.niter < 0:
            raise bad_setting(self, "niter", "must be an integer >= 0")


@register
class PiSSA(ResidualInit):
    name, label = "pissa", "PiSSA"
    Settings = PiSSASettings
    prefix = "pissa_"
    colour, line_style = "tab:pink", ("-.", "*")

    def config_fields(self) -> dict[str, Any]:
        niter = self.settings.niter
        return {"init_lora_weights": f"pissa_niter_{niter}" if niter else "pissa"}

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "niter": self.settings.niter}
