"""DoRA (Liu et al. 2024), PEFT's use_dora: W' = m (W + s B A) / ||W + s B A|| (norm per output row), a trained
magnitude m (d_out values per matrix, counted among its trained parameters) beside LoRA's direction update.

Its update is not s B A: the matrix table's dW is W' - W, W' from PEFT's own DoRA merge (merge_safe, which
returns the merged weight without writing it into the model)."""

from __future__ import annotations

from typing import Any

import torch

from fwlora.methods.peft_lora import PeftLoRA, lora_layers
from fwlora.methods.registry import register


@register
class DoRA(PeftLoRA):
    name, label = "dora", "DoRA"
    colour, line_style = "tab:brown", ("--", "p")

    def config_fields(self) -> dict[str, Any]:
        return {"use_dora": True}

    @torch.no_grad()
    def delta_weights(self, deltas: dict[str, Any]) -> dict[str, Any]:
        from peft.utils.integrations import dequantize_module_weight

        out = dict(deltas)
        for name, layer in lora_layers(self.model).items():
            variant = getattr(layer, "lora_variant", {}).get("default")
            if name not in out or variant is None:
                continue
            weight = dequantize_module_weight(layer.get_base_layer())  # as merge_safe reads it (4-bit too)
            merged = variant.merge_safe(layer, "default", weight.data)
            layer._cache_pop("default-weight_norm")  # merge_safe keeps it for an unmerge that never comes
            out[name] = (merged.float() - weight.float()).cpu()  # dense: DoRA's update is not low-rank
        return out
