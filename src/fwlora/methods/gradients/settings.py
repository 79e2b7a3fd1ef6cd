"""The warm-up statistic's settings, shared by FWLoRAConfig and FWRankConfig (one definition, one check)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from fwlora.checks import is_fraction, is_int, is_real
from fwlora.errors import MethodError

DEFAULT_MEASURE_EVERY = 8


@dataclass(kw_only=True)
class WarmupConfig:
    """The warm-up statistic's settings, shared by FWLoRAConfig and FWRankConfig (one definition, one check)."""

    warmup_steps: int | float = field(default=500, metadata={
        "help": "K: optimizer steps measured in the warm-up; a number in (0, 1) is a fraction of the run's steps"})
    beta: float = field(default=0.98, metadata={"help": "EMA factor of the warm-up statistic, in (0, 1)"})
    sketch_size: int = field(default=8, metadata={
        "help": "p: columns of the Gaussian sketch of each layer's gradient (0: the exact gradient, fwrank only)"})
    measure_every: int | None = field(default=None, metadata={
        "help": "measure one warm-up step in this many (the EMA then decays by beta^k); default min(8, K), which "
                "keeps the warm-up at LoRA's cost; 1 = every step"})
    seed: int = field(default=0, metadata={"help": "seed of the sketch matrices"})

    def __post_init__(self) -> None:
        fraction = is_fraction(self.warmup_steps)
        if not fraction and (not is_int(self.warmup_steps) or self.warmup_steps < 1):
            raise self.bad("warmup_steps", "must be >= 1 (an integer: the statistic needs at least one step), or a "
                                           "fraction of the run in (0, 1)")
        if not is_real(self.beta) or not 0.0 < self.beta < 1.0:
            raise self.bad("beta", "must lie strictly between 0 and 1")
        if not is_int(self.sketch_size) or self.sketch_size < 0:
            raise self.bad("sketch_size", "must be an integer >= 0 (0: exact)")
        if self.measure_every is None and not fraction:
            self.measure_every = min(DEFAULT_MEASURE_EVERY, self.warmup_steps)
        if self.measure_every is not None and (not is_int(self.measure_every) or self.measure_every < 1
                                               or (not fraction and self.measure_every > self.warmup_steps)):
            raise self.bad("measure_every", f"must be an integer in [1, warmup_steps={self.warmup_steps}]")
        if not is_int(self.seed):
            raise self.bad("seed", "must be an integer")

    def bad(self, name: str, why: str) -> MethodError:
        return MethodError(f"{type(self).__name__}.{name} = {getattr(self, name)!r}: {why}")

    def resolve(self, total_steps: int | None):
        """This config with K counted in optimizer steps: a fraction becomes max(1, round(fraction * total_steps))."""
        if not is_fraction(self.warmup_steps):
            return self
        if total_steps is None:
            raise MethodError(f"{type(self).__name__}.warmup_steps = {self.warmup_steps} is a fraction of the run: pass "
                              "total_steps= (the run's optimizer steps) so that K can be counted")
        return replace(self, warmup_steps=max(1, round(self.warmup_steps * total_steps)))


def matches_saved(config: WarmupConfig, saved: dict[str, Any]) -> bool:
    """Whether a saved (resolved) config is this one, K aside where this one gives K as a fraction."""
    mine = asdict(config)
    if is_fraction(config.warmup_steps):
        mine = {k: v for k, v in mine.items() if k not in ("warmup_steps", "measure_every") or v is not None}
        mine.pop("warmup_steps")
        saved = {k: v for k, v in saved.items() if k in mine}
    return mine == saved


def check_reachable(warmup_steps: int, total_steps: int | None, what: str) -> None:
    """Refuse a K the run can never reach, before training starts."""
    if total_steps is not None and total_steps > 0 and warmup_steps >= total_steps:
        raise MethodError(f"warmup_steps = {warmup_steps} >= the run's {total_steps} optimizer steps: {what} would "
                          "never happen; lower warmup_steps (or give a fraction of the run, e.g. 0.25)")
