"""The update an adapter layer of PEFT's holds, as its two factors where it is a product (LoRA's and
AdaLoRA's linears), so that spectra come from an r x r SVD (fwlora.lowrank) instead of the dense matrix."""

from __future__ import annotations

import torch
from torch import nn

from fwlora.lowrank import LowRank


def peft_delta(layer: nn.Module, adapter: str) -> LowRank | None:
    """PEFT's layer.get_delta_weight(adapter) as factors, where it is a product of two matrices: a LoRA linear
    (s B A, transposed where fan_in_fan_out) or AdaLoRA's SVD linear (B (A * E) s / (ranknum + 1e-5)). None for
    any other layer (a convolution, an embedding): get_delta_weight's dense matrix is the answer there."""
    from peft.tuners.adalora.layer import AdaLoraLayer

    if isinstance(layer, AdaLoraLayer):
        a = layer.lora_A[adapter]
        if not (isinstance(a, torch.Tensor) and a.dim() == 2):
            return None
        scale = float(layer.scaling[adapter]) / (float(layer.ranknum[adapter].detach()) + 1e-5)
        b, a = layer.lora_B[adapter], a * layer.lora_E[adapter]
    elif adapter in layer.lora_A and isinstance(layer.lora_A[adapter], nn.Linear) \
            and isinstance(layer.lora_B[adapter], nn.Linear):
        b, a, scale = layer.lora_B[adapter].weight, layer.lora_A[adapter].weight, float(layer.scaling[adapter])
    else:
        return None
    if getattr(layer, "fan_in_fan_out", False):
        b, a = a.T, b.T  # (B A)^T = A^T B^T
    return LowRank(b.detach(), a.detach(), scale)
