"""LoRA-GA (Wang et al. 2024), PEFT's init_lora_weights="lora_ga": A0 and B0 from the SVD of each adapted
matrix's full-weight gradient, so that the first step moves along full fine-tuning's, trained on W - s B0 A0
(peft_lora.ResidualInit: saved as a plain LoRA on W, dW measured from the start).

The gradient is PEFT's preprocess_loraga over the run's first `loraga_batches` training batches (the mean of
their task losses' gradients at the pretrained W, dropout on), read inside the run's timed build: the pass is
part of the method's cost.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from torch import nn

from fwlora.checks import is_int
from fwlora.errors import bad_setting
from fwlora.methods.base import with_help
from fwlora.methods.peft_lora import ResidualInit
from fwlora.methods.registry import register

DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")


@dataclass
class LoraGASettings:
    batches: int = with_help(8, "LoRA-GA: training batches whose mean gradient initialises the adapters")
    direction: str = with_help("ArB2r", "LoRA-GA: which singular vectors go to A and B (PEFT's LoraGAConfig: "
                                        + ", ".join(DIRECTIONS) + ")")
    scale: str = with_help("stable", "LoRA-GA: the initial factors' scaling (" + ", ".join(SCALES) + ")")
    stable_gamma: int = with_help(16, "LoRA-GA: gamma of the stable scaling (B0 times d_out^1/4 / sqrt(gamma))")

    def __post_init__(self) -> None:
        for name in ("batches", "stable_gamma"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise bad_setting(self, name, "must be an integer >= 1")
        if self.direction not in DIRECTIONS:
            raise bad_setting(self, "direction", "use one of " + ", ".join(DIRECTIONS))
        if self.scale not in SCALES:
            raise bad_setting(self, "scale", "use one of " + ", ".join(SCALES))


@register
class LoraGA(ResidualInit):
    name, label = "loraga", "LoRA-GA"
    Settings = LoraGASettings
    prefix = "loraga_"
    search_space = {"loraga_stable_gamma": {"type": "categorical", "choices": [4, 16, 64]}}
    colour, line_style = "darkgoldenrod", (":", "h")
    uses_data_pass = True
    refuses_quantized = ("PEFT's LoRA-GA needs full-precision weight gradients (preprocess_loraga refuses a "
                         "quantized model)")

    def config_fields(self) -> dict[str, Any]:
        from peft import LoraGAConfig

        s = self.settings
        return {"init_lora_weights": "lora_ga",
                "lora_ga_config": LoraGAConfig(direction=s.direction, scale=s.scale, stable_gamma=s.stable_gamma)}

    def prepare(self, model: nn.Module, config: Any) -> None:
        from peft import preprocess_loraga

        data = self.data_pass()

        def train_step() -> None:  # PEFT accumulates the target weights' gradients over these backward passes
            for batch in data.batches(self.settings.batches):
                data.loss(model, batch).backward()

        with warnings.catch_warnings():  # PEFT's counting hooks fire on outputs only: torch says so, each time
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            preprocess_loraga(model, config, train_step)

    def summary(self) -> dict[str, Any]:
        s = self.settings
        return {**super().summary(), "batches": s.batches, "direction": s.direction, "scale": s.scale,
                "stable_gamma": s.stable_gamma}
