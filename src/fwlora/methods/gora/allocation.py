"""GoRA's rank allocation (He et al., NeurIPS 2025, Sec. 3.2 and the authors' code), under LoRA's exact budget.

The paper scores each adapted matrix by I_m = avg |W_m * G_m| (elementwise; "sum" is offered too), normalises
a_m = I_m / sum_j I_j, gives each matrix the parameter share b_m = a_m * r * sum_j sqrt(d_j) of a budget counted
in sqrt(d_in + d_out) units and the rank r_m = b_m / sqrt(d_m) (d_m = d_in + d_out), rounded and clipped to
[r_min, r_max]. Rounding and clipping move the parameter count off LoRA's, either way.

Here the shape of the rule is kept, r_m proportional to a_m / sqrt(d_m) and clipped to [r_min, cap_m]
(cap_m = min(r_max, d_in, d_out)), but its level t is solved for so that the clipped ranks spend LoRA's budget
r * sum_m d_m in parameters exactly:

    x_m(t) = clip(t a_m / sqrt(d_m), r_min, cap_m),        sum_m x_m(t) d_m = r sum_m d_m

(piecewise linear and nondecreasing in t: solved exactly between its breakpoints). Integer ranks are the
floors of x_m plus one rank each, largest remainder first (ties by name), while it still fits; where matrices
of different sizes leave part of the budget unspendable one rank at a time, each matrix may then move by one
rank (a swap) so that the total is the budget exactly, at the least added sum_m |r_m - x_m| (ranks.spend_exactly;
where no such moves exist, the total stays short by less than one rank). Where even every matrix at its cap
spends less than the budget, every matrix gets its cap.

Depends on torch, math, fwlora.errors and methods/ranks.py only.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from fwlora.errors import MethodError
from fwlora.methods.ranks import round_ranks, spend_exactly

REDUCTIONS = ("mean", "sum")


@torch.no_grad()
def importance(weight: torch.Tensor, grad: torch.Tensor, reduce: str = "mean") -> float:
    """I = avg |W * G| (the paper's) or sum |W * G|, W and G both (d_out, d_in)."""
    if reduce not in REDUCTIONS:
        raise MethodError(f"importance reduce = {reduce!r}: must be one of {', '.join(REDUCTIONS)}")
    product = (weight.to(grad.dtype) * grad).abs()
    return float(product.mean() if reduce == "mean" else product.sum())


def gora_ranks(importances: Mapping[str, float], dims: Mapping[str, tuple[int, int]], rank: int, r_min: int,
               r_max: int) -> dict[str, int]:
    """{name: r_m} for the importances I_m and the (d_in, d_out) of each matrix under LoRA's budget at `rank`."""
    names = sorted(importances)
    cost = {n: int(sum(dims[n])) for n in names}
    cap = {n: min(int(r_max), *map(int, dims[n])) for n in names}
    low = {n: min(int(r_min), cap[n]) for n in names}
    budget = int(rank) * sum(cost.values())
    if any(not math.isfinite(v) or v < 0 for v in importances.values()):
        raise MethodError(f"GoRA importances must be finite and >= 0, got {dict(importances)}")
    total = sum(importances.values())
    share = {n: importances[n] / total if total > 0 else 1.0 / len(names) for n in names}
    slope = {n: share[n] / math.sqrt(cost[n]) for n in names}

    def level(t: float) -> dict[str, float]:
        return {n: min(float(cap[n]), max(float(low[n]), t * slope[n])) for n in names}

    def spend(t: float) -> float:
        return sum(x * cost[n] for n, x in level(t).items())

    if sum(low[n] * cost[n] for n in names) > budget:
        raise MethodError(f"r_min = {r_min} on every matrix costs more than LoRA's budget at rank {rank}")
    if sum(cap[n] * cost[n] for n in names) <= budget:
        return dict(cap)
    # the breakpoints of the piecewise linear spend(t): where a matrix leaves its floor or reaches its cap
    points = sorted({0.0} | {b / slope[n] for n in names if slope[n] > 0 for b in (low[n], cap[n])})
    lo_t = 0.0
    for hi_t in points:
        if spend(hi_t) >= budget:
            break
        lo_t = hi_t
    s_lo, s_hi = spend(lo_t), spend(hi_t)
    t = hi_t if s_hi == s_lo else lo_t + (budget - s_lo) * (hi_t - lo_t) / (s_hi - s_lo)
    ideal = level(t)
    return spend_exactly(round_ranks(ideal, cap, cost, budget, names), ideal, low, cap, cost, budget)

