"""The full-weight gradient of each LoRA-adapted matrix over a few training batches: what a gradient-driven
initialisation reads before training (LoRA-One, GoRA).

    G_m = (1/n) sum_{i=1..n} dL_i / dW_m      (d_out x d_in, at the pretrained W_m)

over the run's first n batches (DataPass.batches), each L_i the task's mean loss of batch i. The adapters are
those of a freshly built PEFT LoRA model whose B is zero, so the model computes the pretrained function and G_m
is full fine-tuning's gradient at step 0, as both papers take it. The frozen weights require grad only for
the pass; a post-accumulate hook folds each weight's gradient into a float32 (or float64) accumulator and drops
it at once, so one weight-sized gradient lives at a time besides the accumulators, and every other parameter's
.grad is left as it was. The model runs in train mode (dropout on), as training and both authors' code do.

Depends on torch, fwlora.errors and methods/gradients/ only.
"""

from __future__ import annotations

import torch
from torch import nn

from fwlora.errors import MethodError, NonFiniteFisherError
from fwlora.methods.base import DataPass
from fwlora.methods.gradients import average_over_processes

# why a method that reads these gradients cannot train on a 4-bit backbone (its Method.refuses_quantized)
NEEDS_WEIGHT_GRADIENTS = "it reads the gradient of each full-precision base weight, which a 4-bit backbone does not have"


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's frozen weight as (d_out, d_in) (GPT-2's Conv1D stores it transposed)."""
    weight = layer.get_base_layer().weight
    return weight.T if getattr(layer, "fan_in_fan_out", False) else weight


def weight_gradients(model: nn.Module, layers: dict[str, nn.Module], data: DataPass,
                     batches: int) -> dict[str, torch.Tensor]:
    """{layer name: G (d_out, d_in)} averaged over the first `batches` batches of `data` (and over processes)."""
    weights = {name: layer.get_base_layer().weight for name, layer in layers.items()}
    for name, w in weights.items():
        if not w.is_floating_point():
            raise MethodError(f"{name}: its base weight is {w.dtype} (quantized): a gradient-driven "
                              "initialisation needs the full-precision weight's gradient")
    acc = {name: torch.zeros(w.shape, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device)
           for name, w in weights.items()}
    held = {id(p): (p.grad, p.requires_grad) for p in model.parameters()}  # the pass must leave no trace
    was_training = model.training
    handles = []

    def fold(name: str):
        def hook(p: torch.Tensor) -> None:
            acc[name].add_(p.grad)
            p.grad = None

        return hook

    count = 0
    try:
        for name, w in weights.items():
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(fold(name)))
        model.train()
        for batch in data.batches(batches):
            data.loss(model, batch).backward()
            count += 1
    finally:
        for handle in handles:
            handle.remove()
        for p in model.parameters():
            p.grad, flag = held.get(id(p), (None, p.requires_grad))
            p.requires_grad_(flag)
        model.train(was_training)
    if count == 0:
        raise MethodError("the data pass gave no training batch: a gradient-driven initialisation needs at least one")
    grads = [acc[name] / count for name in weights]
    average_over_processes(grads)
    out = {}
    for (name, layer), g in zip(layers.items(), grads):
        if not torch.isfinite(g).all():
            raise NonFiniteFisherError(f"{name}: the initialisation's weight gradient is not finite")
        out[name] = g.T if getattr(layer, "fan_in_fan_out", False) else g
    return out
