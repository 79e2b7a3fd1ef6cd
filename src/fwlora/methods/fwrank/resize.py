"""fwrank's live resize of a PEFT LoRA model, and the optimizer refresh after it.

The resize keeps s' = s for each matrix (alpha_m = s r_m, or s sqrt(r_m) with rsLoRA, written to
alpha_pattern) and sets the adapter to the best rank-r_m approximation of dW = s B A:
B' = U_r S_r^1/2 / s^1/2, A' = S_r^1/2 V_r^T / s^1/2. Rank 0 puts the base layer back (as PEFT's EVA
does). The adapter config is rewritten to describe the model as it now is, so save_pretrained /
PeftModel.from_pretrained rebuild these shapes.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from fwlora.errors import MethodError
from fwlora.methods.gradients import is_int


@dataclass
class ResizeReport:
    """Which parameters (names in model.named_parameters()) survived a resize as the same tensor object."""

    kept: list[str]
    new: list[str]
    removed: list[str]
    ranks_before: dict[str, int]
    ranks_after: dict[str, int]


def lora_tuner(model: nn.Module):
    from peft.tuners.tuners_utils import BaseTuner

    for candidate in (model, getattr(model, "base_model", None)):
        if isinstance(candidate, BaseTuner):
            return candidate
    raise MethodError(f"{type(model).__name__} is not a PEFT model (wrap it with peft.get_peft_model first)")


def lora_layers_of(model: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
    """Every LoRA layer carrying this adapter outside modules_to_save wrappers, by name in `model`."""
    from peft.tuners.lora.layer import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    wrapped = [n for n, m in model.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)]
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.r
            and not any(n.startswith(w + ".") for w in wrapped)}


@torch.no_grad()
def refactor_layer(layer: nn.Module, adapter: str, r_new: int, s_new: float, config: Any) -> None:
    """Give the layer rank r_new with s_new B' A' = the best rank-r_new approximation of s B A."""
    a_old, b_mod = layer.lora_A[adapter].weight, layer.lora_B[adapter]
    dtype, device, trainable = a_old.dtype, a_old.device, a_old.requires_grad
    bias = None if b_mod.bias is None else b_mod.bias.detach().clone()
    dw = float(layer.scaling[adapter]) * (b_mod.weight.double() @ a_old.double())  # (d_out, d_in), float64
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    tol = s.max() * max(dw.shape) * torch.finfo(dtype).eps  # numerical rank as in torch.linalg.matrix_rank
    n = min(r_new, int((s > tol).sum()))  # directions copied from dW; the rest start as fresh LoRA directions
    rslora = bool(layer.use_rslora.get(adapter, False))
    dropout = layer.lora_dropout[adapter]
    cfg = copy.copy(config)
    cfg.lora_dropout = float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0
    cfg.init_lora_weights = "gaussian" if config.init_lora_weights == "gaussian" else True
    cfg.use_rslora, cfg.use_dora, cfg.lora_bias = rslora, False, bias is not None
    alpha = s_new * (math.sqrt(r_new) if rslora else r_new)
    layer.update_layer(adapter, r_new, alpha, cfg)  # fresh A (PEFT's init), B = 0
    layer.scaling[adapter] = s_new
    for mod in (layer.lora_A[adapter], layer.lora_B[adapter]):
        mod.to(device=device, dtype=dtype)  # update_layer casts to the base layer's dtype; keep the adapter's
        mod.requires_grad_(trainable)
    root = (s[:n] / s_new).sqrt()
    a_new, b_new = layer.lora_A[adapter].weight, layer.lora_B[adapter]
    a_new[:n] = (root[:, None] * vh[:n]).to(dtype)
    b_new.weight.zero_()
    b_new.weight[:, :n] = (u[:, :n] * root).to(dtype)
    if bias is not None:
        b_new.bias.copy_(bias)
    if dist.is_available() and dist.is_initialized():  # fresh rows come from each process's RNG: use rank 0's
        dist.broadcast(a_new.data, src=0)


def resize_lora_ranks(peft_model: nn.Module, ranks: Mapping[str, int], adapter_name: str = "default",
                      scaling: float | Mapping[str, float] | None = None) -> ResizeReport:
    """Resize the named LoRA layers (names as in peft_model.named_modules()) to the given ranks in place.

    scaling: the new s' (one for all, or per name); None keeps each layer's s. Rank 0 puts the base layer
    back. Layers whose rank and scaling do not change are not touched, so their parameters (and optimizer
    state) carry over. The adapter config (target_modules, rank_pattern, alpha_pattern) is rewritten to
    describe the model as it now is, so save_pretrained / PeftModel.from_pretrained rebuild these shapes.
    """
    tuner = lora_tuner(peft_model)
    config = tuner.peft_config[adapter_name]
    layers = lora_layers_of(peft_model, adapter_name)
    before = dict(peft_model.named_parameters())
    ranks_before = {n: int(m.r[adapter_name]) for n, m in layers.items()}
    for name, r_new in ranks.items():
        if name not in layers:
            raise MethodError(f"{name} is not a LoRA layer with adapter {adapter_name!r} in this model")
        if not is_int(r_new) or r_new < 0:
            raise MethodError(f"rank of {name} = {r_new!r}: must be an integer >= 0")
        layer = layers[name]
        if getattr(layer, "merged", False) or getattr(layer, "lora_variant", {}).get(adapter_name):
            raise MethodError(f"{name} is merged or uses a LoRA variant (DoRA): its update is not s B A")
        s_old = float(layer.scaling[adapter_name])
        s_new = float(scaling[name] if isinstance(scaling, Mapping) else (s_old if scaling is None else scaling))
        if r_new == layer.r[adapter_name] and s_new == s_old:
            continue
        if r_new == 0:
            parent = peft_model.get_submodule(name.rpartition(".")[0])
            setattr(parent, name.rpartition(".")[2], layer.get_base_layer())
        else:
            refactor_layer(layer, adapter_name, int(r_new), s_new, config)
    remaining = lora_layers_of(tuner.model, adapter_name)  # names relative to the base model, as PEFT keys
    if not remaining:
        raise MethodError("every LoRA layer would be removed: keep at least one rank above 0")
    config.target_modules = list(remaining)
    config.rank_pattern = {re.escape(n): int(m.r[adapter_name]) for n, m in remaining.items()}
    config.alpha_pattern = {re.escape(n): float(m.lora_alpha[adapter_name]) for n, m in remaining.items()}
    if hasattr(tuner, "targeted_module_names"):
        tuner.targeted_module_names = [n for n in tuner.targeted_module_names if n in remaining]
    after = dict(peft_model.named_parameters())
    live = lora_layers_of(peft_model, adapter_name)
    before_ids, after_ids = {id(p) for p in before.values()}, {id(p) for p in after.values()}
    return ResizeReport(
        kept=[n for n, p in after.items() if id(p) in before_ids],
        new=[n for n, p in after.items() if id(p) not in before_ids],
        removed=[n for n, p in before.items() if id(p) not in after_ids],
        ranks_before=ranks_before,
        ranks_after={n: int(live[n].r[adapter_name]) if n in live else 0 for n in layers},
    )


def refresh_optimizer(optimizer: Any, model: nn.Module, group_of: Callable[[str], int] | None = None) -> None:
    """Point the optimizer at the model's current trainable parameters after a resize.

    State of every parameter still in the model is kept (its moments carry over); state of parameters that
    left is dropped. With one param group it gets all trainable parameters in model order. With several,
    each keeps its surviving parameters and a new one joins group_of(name), or else the one group that lost
    parameters; every group is then in model order (as a fresh optimizer's would be, so that a saved
    optimizer state loads position for position). Accepts a torch optimizer or a wrapper holding it in `.optimizer` (Accelerate's).
    """
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    current = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    present = {id(p) for _, p in current}
    groups = optimizer.param_groups
    if len(groups) == 1:
        groups[0]["params"] = [p for _, p in current]
    else:
        held = {id(p) for g in groups for p in g["params"]}
        losers = [i for i, g in enumerate(groups) if any(id(p) not in present for p in g["params"])]
        for g in groups:
            g["params"] = [p for p in g["params"] if id(p) in present]
        for name, p in current:
            if id(p) in held:
                continue
            if group_of is None and len(losers) != 1:
                raise MethodError(f"cannot tell which param group the new parameter {name} belongs to: pass group_of=")
            groups[group_of(name) if group_of is not None else losers[0]]["params"].append(p)
        # each group in model order: the order an optimizer built afresh on the resized model has, so that a
        # checkpointed optimizer state (indexed by position) loads into it parameter for parameter
        position = {id(p): i for i, (_, p) in enumerate(current)}
        for g in groups:
            g["params"].sort(key=lambda p: position[id(p)])
    for p in [p for p in optimizer.state if id(p) not in present]:
        del optimizer.state[p]
