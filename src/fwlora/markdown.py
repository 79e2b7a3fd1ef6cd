"""Numbers and tables as report text: the report's tables and a method's own report section print with these,
so that every number in report.md has one format."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fwlora.checks import is_finite_real  # a bool is not a number: JSON's true must not print as 1.000


def finite_values(values: Sequence[Any]) -> list[float]:
    """The finite real numbers among values, as floats (None, NaN and non-numbers left out)."""
    return [float(v) for v in values if is_finite_real(v)]


def fmt(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if is_finite_real(x) else "—"


def fmt_signed(x: Any, digits: int = 3) -> str:
    return f"{x:+.{digits}f}" if is_finite_real(x) else "—"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)
