"""Number and table formatting shared by the verdict lines (aggregate) and report.md (render)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any


def ok(x: Any) -> bool:
    """A finite real number (not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if ok(x) else "—"


def fmt_signed(x: Any, digits: int = 3) -> str:
    return f"{x:+.{digits}f}" if ok(x) else "—"


def fmt_ratio(x: Any, digits: int = 2) -> str:
    return f"{x:.{digits}f}x" if ok(x) else "—"


def fmt_ci(ci: dict[str, Any], digits: int = 3) -> str:
    """'+0.020 [-0.010, +0.050]'; a single pair has no interval."""
    if not ci or ci.get("n", 0) == 0:
        return "—"
    if ci["n"] == 1:
        return f"{fmt_signed(ci['mean'], digits)} [n/a, 1 pair]"
    return f"{fmt_signed(ci['mean'], digits)} [{fmt_signed(ci['low'], digits)}, {fmt_signed(ci['high'], digits)}]"


def fmt_mean_std(s: dict[str, Any], digits: int = 3) -> str:
    if not s or s.get("mean") is None:
        return "—"
    if s.get("std") is None:
        return f"{fmt(s['mean'], digits)} (1 seed)"
    return f"{fmt(s['mean'], digits)} ± {fmt(s['std'], digits)}"


def fmt_value(v: Any) -> str:
    """A setting's value as the report prints it."""
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return ",".join(str(x) for x in v)
    return "none" if v is None else str(v)


def fmt_count(v: Any) -> str:
    """A parameter count: '1,234' (a mean over steps is rounded)."""
    return f"{round(v):,}" if ok(v) else "—"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def slug(text: str) -> str:
    """A file-name-safe version of a protocol label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "protocol"
