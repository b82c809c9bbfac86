"""Where a draining instance's paused sessions go (`policies.migration`)."""

from __future__ import annotations

import pytest

from policies import (
    InstanceLoad,
    NoInstanceAvailable,
    PausedSession,
    drain_plan,
    make_dispatch_policy,
)
from policies.dispatch import DispatchRequest, DispatchState


def _load(instance_id: str, free: int, **kw) -> InstanceLoad:
    fields = dict(
        total_blocks=100,
        free_blocks=free,
        running=0,
        waiting=0,
        waiting_demand_blocks=0,
        paused_preserved_blocks=0,
        paused_released_blocks=0,
    )
    return InstanceLoad(instance_id, **{**fields, **kw})


def test_a_drain_spreads_its_sessions_largest_first_over_the_freest_instances() -> None:
    loads = [_load("a", 10), _load("b", 60), _load("c", 50)]
    sessions = [PausedSession("small", 5), PausedSession("big", 30), PausedSession("mid", 20)]
    # big -> b (60 free, then 30); mid -> c (50, then 30); small -> b/c tie at 30: b (by id)
    assert drain_plan("a", sessions, loads) == [("big", "b"), ("mid", "c"), ("small", "b")]


def test_a_drain_skips_unhealthy_and_draining_instances_and_says_when_none_is_left() -> None:
    loads = [_load("a", 10), _load("b", 90, healthy=False), _load("c", 80, accepting=False)]
    with pytest.raises(NoInstanceAvailable, match="no other healthy instance to drain 'a'"):
        drain_plan("a", [PausedSession("s", 1)], loads)
    assert drain_plan("a", [PausedSession("s", 1)], [*loads, _load("d", 1)]) == [("s", "d")]
    assert drain_plan("a", [], loads) == []


def test_paused_sessions_are_checked() -> None:
    with pytest.raises(ValueError, match="kv_blocks"):
        PausedSession("s", -1)
    with pytest.raises(ValueError, match="session_id"):
        PausedSession("", 1)


@pytest.mark.parametrize("policy", ["round_robin", "least_load", "session_affinity", "mars_aware"])
def test_a_draining_instance_gets_only_the_sessions_it_holds(policy: str) -> None:
    loads = [_load("a", 90, accepting=False), _load("b", 10)]
    dispatch = make_dispatch_policy(policy)
    new, _ = dispatch.choose(DispatchRequest("new", 64, None), loads, DispatchState())
    assert new.instance_id == "b"
    if policy in {"session_affinity", "mars_aware"}:
        held, _ = dispatch.choose(DispatchRequest("held", 64, "a"), loads, DispatchState())
        assert held.instance_id == "a" and held.reason == "affinity"
    with pytest.raises(NoInstanceAvailable, match="unhealthy or draining"):
        dispatch.choose(DispatchRequest("new", 64, None), loads[:1], DispatchState())
