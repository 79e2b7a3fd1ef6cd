"""fwrank's allocation rules: pure, deterministic, independent of the input dicts' order.

Every rule shares out a hard budget of adapter parameters,

    sum_m r_m (d_in + d_out) <= budget = r * sum_m (d_in + d_out)      (LoRA's adapter size at rank r)
    r_min <= r_m <= r_max                    (r_min = 0, the default: a matrix may lose its adapter)

from a signal measured during the warm-up: a spectrum per matrix (a greedy grants ranks one at a time by
gain per parameter, EVA's water-filling) or a score per matrix (ranks proportional to it, FIM-LoRA's rule).
The spectra come from the gradient (`spectrum`), from what the warm-up learned (`update`: sigma_k^2 of
dW = s B A) or from what each learned direction does to the layer's output (`energy`: sigma_k^2 E[(v_k^T x)^2],
LoRA-drop's output energy per component).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn

from fwlora.errors import MethodError


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
    ranks = {n: min(cap[n], math.floor(ideal[n])) for n in names}
    left = budget - sum(ranks[n] * cost[n] for n in names)
    for n in sorted(active, key=lambda n: (-(ideal[n] - ranks[n]), n)):
        if ranks[n] < cap[n] and cost[n] <= left:
            ranks[n] += 1
            left -= cost[n]
    return ranks


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
    dw = float(layer.scaling[adapter]) * (layer.lora_B[adapter].weight.double() @ layer.lora_A[adapter].weight.double())
    return (torch.linalg.svdvals(dw)[: int(layer.r[adapter])] ** 2).cpu().tolist()


@torch.no_grad()
def output_energy(dw: torch.Tensor, basis: torch.Tensor, basis_gram: torch.Tensor, count: int) -> list[float]:
    """sigma_k^2 E[(v_k^T x)^2] for the components sigma_k u_k v_k^T of dW (float64), largest sigma first.

    The inputs are known through `basis` (r x d_in, the adapter's A when they were seen) and
    basis_gram = sum over `count` tokens of (basis x)(basis x)^T = basis (sum x x^T) basis^T (r x r): with
    basis^T = Q R, E[(v^T x)^2] = (Q^T v)^T R^-T (basis_gram / count) R^-1 (Q^T v), exact for v in the
    row space of the basis (the right singular vectors of s B A lie in that of A). Since the u_k are
    orthonormal, sum_k of these is E ||dW x||^2, the energy the update adds to the layer's output.
    """
    if count <= 0:
        return [0.0] * min(basis.shape[0], *dw.shape)
    _, s, vh = torch.linalg.svd(dw.double(), full_matrices=False)
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
