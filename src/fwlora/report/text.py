"""How the report prints its statistics and settings (the number and table formats are fwlora.markdown's)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from fwlora.checks import is_finite_real
from fwlora.markdown import fmt, fmt_signed, markdown_table
from fwlora.report.stats import MeanStd, PairedInterval

__all__ = ["fmt", "fmt_ci", "fmt_count", "fmt_mean_std", "fmt_ratio", "fmt_signed", "fmt_value",
           "markdown_table", "slug"]


def fmt_ratio(x: Any, digits: int = 2) -> str:
    return f"{x:.{digits}f}x" if is_finite_real(x) else "—"


def fmt_ci(ci: PairedInterval | Mapping[str, Any] | None, digits: int = 3) -> str:
    """'+0.020 [-0.010, +0.050]'; a single pair has no interval. Also reads one as summary.json holds it."""
    if isinstance(ci, Mapping):
        ci = PairedInterval.from_json(ci) if ci else None
    if ci is None or ci.n == 0:
        return "—"
    if ci.n == 1:
        return f"{fmt_signed(ci.mean, digits)} [n/a, 1 pair]"
    return f"{fmt_signed(ci.mean, digits)} [{fmt_signed(ci.low, digits)}, {fmt_signed(ci.high, digits)}]"


def fmt_mean_std(s: MeanStd | None, digits: int = 3) -> str:
    if s is None or s.mean is None:
        return "—"
    if s.std is None:
        return f"{fmt(s.mean, digits)} (1 seed)"
    return f"{fmt(s.mean, digits)} ± {fmt(s.std, digits)}"


def fmt_value(v: Any) -> str:
    """A setting's value as the report prints it."""
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return ",".join(str(x) for x in v)
    return "none" if v is None else str(v)


def fmt_count(v: Any) -> str:
    """A parameter count: '1,234' (a mean over steps is rounded)."""
    return f"{round(v):,}" if is_finite_real(v) else "—"


def slug(text: str) -> str:
    """A file-name-safe version of a protocol label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "protocol"
