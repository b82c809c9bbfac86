"""Starvation guard: requests that waited too long jump the ranking.

Size-based ranking (MARS, SJF) can postpone a large request forever while
small ones keep arriving. As in the MARS reference code, a request whose
`waited_iterations` reaches `threshold_iterations` is *starving* and goes to
the front of the admission order.

The quantum is enforced by the caller (the engine scheduler), because it
needs state across iterations that a pure function does not keep: once a
starving request is promoted, the engine keeps it at the front for
`quantum_iterations` iterations (even though its `waited_iterations` resets
when it runs), then returns it to its ranked place.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from policies.types import RequestView


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class StarvationConfig:
    """When a waiting request counts as starving, and for how long it is promoted."""

    threshold_iterations: int = 100
    """Scheduler iterations of waiting after which a request is starving (paper: 100)."""
    quantum_iterations: int = 10
    """Iterations a promoted request keeps its place at the front (engine-enforced)."""
    count_only_after_first_run: bool = True
    """Only requests that have run once can starve (the reference code's rule): a
    new request has no decode progress to lose, and counting it would let a
    burst of arrivals all become starving at once."""

    def __post_init__(self) -> None:
        _check_positive_int("threshold_iterations", self.threshold_iterations)
        _check_positive_int("quantum_iterations", self.quantum_iterations)
        if not isinstance(self.count_only_after_first_run, bool):
            raise ValueError(
                "count_only_after_first_run must be a bool, "
                f"got {self.count_only_after_first_run!r}"
            )


def is_starving(view: RequestView, config: StarvationConfig) -> bool:
    """Whether `view` has waited at least the threshold (and may count at all)."""
    if config.count_only_after_first_run and not view.has_run:
        return False
    return view.waited_iterations >= config.threshold_iterations


def starving(views: Iterable[RequestView], config: StarvationConfig) -> list[str]:
    """Ids of starving requests, longest-waiting first (ties: earlier arrival, then id)."""
    hungry = [v for v in views if is_starving(v, config)]
    hungry.sort(key=lambda v: (-v.waited_iterations, v.arrival_s, v.request_id))
    return [v.request_id for v in hungry]
