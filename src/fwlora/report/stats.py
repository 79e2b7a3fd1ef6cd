"""The statistics behind every number of the report, and the verdicts drawn from them. Pure functions.
(Each method's claim on time is its own: methods/base.py TimeHypothesis, in the registry.)

Paired differences use a Student t interval over seeds (or budget x seed pairs when pooled); time
ratios are the median of per-seed ratios, so that a machine whose speed drifts between seeds is fair.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

CONFIDENCE = 0.95

# A method whose mean final metric lies this close (absolute) to what a constant majority-class
# predictor scores has not learned the task.
MAJORITY_TOLERANCE = 0.01


def finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and not isinstance(v, bool) and math.isfinite(v)]


def mean_std(values: Sequence[float | None]) -> dict[str, float | None]:
    """Mean and sample standard deviation (n - 1); std is None with fewer than two values."""
    v = finite(values)
    return {"n": len(v), "mean": statistics.fmean(v) if v else None,
            "std": statistics.stdev(v) if len(v) > 1 else None}


def paired_ci(diffs: Sequence[float | None], confidence: float = CONFIDENCE) -> dict[str, float | None]:
    """Mean of paired differences with its Student t interval: mean +- t_{(1+c)/2, n-1} sd / sqrt(n).

    With one pair there is no interval (low/high None); with none, mean is None too.
    """
    from scipy.stats import t as student_t

    d = finite(diffs)
    n = len(d)
    out: dict[str, float | None] = {"n": n, "mean": statistics.fmean(d) if d else None, "sd": None,
                                    "low": None, "high": None, "t_quantile": None, "confidence": confidence}
    if n > 1:
        sd = statistics.stdev(d)
        q = float(student_t.ppf(0.5 + confidence / 2, n - 1))
        half = q * sd / math.sqrt(n)
        out.update(sd=sd, t_quantile=q, low=out["mean"] - half, high=out["mean"] + half)
    return out


def per_seed_ratios(numerator: dict[Any, float | None], denominator: dict[Any, float | None]) -> dict[Any, float]:
    """{key: numerator / denominator} over the keys both have with usable (positive, finite) values."""
    out = {}
    for key, num in numerator.items():
        den = denominator.get(key)
        if num is not None and den is not None and math.isfinite(num) and math.isfinite(den) and den > 0:
            out[key] = num / den
    return out


def median_ratio(numerator: dict[Any, float | None], denominator: dict[Any, float | None]) -> dict[str, Any]:
    """The median of per-seed ratios (a pair is the same seed, task and budget: fair to a machine whose
    speed drifts between seeds), with the ratios themselves."""
    ratios = per_seed_ratios(numerator, denominator)
    return {"median": statistics.median(ratios.values()) if ratios else None, "n": len(ratios),
            "min": min(ratios.values()) if ratios else None, "max": max(ratios.values()) if ratios else None,
            "ratios": {str(k): v for k, v in ratios.items()}}


def difference_verdict(ci: dict[str, Any], a: str, b: str, unit: str = "seeds", higher_is_better: bool = True) -> str:
    """What a paired interval of (a - b) allows one to say at its confidence level. For a metric where
    lower is better (a loss), a positive difference makes a worse."""
    n = ci["n"]
    level = f"{100 * ci.get('confidence', CONFIDENCE):g} %"
    if n == 0:
        return f"no {unit if unit == 'pairs' else 'paired ' + unit}: nothing to compare"
    if n == 1:
        return f"n/a (1 paired {unit[:-1] if unit.endswith('s') else unit}: no interval)"
    above, below = ("better", "worse") if higher_is_better else ("worse", "better")
    if ci["low"] > 0:
        return f"{a} {above} than {b} at {level} ({n} {unit})"
    if ci["high"] < 0:
        return f"{a} {below} than {b} at {level} ({n} {unit})"
    return f"no difference detectable at {level} with {n} {unit}"


def at_majority(mean: float | None, majority: float | None, tolerance: float = MAJORITY_TOLERANCE) -> bool:
    """Whether a mean metric is what a constant majority-class predictor scores (within the tolerance;
    a hair of float slack so that 0.01 away counts as within)."""
    if mean is None or majority is None or not (math.isfinite(mean) and math.isfinite(majority)):
        return False
    return abs(mean - majority) <= tolerance + 1e-12
