"""The statistics behind every number of the report, as frozen values, and the verdicts drawn from them. Pure
functions. (Each method's claim on time is its own: methods/base.py TimeHypothesis, in the registry.)

Paired differences use a Student t interval over seeds (or budget x seed pairs when pooled); time ratios are
the median of per-seed ratios, so that a machine whose speed drifts between seeds is fair.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from fwlora.checks import is_finite_real
from fwlora.markdown import finite_values

CONFIDENCE = 0.95

# A method whose mean final metric lies this close (absolute) to what a constant majority-class
# predictor scores has not learned the task.
MAJORITY_TOLERANCE = 0.01


@dataclass(frozen=True)
class MeanStd:
    """Mean and sample standard deviation (n - 1) of the finite values among n; std needs two."""

    n: int
    mean: float | None
    std: float | None


@dataclass(frozen=True)
class PairedInterval:
    """The mean of paired differences (a - b) with its Student t interval, and the pairs it was computed
    from (`seeds[i]` is the pair of `diffs[i]`; empty where pairs are budget x seed)."""

    n: int
    mean: float | None
    sd: float | None = None
    low: float | None = None  # None with fewer than two pairs: no interval
    high: float | None = None
    t_quantile: float | None = None
    confidence: float = CONFIDENCE
    seeds: tuple[int, ...] = ()
    diffs: tuple[float, ...] = ()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PairedInterval:
        """Read back from summary.json (a pooled entry's extra keys, such as its verdict, are left out)."""
        names = {f.name for f in fields(cls)}
        kept = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
        return cls(**kept)


@dataclass(frozen=True)
class RatioSummary:
    """Per-seed ratios of one quantity (a column's time over the reference's) and their median."""

    median: float | None
    n: int
    min: float | None
    max: float | None
    ratios: Mapping[str, float] = field(default_factory=dict)  # seed -> ratio


def mean_std(values: Sequence[float | None]) -> MeanStd:
    v = finite_values(values)
    return MeanStd(len(v), statistics.fmean(v) if v else None, statistics.stdev(v) if len(v) > 1 else None)


def paired_ci(diffs: Sequence[float | None], seeds: Sequence[int] = (),
              confidence: float = CONFIDENCE) -> PairedInterval:
    """Mean of paired differences with its Student t interval: mean +- t_{(1+c)/2, n-1} sd / sqrt(n).

    With one pair there is no interval (low/high None); with none, mean is None too.
    """
    from scipy.stats import t as student_t

    d = finite_values(diffs)
    n = len(d)
    mean = statistics.fmean(d) if d else None
    pairs = {"seeds": tuple(seeds), "diffs": tuple(diffs), "confidence": confidence}
    if n < 2:
        return PairedInterval(n, mean, **pairs)
    sd = statistics.stdev(d)
    q = float(student_t.ppf(0.5 + confidence / 2, n - 1))
    half = q * sd / math.sqrt(n)
    return PairedInterval(n, mean, sd=sd, low=mean - half, high=mean + half, t_quantile=q, **pairs)


def per_seed_ratios(numerator: dict[Any, float | None],
                    denominator: dict[Any, float | None]) -> dict[Any, float]:
    """{key: numerator / denominator} over the keys both have with usable (positive, finite) values."""
    out = {}
    for key, num in numerator.items():
        den = denominator.get(key)
        if is_finite_real(num) and is_finite_real(den) and den > 0:
            out[key] = num / den
    return out


def median_ratio(numerator: dict[Any, float | None], denominator: dict[Any, float | None]) -> RatioSummary:
    """The median of per-seed ratios (a pair is the same seed, task and budget: fair to a machine whose
    speed drifts between seeds), with the ratios themselves."""
    ratios = per_seed_ratios(numerator, denominator)
    values = list(ratios.values())
    return RatioSummary(statistics.median(values) if values else None, len(values), min(values, default=None),
                        max(values, default=None), {str(k): v for k, v in ratios.items()})


def difference_verdict(ci: PairedInterval, a: str, b: str, unit: str = "seeds",
                       higher_is_better: bool = True) -> str:
    """What a paired interval of (a - b) allows one to say at its confidence level. For a metric where
    lower is better (a loss), a positive difference makes a worse."""
    level = f"{100 * ci.confidence:g} %"
    if ci.n == 0:
        return f"no {unit if unit == 'pairs' else 'paired ' + unit}: nothing to compare"
    if ci.n == 1:
        return f"n/a (1 paired {unit[:-1] if unit.endswith('s') else unit}: no interval)"
    above, below = ("better", "worse") if higher_is_better else ("worse", "better")
    if ci.low > 0:
        return f"{a} {above} than {b} at {level} ({ci.n} {unit})"
    if ci.high < 0:
        return f"{a} {below} than {b} at {level} ({ci.n} {unit})"
    return f"no difference detectable at {level} with {ci.n} {unit}"


def at_majority(mean: float | None, majority: float | None, tolerance: float = MAJORITY_TOLERANCE) -> bool:
    """Whether a mean metric is what a constant majority-class predictor scores (within the tolerance;
    a hair of float slack so that 0.01 away counts as within)."""
    if not (is_finite_real(mean) and is_finite_real(majority)):
        return False
    return abs(mean - majority) <= tolerance + 1e-12
