"""The starvation guard: who is starving, in what order, and config checks."""

from __future__ import annotations

import pytest

from policies.starvation import StarvationConfig, starving
from policies.types import RequestView


def v(request_id: str, waited: int, has_run: bool = True, arrival: float = 0.0) -> RequestView:
    return RequestView(request_id, arrival, 10, 10, None, waited_iterations=waited, has_run=has_run)


def test_defaults_follow_the_paper() -> None:
    config = StarvationConfig()
    assert config.threshold_iterations == 100
    assert config.count_only_after_first_run


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_invalid_config_is_named(bad: object) -> None:
    with pytest.raises(ValueError, match="threshold_iterations"):
        StarvationConfig(threshold_iterations=bad)  # type: ignore[arg-type]


def test_invalid_flag_is_named() -> None:
    with pytest.raises(ValueError, match="count_only_after_first_run"):
        StarvationConfig(count_only_after_first_run=1)  # type: ignore[arg-type]


def test_starving_only_counts_requests_that_ran() -> None:
    views = [v("b100", 100), v("c99", 99), v("new", 500, has_run=False), v("a150", 150)]
    assert starving(views, StarvationConfig()) == ["a150", "b100"]


def test_starving_counts_everyone_when_configured() -> None:
    views = [v("b100", 100), v("c99", 99), v("new", 500, has_run=False), v("a150", 150)]
    config = StarvationConfig(count_only_after_first_run=False)
    assert starving(views, config) == ["new", "a150", "b100"]


def test_starving_ties_break_by_arrival_then_id() -> None:
    views = [v("z", 120, arrival=2.0), v("y", 120, arrival=1.0), v("x", 120, arrival=2.0)]
    assert starving(views, StarvationConfig()) == ["y", "x", "z"]


def test_threshold_is_configurable() -> None:
    assert starving([v("a", 150)], StarvationConfig(threshold_iterations=200)) == []
