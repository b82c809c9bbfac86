"""Where a draining instance's paused sessions go (`policies.migration`)."""

from __future__ import annotations

import pytest

from policies import (
    HeldSession,
    InstanceLoad,
    Move,
    NoInstanceAvailable,
    committed_freeness,
    drain_plan,
    make_dispatch_policy,
    make_migration_policy,
    migration_policy_names,
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
    sessions = [HeldSession("small", 5), HeldSession("big", 30), HeldSession("mid", 20)]
    # big -> b (60 free, then 30); mid -> c (50, then 30); small -> b/c tie at 30: b (by id)
    assert drain_plan("a", sessions, loads) == [("big", "b"), ("mid", "c"), ("small", "b")]


def test_a_drain_skips_unhealthy_and_draining_instances_and_says_when_none_is_left() -> None:
    loads = [_load("a", 10), _load("b", 90, healthy=False), _load("c", 80, accepting=False)]
    with pytest.raises(NoInstanceAvailable, match="no other healthy instance to drain 'a'"):
        drain_plan("a", [HeldSession("s", 1)], loads)
    assert drain_plan("a", [HeldSession("s", 1)], [*loads, _load("d", 1)]) == [("s", "d")]
    assert drain_plan("a", [], loads) == []


def test_paused_sessions_are_checked() -> None:
    with pytest.raises(ValueError, match="kv_blocks"):
        HeldSession("s", -1)
    with pytest.raises(ValueError, match="session_id"):
        HeldSession("", 1)


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


def _relocate(**params):
    return make_migration_policy("relocate_paused", **params)


def test_an_instance_under_pressure_sheds_its_paused_sessions_soonest_to_return_first() -> None:
    # a: 4 free, 20 blocks of waiting demand, 2 running: committed freeness (4 - 20) * 2 = -32
    loads = [
        _load("a", 4, running=2, waiting_demand_blocks=20, paused_preserved_blocks=40),
        _load("b", 80, running=1),
    ]
    paused = {
        "a": [
            HeldSession("late", 10, returns_in_s=30.0, on_device=True),
            HeldSession("soon", 10, returns_in_s=2.0, on_device=True),
            HeldSession("racing", 10, returns_in_s=0.1, on_device=True),
            HeldSession("unknown", 10, returns_in_s=None),
        ],
        "b": [HeldSession("stays", 10, returns_in_s=5.0)],
    }
    moves = _relocate(max_moves=2).plan(loads, paused)
    # "racing" returns before a move would land; the next two by return time
    assert moves == [Move("soon", "a", "b"), Move("late", "a", "b")]
    # freed device blocks lift the source: once its freeness is back above
    # source_below, nothing more moves
    # (4 + 10 - 20) * 2 = -12 after "soon", (24 - 20) * 2 = 8 >= -10 after "late"
    assert _relocate(max_moves=9, source_below=-10).plan(loads, paused) == moves
    assert _relocate(max_moves=9, source_below=-12).plan(loads, paused) == moves[:1]


def test_nothing_moves_without_pressure_or_without_room_elsewhere() -> None:
    session = {"a": [HeldSession("s", 10, returns_in_s=9.0)]}
    calm = [_load("a", 50), _load("b", 90)]
    assert _relocate().plan(calm, session) == []  # a's freeness 50 is not below 0
    assert _relocate(source_below=60).plan(calm, session) == [Move("s", "a", "b")]
    # b would end up no freer than a by min_gap: the move would only swap the pressure
    crowded = [_load("a", 5, waiting_demand_blocks=10), _load("b", 10, waiting_demand_blocks=10)]
    assert _relocate(min_gap=1).plan(crowded, session) == []
    # unhealthy and draining instances take nothing; a sick source is left alone
    for other in (_load("b", 90, healthy=False), _load("b", 90, accepting=False)):
        assert _relocate().plan([crowded[0], other], session) == []
    assert _relocate().plan([_load("a", 0, healthy=False), _load("b", 90)], session) == []


def test_moves_are_charged_so_that_one_round_spreads_them() -> None:
    # a's three swapped-out sessions owe 30 blocks it does not have
    loads = [_load("a", 0, paused_released_blocks=30), _load("b", 40), _load("c", 35)]
    paused = {"a": [HeldSession(f"s{i}", 10, returns_in_s=float(i + 1)) for i in range(3)]}
    assert committed_freeness(loads[0]) == -30
    # s0 -> b (b: 40 -> 30, a: -20), s1 -> c (c: 35 -> 25, a: -10), s2 -> b (a: 0)
    everything = [Move("s0", "a", "b"), Move("s1", "a", "c"), Move("s2", "a", "b")]
    assert _relocate(max_moves=3, source_below=-5).plan(loads, paused) == everything
    # a is back above -15 after two moves
    assert _relocate(max_moves=3, source_below=-15).plan(loads, paused) == everything[:2]
    assert _relocate(max_moves=1, source_below=-5).plan(loads, paused) == everything[:1]


def test_relocation_parameters_are_checked_by_name() -> None:
    assert migration_policy_names() == ("balance_running", "relocate_paused")
    for params, field in [
        ({"max_moves": 0}, "max_moves"),
        ({"min_gap": -1}, "min_gap"),
        ({"min_return_s": float("nan")}, "min_return_s"),
        ({"source_below": "low"}, "source_below"),
        ({"threshold": 1}, "threshold"),
    ]:
        with pytest.raises(ValueError, match=field):
            _relocate(**params)
    with pytest.raises(ValueError, match="unknown migration policy 'llumnix'"):
        make_migration_policy("llumnix")
    with pytest.raises(ValueError, match="returns_in_s"):
        HeldSession("s", 1, returns_in_s=-1.0)


def test_a_session_just_moved_stays_put_until_it_settles() -> None:
    """The loads lag the moves: without a wait, the next round can find the
    destination the fuller one and send the session back."""
    loads = [_load("a", 0, paused_released_blocks=20), _load("b", 80)]
    paused = {"a": [HeldSession("back", 10, returns_in_s=30.0, moved_s_ago=2.0)]}
    assert _relocate().plan(loads, paused) == []
    assert _relocate(settle_s=1.0).plan(loads, paused) == [Move("back", "a", "b")]
    with pytest.raises(ValueError, match="settle_s"):
        _relocate(settle_s=-1)
    with pytest.raises(ValueError, match="moved_s_ago"):
        HeldSession("s", 1, moved_s_ago=float("inf"))


def _balance(**params):
    return make_migration_policy("balance_running", **params)


def test_running_turns_move_live_off_the_instance_short_of_room_smallest_first() -> None:
    # a: 4 free blocks for 4 running turns (freeness 1), b: 60 free for 1 (60)
    loads = [_load("a", 4, running=4), _load("b", 60, running=1)]
    running = {
        "a": [HeldSession("big", 30), HeldSession("small", 5), HeldSession("mid", 12)],
        "b": [HeldSession("there", 3)],
    }
    paused = {"a": [HeldSession("paused", 1, returns_in_s=30.0)]}
    # Below source_below 10: small goes (a: 9 free for 3 = 3; b: 55 for 2 = 27.5),
    # then mid (a: 21 for 2 = 10.5; b: 43 for 3 = 14.3, 3.8 ahead), and a is
    # no longer below 10.
    moves = _balance(source_below=10, min_gap=2, max_moves=4).plan(loads, paused, running)
    assert moves == [Move("small", "a", "b", live=True), Move("mid", "a", "b", live=True)]
    # With the default gap of 4, mid would leave b too close behind a; big too.
    assert _balance(source_below=10, max_moves=4).plan(loads, paused, running) == moves[:1]
    assert _balance(source_below=10, min_gap=2).plan(loads, paused, running) == moves[:1]
    assert _balance().plan(loads, paused, running) == []  # freeness 1 is not below 0
    assert _balance(source_below=10).plan(loads, paused) == []  # running turns not asked for


def test_a_running_turn_moves_only_where_the_gap_stays() -> None:
    # a: 2 free for 2 running (1), b: 10 free for 1 (10)
    loads = [_load("a", 2, running=2), _load("b", 10, running=1)]
    running = {"a": [HeldSession("s", 6)]}
    # after: a 8 free for 1 (8), b 4 for 2 (2): b would be the fuller one
    assert _balance(source_below=5).plan(loads, {}, running) == []
    roomy = [loads[0], _load("b", 40, running=1)]  # b: 34 for 2 = 17, 9 ahead of a's 8
    assert _balance(source_below=5, min_gap=9).plan(roomy, {}, running) == [
        Move("s", "a", "b", live=True)
    ]
    assert _balance(source_below=5, min_gap=10).plan(roomy, {}, running) == []
    assert (
        _balance(source_below=5, settle_s=5).plan(
            roomy, {}, {"a": [HeldSession("s", 6, moved_s_ago=1.0)]}
        )
        == []
    )
    stuck = {"a": [HeldSession("s", 6, movable=False)]}  # stop strings, say
    assert _balance(source_below=5).plan(roomy, {}, stuck) == []
    draining = [loads[0], _load("b", 40, running=1, accepting=False)]
    assert _balance(source_below=5).plan(draining, {}, running) == []
    for params, field in [({"max_moves": 0}, "max_moves"), ({"settle_s": -1}, "settle_s")]:
        with pytest.raises(ValueError, match=field):
            _balance(**params)
    with pytest.raises(ValueError, match="min_return_s"):
        _balance(min_return_s=1)  # a relocate_paused parameter


def test_a_queued_turn_is_not_moved_live_and_its_demand_counts_once() -> None:
    """A turn vLLM has not scheduled holds no blocks: charging its blocks
    back to its instance would count more free blocks than there are (a
    load that cannot exist, which once made a whole round fail)."""
    # a: 24 blocks, 10 free, one turn running, a 19-block turn queued
    loads = [
        _load("a", 10, total_blocks=24, running=1, waiting=1, waiting_demand_blocks=19),
        _load("b", 24, total_blocks=24),
    ]
    running = {"a": [HeldSession("queued", 19, queued=True), HeldSession("runs", 5)]}
    # a: (10 - 19) * 1 = -9 below 0; runs goes (a: 15 - 19 = -4 for 0 running,
    # b: 19 for 1): queued stays, vLLM admits it on a once there is room.
    assert _balance(min_gap=0).plan(loads, {}, running) == [Move("runs", "a", "b", live=True)]
    assert _balance(min_gap=0).plan(loads, {}, {"a": running["a"][:1]}) == []
