"""widecut's settings: when to cut, by which rule, under which budget."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from fwlora.checks import is_fraction, is_int
from fwlora.errors import MethodError, bad_setting

RULES = ("uniform", "update", "energy")


@dataclass(kw_only=True)
class WideCutConfig:
    """Train LoRA wide, cut once: at step `cut_at` every matrix is cut to its share of the budget r * sum(d_in +
    d_out) by the truncated SVD of what it learned, then training goes on at the cut shapes."""

    target_rank: int | None = field(default=None, metadata={
        "help": "r: the budget's rank (the budget is r * sum_m (d_in + d_out)); None: the adapter config's r"})
    cut_at: int | float = field(default=0.5, metadata={
        "help": "when to cut: an optimizer step, or a fraction of the run in (0, 1)"})
    rule: Literal["uniform", "update", "energy"] = field(default="uniform", metadata={
        "help": "'uniform': every matrix cut to the target rank; 'update': ranks by a greedy on the learned dW's "
                "sigma_k^2 per parameter; 'energy': the same greedy on sigma_k^2 E[(v_k^T x)^2] (each direction's "
                "output energy on the inputs of the cut step)"})
    r_max: int = field(default=8, metadata={"help": "largest rank one matrix may keep (the rules update and energy)"})

    def __post_init__(self) -> None:
        if self.target_rank is not None and (not is_int(self.target_rank) or self.target_rank < 1):
            raise bad_setting(self, "target_rank", "must be an integer >= 1, or None for the adapter's r")
        if not is_fraction(self.cut_at) and (not is_int(self.cut_at) or self.cut_at < 1):
            raise bad_setting(self, "cut_at", "must be an optimizer step >= 1, or a fraction of the run in (0, 1)")
        if self.rule not in RULES:
            raise bad_setting(self, "rule", "must be one of " + ", ".join(f"'{r}'" for r in RULES))
        if not is_int(self.r_max) or self.r_max < 1:
            raise bad_setting(self, "r_max", "must be an integer >= 1")

    def resolve(self, total_steps: int | None) -> "WideCutConfig":
        """This config with the cut counted in optimizer steps."""
        if not is_fraction(self.cut_at):
            return self
        if total_steps is None:
            raise MethodError(f"WideCutConfig.cut_at = {self.cut_at} is a fraction of the run: pass total_steps=")
        return replace(self, cut_at=max(1, round(self.cut_at * total_steps)))
