"""LoRA-One's spectral start as a reusable step: its two settings and the build step that reads the gradient
pass and writes every adapter's first factors (used by LoRA-One and by spectral widecut)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fwlora.checks import is_int, is_real
from fwlora.errors import bad_setting
from fwlora.methods.base import DataPass
from fwlora.methods.gradients import find_lora_layers
from fwlora.methods.loraone.init import spectral_init
from fwlora.methods.weight_grads import weight_gradients


@dataclass(kw_only=True)
class SpectralStartSettings:
    batches: int = field(default=4, metadata={
        "help": "training batches whose mean full-weight gradient G initialises the adapters (read before step 1, "
                "inside the timed run)"})
    gamma: float = field(default=16.0, metadata={
        "help": "the stable scale: B0 A0 = [-G]_r / (gamma sigma_1(G)) at the adapter's rank r, so the initial "
                "update's spectral norm is s / gamma (the authors' T5/GLUE setting: 16)"})

    def __post_init__(self) -> None:
        if not is_int(self.batches) or self.batches < 1:
            raise bad_setting(self, "batches", "must be an integer >= 1")
        if not is_real(self.gamma) or not 0 < self.gamma < float("inf"):
            raise bad_setting(self, "gamma", "must be a finite number > 0")


def spectral_start(peft_model: nn.Module, data: DataPass, settings: SpectralStartSettings,
                   rank: int) -> dict[str, float]:
    """Start every LoRA layer of the model from the stable split of its gradient's top-`rank` SVD; returns
    each layer's captured share of ||G||_F^2."""
    layers = find_lora_layers(peft_model)
    grads = weight_gradients(peft_model, layers, data, settings.batches)
    captured = {}
    for name, layer in layers.items():
        b0, a0, captured[name] = spectral_init(grads.pop(name), rank, settings.gamma)
        write_factors(layer, b0, a0)
    return captured


@torch.no_grad()
def write_factors(layer: nn.Module, b0: torch.Tensor, a0: torch.Tensor) -> None:
    """Put B0 (d_out x k) and A0 (k x d_in) into the layer's first k ranks; the other ranks keep PEFT's
    initialisation (random A, zero B), so they start at zero update and can still learn."""
    adapter = layer.active_adapters[0]
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    k = a0.shape[0]
    a[:k] = a0.to(a.dtype)
    b.zero_()
    b[:, :k] = b0.to(b.dtype)
