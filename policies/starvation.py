"""Starvation guard: requests that waited too long jump the ranking.

Size-based ranking (MARS, SJF) can postpone a large request forever while
small ones keep arriving. As in the MARS reference code, a request whose
`waited_iterations` reaches `threshold_iterations` is *starving* and goes to
the front of the admission order.

The reference code also keeps a promoted request at the front for a
quantum of iterations, because it re-ranks running requests too. vLLM's
scheduler ranks only the waiting queue: once admitted, a request runs until
it finishes or memory runs out, so there is no quantum to keep.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from policies._arrays import Flags
from policies.types import RequestColumns, RequestView


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class StarvationConfig:
    """When a waiting request counts as starving."""

    threshold_iterations: int = 100
    """Scheduler iterations of waiting after which a request is starving (paper: 100)."""
    count_only_after_first_run: bool = True
    """Only requests that have run once can starve (the reference code's rule): a
    new request has no decode progress to lose, and counting it would let a
    burst of arrivals all become starving at once."""

    def __post_init__(self) -> None:
        _check_positive_int("threshold_iterations", self.threshold_iterations)
        if not isinstance(self.count_only_after_first_run, bool):
            raise ValueError(
                "count_only_after_first_run must be a bool, "
                f"got {self.count_only_after_first_run!r}"
            )


def starving_flags(r: Any, config: StarvationConfig) -> Flags:
    """Whether a `RequestView` (or each request of a `RequestColumns`) has waited
    at least the threshold and may count at all."""
    waited_long = r.waited_iterations >= config.threshold_iterations
    return r.has_run & waited_long if config.count_only_after_first_run else waited_long


def is_starving(view: RequestView, config: StarvationConfig) -> bool:
    """Whether `view` has waited at least the threshold (and may count at all)."""
    return bool(starving_flags(view, config))


def starving_positions(
    columns: RequestColumns, config: StarvationConfig, flags: NDArray[np.bool_] | None = None
) -> NDArray[np.intp]:
    """Positions of starving requests, longest-waiting first (ties: earlier arrival,
    then id). `flags`: `starving_flags(columns, config)`, when the caller has it."""
    hungry = np.flatnonzero(starving_flags(columns, config) if flags is None else flags)
    return columns.argsort(hungry, -columns.waited_iterations[hungry], columns.arrival_s[hungry])


def starving(views: Iterable[RequestView] | RequestColumns, config: StarvationConfig) -> list[str]:
    """Ids of starving requests, longest-waiting first (ties: earlier arrival, then id)."""
    if not isinstance(views, (Sequence, RequestColumns)):
        views = list(views)
    columns = RequestColumns.of(views)
    return columns.ids_at(starving_positions(columns, config))
