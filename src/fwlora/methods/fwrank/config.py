"""fwrank's settings; the warm-up fields are shared with FW-LoRA (methods/gradients/: WarmupConfig)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fwlora.checks import is_int
from fwlora.methods.gradients import WarmupConfig

RULES = ("spectrum", "proportional", "update", "uniform", "energy", "snr")


@dataclass(kw_only=True)
class FWRankConfig(WarmupConfig):
    """Settings of Fisher-guided rank allocation: the budget's rank, the rule and its bounds, plus the shared
    warm-up (K = warmup_steps, beta, sketch_size (0: exact), measure_every, seed)."""

    target_rank: int | None = field(default=None, metadata={
        "help": "r: the run's LoRA rank; the budget is r * sum_m (d_in + d_out). None: the adapter config's r"})
    rule: Literal["spectrum", "proportional", "update", "uniform", "energy", "snr"] = field(default="spectrum", metadata={
        "help": "'spectrum': greedy on the gradient's eigenvalues / (d_in + d_out); 'proportional': r_m proportional "
                "to F_m; 'update': the same greedy on sigma_k^2 of the learned dW = s B A (at most the warm-up rank); "
                "'energy': the greedy on sigma_k^2 E[(v_k^T x)^2], each learned direction's output energy; "
                "'snr': r_m proportional to ||E G||^2 / E ||G||^2, the gradient's consistency (what Adam's step follows); "
                "'uniform': every matrix at the target rank (the truncated SVD of dW: capacity without allocation)"})
    r_max: int = field(default=8, metadata={"help": "largest rank any one matrix may get"})
    r_min: int = field(default=0, metadata={
        "help": "smallest rank every matrix keeps, charged to the budget first; 0 lets the rule drop a matrix"})
    record_signals: bool = field(default=False, metadata={
        "help": "also measure every rule's signal (gradient spectrum, SNR, learned update, output energy) and record "
                "them per matrix: the signal check (benchmarks/signals.py); the allocation is the rule's either way"})

    def __post_init__(self) -> None:
        if self.target_rank is not None and (not is_int(self.target_rank) or self.target_rank < 1):
            raise self.bad("target_rank", "must be an integer >= 1, or None for the adapter's r")
        super().__post_init__()
        if self.rule not in RULES:
            raise self.bad("rule", "must be one of " + ", ".join(f"'{r}'" for r in RULES))
        if not is_int(self.r_max) or self.r_max < 1:
            raise self.bad("r_max", "must be an integer >= 1")
        if not is_int(self.r_min) or not 0 <= self.r_min <= self.r_max:
            raise self.bad("r_min", f"must be an integer in [0, r_max = {self.r_max}]")
        if self.target_rank is not None and self.r_min > self.target_rank:
            raise self.bad("r_min", f"must be <= target_rank = {self.target_rank}, or the floor alone would exceed the budget")
        if self.target_rank is not None and self.r_max < self.target_rank:
            raise self.bad("r_max", f"must be >= target_rank = {self.target_rank}, or the budget could never be spent")
        if not isinstance(self.record_signals, bool):
            raise self.bad("record_signals", "must be true or false")

    @property
    def needs_mean_gradient(self) -> bool:
        return self.rule == "snr" or self.record_signals

    @property
    def needs_input_energy(self) -> bool:
        return self.rule == "energy" or self.record_signals
