"""Parameter budgets: % of the backbone <-> LoRA rank, and parameter counting. Pure functions.

A LoRA adapter of rank r on a d_out x d_in matrix has r (d_in + d_out) parameters, so a model's adapter
size is r * sum_m (d_in + d_out). A budget in % of the backbone maps to the rank whose adapter size is
closest to it *in ratio* (|log(actual / requested)| smallest): for roberta-base on the six matrix types
this gives ranks 1, 2 and 4 for 0.1, 0.2 and 0.5 %. A budget for which even rank 1 would be more than
twice too large is refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from fwlora.errors import UserError


def params_per_rank(shapes: Iterable[tuple[int, int]]) -> int:
    """Adapter parameters per unit of rank: sum over adapted matrices of d_in + d_out."""
    return sum(d_in + d_out for d_in, d_out in shapes)


def budget_percent(rank: int, per_rank: int, backbone_params: int) -> float:
    return 100.0 * rank * per_rank / backbone_params


def smallest_budget_percent(per_rank: int, backbone_params: int) -> float:
    """The smallest budget accepted: half of what rank 1 costs (rank 1 would overshoot it 2x)."""
    return budget_percent(1, per_rank, backbone_params) / 2


def rank_for_budget(percent: float, per_rank: int, backbone_params: int) -> int:
    """The rank whose adapter size is nearest to `percent` % of the backbone, in ratio."""
    if not math.isfinite(percent) or percent <= 0:
        raise UserError(f"budget must be a positive percentage, got {percent}")
    exact = percent / 100.0 * backbone_params / per_rank
    if exact < 0.5:
        raise UserError(
            f"budget {percent:g} % is below rank 1 on this model: rank 1 is "
            f"{budget_percent(1, per_rank, backbone_params):.3f} % of its {backbone_params:,} parameters; "
            f"the smallest budget possible is {smallest_budget_percent(per_rank, backbone_params):.3f} %"
        )
    low = max(1, math.floor(exact))
    return low + 1 if exact >= math.sqrt(low * (low + 1)) else low


@dataclass(frozen=True)
class Budget:
    """What a run spends: the adapter against the backbone, the head apart."""

    rank: int
    adapter_params: int  # rank * per_rank: LoRA's size, AdaLoRA's final (target) size up to its E vectors
    backbone_params: int
    head_params: int
    percent: float  # actual adapter_params / backbone_params, in %
    requested_percent: float | None  # --budget, if the rank came from one

    def to_dict(self) -> dict:
        return asdict(self)


def make_budget(
    per_rank: int, backbone_params: int, head_params: int, *, rank: int | None = None, percent: float | None = None
) -> Budget:
    """Resolve --rank or --budget (exactly one) into a Budget."""
    if (rank is None) == (percent is None):
        raise UserError("give exactly one of a rank (--rank) or a budget in % (--budget)")
    if rank is None:
        rank = rank_for_budget(percent, per_rank, backbone_params)
    elif rank < 1:
        raise UserError(f"rank must be >= 1, got {rank}")
    return Budget(
        rank=rank,
        adapter_params=rank * per_rank,
        backbone_params=backbone_params,
        head_params=head_params,
        percent=budget_percent(rank, per_rank, backbone_params),
        requested_percent=percent,
    )


def colliding_budgets(percents: Iterable[float], per_rank: int, backbone_params: int) -> dict[int, list[float]]:
    """Ranks that two or more of the given budgets round to (worth a warning: those runs are the same)."""
    by_rank: dict[int, list[float]] = {}
    for p in percents:
        by_rank.setdefault(rank_for_budget(p, per_rank, backbone_params), []).append(p)
    return {r: ps for r, ps in by_rank.items() if len(ps) > 1}
