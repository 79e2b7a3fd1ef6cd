"""Where the statistic catches a layer's input x and output gradient g: a forward hook on the LoRA layer that
hangs a tensor hook on its output (autograd's weight gradients are never touched)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


class GradientHooks:
    """Forward hooks on LoRA layers that hand (layer name, input x, output gradient g) to `fold` during the
    backward pass of every forward pass run while `measuring()` is true."""

    def __init__(self, layers: dict[str, nn.Module], measuring: Callable[[], bool],
                 fold: Callable[[str, torch.Tensor, torch.Tensor], None]):
        self.layers, self.measuring, self.fold = layers, measuring, fold
        self._handles: list[Any] = []

    def attach(self) -> None:
        if not self._handles:
            self._handles = [layer.register_forward_hook(self._hook(name, layer))
                             for name, layer in self.layers.items()]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str, layer: nn.Module):
        # Hooked on the LoRA layer, not its frozen base: the base output needs no grad when nothing
        # upstream does (the first layer), while the layer's output always does; both get the same g.
        def forward_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not (torch.is_grad_enabled() and output.requires_grad and self.measuring()):
                return
            if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
                return
            x = inputs[0].detach()
            output.register_hook(lambda g: self.fold(name, x, g))

        return forward_hook
