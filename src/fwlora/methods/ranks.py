"""Ranks under a budget, and applying them to a live PEFT LoRA model: what every rank-allocating method shares
(fwrank, widecut, GoRA). Depends on torch, peft, fwlora.errors and methods/lowrank.py (dW's SVD from its factors) only.

Allocation rules (pure, deterministic, independent of the input dicts' order) share out a hard budget of
adapter parameters,

    sum_m r_m (d_in + d_out) <= budget = r * sum_m (d_in + d_out)      (LoRA's adapter size at rank r)
    r_min <= r_m <= r_max                    (r_min = 0 lets a matrix lose its adapter)

from a signal: a spectrum per matrix (a greedy grants ranks one at a time by gain per parameter, EVA's
water-filling) or a score per matrix (ranks proportional to it, FIM-LoRA's rule). The spectra may come from the
gradient (fwrank's `spectrum`), from what training learned (`update`: sigma_k^2 of dW = s B A) or from what each
learned direction does to the layer's output (`energy`: sigma_k^2 E[(v_k^T x)^2], LoRA-drop's output energy per
component); `uniform` gives every matrix the target rank.

The resize keeps s' = s for each matrix (alpha_m = s r_m, or s sqrt(r_m) with rsLoRA, written to alpha_pattern)
and sets the adapter to the best rank-r_m approximation of dW = s B A (its SVD taken from the factors,
lowrank.py): B' = U_r S_r^1/2 / s^1/2, A' = S_r^1/2 V_r^T / s^1/2. Rank 0 puts the base layer back (as PEFT's EVA
does). The adapter config is rewritten to describe the model as it now is, so save_pretrained /
PeftModel.from_pretrained rebuild these shapes.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from fwlora.checks import is_int
from fwlora.errors import MethodError
from fwlora.lowrank import LowRank, lora_delta


# ---- allocation rules --------------------------------------------------------------------------------------

def _caps(names: Sequence[str], r_max: int | Mapping[str, int]) -> dict[str, int]:
    return {n: int(r_max[n] if isinstance(r_max, Mapping) else r_max) for n in names}


def _floor(names: Sequence[str], cap: Mapping[str, int], cost: Mapping[str, int], budget: int,
           r_min: int) -> tuple[dict[str, int], int]:
    """Every matrix's rank floor min(r_min, cap) and the budget left after it."""
    floor = {n: min(int(r_min), cap[n]) for n in names}
    left = budget - sum(floor[n] * cost[n] for n in names)
    if left < 0:
        raise MethodError(f"r_min = {r_min} on every matrix costs more than the budget {budget}")
    return floor, left


def allocate_proportional(fisher: Mapping[str, float], cost: Mapping[str, int], budget: int,
                          r_max: int | Mapping[str, int], r_min: int = 0) -> dict[str, int]:
    """r_m = t F_m with sum r_m cost_m = budget (ranks above r_max capped and the rest re-solved), then floors
    plus largest remainders (ties by name) while they fit. A matrix with F_m = 0 gets rank 0. With r_min,
    every matrix first gets its floor and the rest of the budget is shared out so above it."""
    names = sorted(fisher)
    cap = _caps(names, r_max)
    if r_min:
        floor, left = _floor(names, cap, cost, budget, r_min)
        extra = allocate_proportional(fisher, cost, left, {n: cap[n] - floor[n] for n in names})
        return {n: floor[n] + extra[n] for n in names}
    active = [n for n in names if fisher[n] > 0 and cap[n] > 0]
    capped: set[str] = set()
    t = 0.0
    while True:
        free = [n for n in active if n not in capped]
        left = budget - sum(cap[n] * cost[n] for n in capped)
        denom = sum(fisher[n] * cost[n] for n in free)
        if not free or denom <= 0:
            break
        t = left / denom
        newly = {n for n in free if t * fisher[n] >= cap[n]}
        if not newly:
            break
        capped |= newly
    ideal = {n: float(cap[n]) if n in capped else (t * fisher[n] if n in active else 0.0) for n in names}
    return round_ranks(ideal, cap, cost, budget, active)


def round_ranks(ideal: Mapping[str, float], cap: Mapping[str, int], cost: Mapping[str, int], budget: int,
                eligible: Iterable[str]) -> dict[str, int]:
    """Whole ranks from fractional ones under the budget: each rounded down (at most its cap), then what is
    left goes one rank at a time to the eligible matrices with the largest remainders (ties by name)."""
    ranks = {n: min(cap[n], math.floor(ideal[n])) for n in ideal}
    left = budget - sum(ranks[n] * cost[n] for n in ideal)
    for n in sorted(eligible, key=lambda n: (-(ideal[n] - ranks[n]), n)):
        if ranks[n] < cap[n] and cost[n] <= left:
            ranks[n] += 1
            left -= cost[n]
    return ranks


def spend_exactly(ranks: Mapping[str, int], ideal: Mapping[str, float], low: Mapping[str, int],
                  cap: Mapping[str, int], cost: Mapping[str, int], budget: int, max_states: int = 100_000) -> dict[str, int]:
    """Whole ranks that spend the budget exactly, from ranks that spend at most it: each matrix moves by at most
    one rank (within [low, cap]), choosing the moves that add the least to sum_m |r_m - ideal_m| (ties: fewer
    moves, then by name). Matrices of different sizes can make the leftover of largest-remainder rounding
    unspendable one rank at a time (MiniLM: 768 and 1,920 parameters a rank, 384 left); a swap spends it.
    Returns the ranks unchanged where no such moves reach the budget (or the search passes max_states).

    An exact subset-sum over the spend: the states are the spend moved so far, kept within a few of the largest
    matrix's cost of the target, so their number is small where matrix sizes share a large common factor."""
    names = sorted(ranks)
    left = budget - sum(ranks[n] * cost[n] for n in names)
    if left < 0:
        raise MethodError(f"ranks spend {budget - left} parameters, over the budget {budget}")
    if left == 0 or not names:
        return dict(ranks)
    reach = 4 * max(cost[n] for n in names) + left
    best: dict[int, tuple[float, int, tuple[tuple[str, int], ...]]] = {0: (0.0, 0, ())}
    for n in names:
        grown = dict(best)
        for step in (1, -1):
            r = ranks[n] + step
            if not low[n] <= r <= cap[n]:
                continue
            penalty = abs(r - ideal[n]) - abs(ranks[n] - ideal[n])
            for moved, (pen, count, moves) in best.items():
                total = moved + step * cost[n]
                if abs(total) > reach:
                    continue
                candidate = (round(pen + penalty, 12), count + 1, moves + ((n, step),))
                if total not in grown or candidate < grown[total]:
                    grown[total] = candidate
        best = grown
        if len(best) > max_states:
            return dict(ranks)
    if left not in best:
        return dict(ranks)
    out = dict(ranks)
    for n, step in best[left][2]:
        out[n] += step
    return out


def allocate_spectrum(gains: Mapping[str, Sequence[float]], cost: Mapping[str, int], budget: int,
                      r_max: int | Mapping[str, int], r_min: int = 0) -> dict[str, int]:
    """Grant ranks one at a time in order of lambda_{m,k} / cost_m (ties: name, then k), skipping a grant that
    no longer fits the budget or r_max, until nothing fits. Negative gains (round-off) count as 0. With
    r_min, every matrix starts at that floor (its first r_min eigenvalues taken) and the greedy goes on."""
    names = sorted(gains)
    cap = _caps(names, r_max)
    ranks, left = _floor(names, cap, cost, budget, r_min)
    order = []
    for n in names:
        lam = sorted((max(float(v), 0.0) for v in gains[n]), reverse=True)[: cap[n]]
        order += [(-v / cost[n], n, k) for k, v in enumerate(lam) if k >= ranks[n]]
    order.sort()
    for _, n, k in order:  # a matrix's grants come in k order; once one does not fit, none of its later ones do
        if ranks[n] == k and cost[n] <= left:
            ranks[n] += 1
            left -= cost[n]
    return ranks


@torch.no_grad()
def update_spectrum(layer: nn.Module, adapter: str) -> list[float]:
    """sigma_k^2 of the layer's learned dW = s B A (float64), largest first, one per rank of the adapter."""
    return (lora_delta(layer, adapter).singular_values()[: int(layer.r[adapter])] ** 2).cpu().tolist()


@torch.no_grad()
def output_energy(dw: LowRank, basis: torch.Tensor, basis_gram: torch.Tensor, count: int) -> list[float]:
    """sigma_k^2 E[(v_k^T x)^2] for the components sigma_k u_k v_k^T of dW = s B A (float64), largest sigma first.

    The inputs are known through `basis` (r x d_in, the adapter's A when they were seen) and
    basis_gram = sum over `count` tokens of (basis x)(basis x)^T = basis (sum x x^T) basis^T (r x r): with
    basis^T = Q R, E[(v^T x)^2] = (Q^T v)^T R^-T (basis_gram / count) R^-1 (Q^T v), exact for v in the
    row space of the basis (the right singular vectors of s B A lie in that of A). Since the u_k are
    orthonormal, sum_k of these is E ||dW x||^2, the energy the update adds to the layer's output.
    """
    if count <= 0:
        return [0.0] * min(basis.shape[0], *dw.shape)
    _, s, vh = dw.svd()
    k = min(basis.shape[0], s.numel())
    q, r = torch.linalg.qr(basis.double().T)  # (d_in, r), (r, r)
    r_inv = torch.linalg.pinv(r)
    c_q = r_inv.T @ (basis_gram.double() / count) @ r_inv  # Q^T E[x x^T] Q
    coords = vh[:k] @ q  # (k, r): each v_k in the basis Q
    energy = s[:k] ** 2 * torch.einsum("kr,rs,ks->k", coords, c_q, coords)
    return energy.clamp(min=0).cpu().tolist()


def uniform_ranks(names: Sequence[str], rank: int, cap: Mapping[str, int]) -> dict[str, int]:
    """Every matrix at the target rank (capped): capacity without allocation, the truncation control."""
    return {n: min(int(rank), int(cap[n])) for n in names}


# ---- the live resize ---------------------------------------------------------------------------------

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
    dw = lora_delta(layer, adapter)
    u, s, vh = dw.svd()  # float64, dW's r nonzero components
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
