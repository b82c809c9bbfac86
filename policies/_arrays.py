"""Helpers that let one formula serve a Python scalar and a numpy column alike.

The policy formulas (`cost_model`, `memory`, `waste`, `starvation`) are
written once, with operators that behave the same on Python numbers and on
numpy arrays (+, -, *, /, //, <, &, |). What operators cannot express, a
branch or a check, goes through these helpers: on scalars they stay plain
Python (no numpy call on the scalar hot path), on arrays they act per element.
"""

from __future__ import annotations

from typing import Any, TypeAlias, TypeVar

import numpy as np
from numpy.typing import NDArray

Ints: TypeAlias = "int | NDArray[np.int64]"
"""Token counts: one request's, or a column of them."""
Floats: TypeAlias = "float | NDArray[np.float64]"
"""Seconds or areas: one request's, or a column of them."""
Flags: TypeAlias = "bool | NDArray[np.bool_]"
"""One request's flag, or a column of them."""

_Arrays = TypeVar("_Arrays", bound=tuple[Any, ...])


def where(cond: Any, if_true: Any, if_false: Any) -> Any:
    """`if_true if cond else if_false`, per element when `cond` is an array.

    Both branches are evaluated by the caller, so each must be valid for
    every element (it is: the formulas are total on valid inputs).
    """
    if isinstance(cond, np.ndarray):
        return np.where(cond, if_true, if_false)
    return if_true if cond else if_false


def floor_at(values: Any, low: Any) -> Any:
    """`max(values, low)`, per element when `values` is an array (one call, where
    `where(values < low, low, values)` takes three)."""
    if isinstance(values, np.ndarray):
        return np.maximum(values, low)
    return max(values, low)


def smaller(a: Any, b: Any) -> Any:
    """`b if b < a else a`, per element when either is an array: `np.minimum`,
    one call for what `where(b < a, b, a)` does in two. Callers compare the
    result only, and never pass NaN (wastes come from validated inputs), so
    `np.minimum`'s own picks (the sign of a zero tie, NaN) cannot matter."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.minimum(a, b)
    return b if b < a else a


def first_negative(values: Any) -> Any | None:
    """The first value below zero (NaN is not), as a Python scalar; None if none.

    On an array this costs one reduction when nothing is negative.
    """
    if isinstance(values, np.ndarray):
        if values.size == 0 or not np.fmin.reduce(values) < 0:
            return None
        return values[int(np.argmax(values < 0))].item()
    return values if values < 0 else None


def first_outside(values: Any, low: float, high: float) -> Any | None:
    """The first value not in [low, high) (NaN is outside), as a Python scalar;
    None if all are inside. On an array this costs two reductions when all are."""
    if isinstance(values, np.ndarray):
        # minimum / maximum propagate NaN, and NaN fails both comparisons.
        if values.size == 0 or (
            low <= np.minimum.reduce(values) and np.maximum.reduce(values) < high
        ):
            return None
        inside = (values >= low) & (values < high)
        return values[int(np.argmin(inside))].item()
    return None if low <= values < high else values


def read_only(arrays: _Arrays) -> _Arrays:
    """`arrays` (a tuple of numpy arrays), each made read-only: for a value that
    `RequestColumns.memo` hands to every caller."""
    for array in arrays:
        array.flags.writeable = False
    return arrays
