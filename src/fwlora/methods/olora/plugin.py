"""OLoRA (Büyükakyüz 2024), PEFT's init_lora_weights="olora": B0 A0 = Q_r R_r from the QR decomposition of W,
trained on W - s B0 A0 (peft_lora.ResidualInit: saved as a plain LoRA on W, dW measured from the start)."""

from __future__ import annotations

from typing import Any

from torch import nn

from fwlora.errors import UserError
from fwlora.methods.peft_lora import ResidualInit
from fwlora.methods.registry import register


@register
class OLoRA(ResidualInit):
    name, label = "olora", "OLoRA"
    colour, line_style = "teal", ("--", ">")

    def config_fields(self) -> dict[str, Any]:
        return {"init_lora_weights": "olora"}

    def prepare(self, model: nn.Module, config: Any) -> None:
        """PEFT's OLoRA takes the QR of the stored weight: a GPT-2-style Conv1D (stored transposed) would get
        factors of the wrong shape and fail at the first forward pass, so it is refused here."""
        from peft.tuners.tuners_utils import check_target_module_exists
        from transformers.pytorch_utils import Conv1D

        for name, module in model.named_modules():
            if isinstance(module, Conv1D) and check_target_module_exists(config, name):
                raise UserError(f"--method olora: PEFT's OLoRA cannot initialise {name}, a transposed Conv1D layer "
                                "(GPT-2 style); use pissa or another method on this model")
