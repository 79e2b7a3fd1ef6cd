"""Type checks of user-given settings, shared by every layer (pure Python: the method math imports it too).

bool is a subclass of int in Python, so `isinstance(True, int)` holds; a setting such as `rank = true` in a
JSON file must still be refused as a number, hence the explicit exclusions below.
"""

from __future__ import annotations

import math
from typing import Any


def is_int(value: Any) -> bool:
    """An integer, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """An int or a float (NaN and inf included), not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_real(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return is_real(value) and math.isfinite(value)


def is_fraction(value: Any) -> bool:
    """A float strictly between 0 and 1: a share of a run or of a dataset, not a count."""
    return isinstance(value, float) and 0.0 < value < 1.0
