"""Instance dispatch: each policy on hand-computed loads, state threading,
health, ties, validation and the registry."""

from __future__ import annotations

import dataclasses
import itertools
import math
import pickle
import subprocess
import sys

import pytest

from policies import (
    DispatchDecision,
    DispatchRequest,
    DispatchState,
    InstanceLoad,
    NoInstanceAvailable,
    charge_placement,
    dispatch_policy_names,
    make_dispatch_policy,
)
from policies.dispatch import llumnix_freeness, mars_aware_score, returning_blocks

START = DispatchState()


def load(
    instance_id: str,
    free: int,
    running: int = 1,
    demand: int = 0,
    preserved: int = 0,
    released: int = 0,
    backlog: float = 0.0,
    healthy: bool = True,
    total: int = 100,
    returns: tuple[tuple[float, int], ...] = (),
) -> InstanceLoad:
    return InstanceLoad(
        instance_id=instance_id,
        total_blocks=total,
        free_blocks=free,
        running=running,
        waiting=1 if demand else 0,
        waiting_demand_blocks=demand,
        paused_preserved_blocks=preserved,
        paused_released_blocks=released,
        predicted_backlog=backlog,
        healthy=healthy,
        paused_returns=returns,
    )


def req(affinity: str | None = None, session: str | None = "s1") -> DispatchRequest:
    return DispatchRequest(session_id=session, prompt_tokens=100, affinity_instance=affinity)


def choose(name: str, loads: list[InstanceLoad], request: DispatchRequest | None = None, **params):  # type: ignore[no-untyped-def]
    decision, _ = make_dispatch_policy(name, **params).choose(request or req(), loads, START)
    return decision


# --- registry -----------------------------------------------------------------


def test_registry_names() -> None:
    assert dispatch_policy_names() == (
        "least_load",
        "mars_aware",
        "round_robin",
        "session_affinity",
    )


def test_unknown_policy_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown dispatch policy 'random'") as info:
        make_dispatch_policy("random")
    for name in dispatch_policy_names():
        assert name in str(info.value)


@pytest.mark.parametrize("name", ["round_robin", "least_load", "session_affinity", "mars_aware"])
def test_unknown_parameter_is_named(name: str) -> None:
    with pytest.raises(ValueError, match="bogus"):
        make_dispatch_policy(name, bogus=1)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0.1"])
def test_invalid_backlog_weight_is_named(bad: object) -> None:
    with pytest.raises(ValueError, match="backlog_weight"):
        make_dispatch_policy("mars_aware", backlog_weight=bad)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), True, "5"])
def test_invalid_return_horizon_is_named(bad: object) -> None:
    with pytest.raises(ValueError, match=r"return_horizon_s must be a finite number > 0"):
        make_dispatch_policy("mars_aware", return_horizon_s=bad)


@pytest.mark.parametrize("bad", ["nope", "session_affinity", 3])
def test_invalid_fallback_is_named(bad: object) -> None:
    with pytest.raises(ValueError, match="fallback") as info:
        make_dispatch_policy("session_affinity", fallback=bad)
    if bad == "nope":
        assert "least_load" in str(info.value)


def test_policies_are_frozen_and_comparable() -> None:
    policy = make_dispatch_policy("session_affinity", fallback="round_robin")
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.fallback = "least_load"  # type: ignore[attr-defined, misc]
    assert policy == make_dispatch_policy("session_affinity", fallback="round_robin")
    assert hash(policy) == hash(make_dispatch_policy("session_affinity", fallback="round_robin"))


# --- round_robin --------------------------------------------------------------


def test_round_robin_cycles_in_id_order_threading_state() -> None:
    policy = make_dispatch_policy("round_robin")
    loads = [load("c", 10), load("a", 90), load("b", 50)]
    state = START
    chosen = []
    for _ in range(5):
        decision, state = policy.choose(req(), loads, state)
        chosen.append(decision.instance_id)
    assert chosen == ["a", "b", "c", "a", "b"]
    assert state == DispatchState(last_instance="b")
    assert DispatchState() == START  # the input state is never changed


def test_round_robin_skips_unhealthy_and_survives_membership_changes() -> None:
    policy = make_dispatch_policy("round_robin")
    decision, state = policy.choose(req(), [load("a", 1), load("b", 1), load("c", 1)], START)
    assert decision.instance_id == "a"
    # b fails: the turn goes to c, not back to a.
    sick_b = [load("a", 1), load("b", 1, healthy=False), load("c", 1)]
    decision, state = policy.choose(req(), sick_b, state)
    assert decision.instance_id == "c"
    # c leaves and b recovers: wrap around to a, then b.
    decision, state = policy.choose(req(), [load("a", 1), load("b", 1)], state)
    assert decision.instance_id == "a"
    decision, state = policy.choose(req(), [load("a", 1), load("b", 1)], state)
    assert decision.instance_id == "b"
    assert decision.reason == "round_robin"


def test_round_robin_ignores_affinity() -> None:
    decision = choose("round_robin", [load("a", 1), load("b", 1)], req(affinity="b"))
    assert decision.instance_id == "a"


# --- least_load ---------------------------------------------------------------


def test_llumnix_freeness_by_hand() -> None:
    assert llumnix_freeness(load("x", free=50, running=4, demand=10)) == 10.0
    assert llumnix_freeness(load("x", free=30, running=2)) == 15.0
    assert llumnix_freeness(load("x", free=20, running=0)) == 20.0  # max(1, running)
    assert llumnix_freeness(load("x", free=5, running=0, demand=20)) == -15.0
    assert llumnix_freeness(load("x", free=5, running=3, demand=20)) == -45.0  # deficit x 3
    # Paused sessions' blocks play no part in Llumnix's freeness.
    assert llumnix_freeness(load("x", free=30, running=2, preserved=40, released=30)) == 15.0


def test_least_load_picks_highest_freeness() -> None:
    loads = [
        load("a", free=50, running=4, demand=10),  # (50 - 10) / 4 = 10
        load("b", free=30, running=2),  # 30 / 2 = 15
        load("c", free=20, running=0),  # 20 / 1 = 20
        load("d", free=90, running=9, demand=85),  # 5 / 9
    ]
    decision = choose("least_load", loads)
    assert decision == DispatchDecision("c", "least_load: freeness 20")


def test_least_load_returns_state_unchanged() -> None:
    state = DispatchState(last_instance="z")
    _, out = make_dispatch_policy("least_load").choose(req(), [load("a", 1)], state)
    assert out == state


# --- mars_aware ---------------------------------------------------------------


def test_mars_aware_score_by_hand() -> None:
    # (40 - 10 - 20) / 2 = 5; backlog 6400 token*s / 32 = 200 block*s; 5 - 0.01 * 200 = 3.
    x = load("x", free=40, running=2, demand=10, preserved=30, released=20, backlog=6400.0)
    assert mars_aware_score(x, 0.01, 5.0) == pytest.approx(3.0)
    assert mars_aware_score(x, 0.0, 5.0) == pytest.approx(5.0)


def test_least_load_and_mars_aware_disagree_over_released_blocks() -> None:
    loads = [
        # Llumnix: 40 / 2 = 20. MARS-aware: (40 - 30) / 2 = 5 (30 blocks come back).
        load("a", free=40, running=2, released=30),
        # Both: 30 / 2 = 15.
        load("b", free=30, running=2),
    ]
    assert choose("least_load", loads).instance_id == "a"
    decision = choose("mars_aware", loads)
    assert decision.instance_id == "b"
    assert decision.reason == "mars_aware (no affinity instance): score 15"


def test_mars_aware_counts_preserved_blocks_as_used_not_reclaimable() -> None:
    # Same free blocks; a's 60 preserved blocks are already outside free_blocks
    # and are not added back, so the two tie and the smaller id wins.
    loads = [load("b", free=20, preserved=0), load("a", free=20, preserved=60)]
    assert choose("mars_aware", loads).instance_id == "a"
    assert mars_aware_score(loads[0], 0.0, 5.0) == mars_aware_score(loads[1], 0.0, 5.0) == 20.0


def test_mars_aware_backlog_weight_trades_against_freeness() -> None:
    loads = [
        load("a", free=40, backlog=3200.0),  # 3200 / 32 = 100 block*s
        load("b", free=38),
    ]
    # weight 0.01: a = 40 - 1 = 39 > b = 38.
    assert choose("mars_aware", loads, backlog_weight=0.01).instance_id == "a"
    # weight 0.1: a = 40 - 10 = 30 < b = 38.
    assert choose("mars_aware", loads, backlog_weight=0.1).instance_id == "b"


def test_mars_aware_backlog_breaks_ties_before_the_id() -> None:
    loads = [load("a", free=20, backlog=500.0), load("b", free=20, backlog=100.0)]
    assert choose("mars_aware", loads, backlog_weight=0.0).instance_id == "b"


def test_returning_blocks_by_hand() -> None:
    assert returning_blocks(load("x", 50, released=8, returns=((0.0, 8),)), 5.0) == 8.0
    # Half the horizon away: 8 * (1 - 2.5 / 5) = 4.
    assert returning_blocks(load("x", 50, released=8, returns=((2.5, 8),)), 5.0) == 4.0
    # At or beyond the horizon: nothing.
    beyond = load("x", 50, released=14, returns=((5.0, 8), (20.0, 6)))
    assert returning_blocks(beyond, 5.0) == 0.0
    # 4 * 1 + 10 * (1 - 1 / 5) + 6 * (1 - 2.5 / 5) + 100 * 0 = 4 + 8 + 3 = 15.
    mixed = load("x", 50, released=120, returns=((0.0, 4), (1.0, 10), (2.5, 6), (7.0, 100)))
    assert returning_blocks(mixed, 5.0) == pytest.approx(15.0)
    # A longer horizon weighs the same returns more: 4 + 9.5 + 8.75 + 30 = 52.25.
    assert returning_blocks(mixed, 10.0) == pytest.approx(4 + 10 * 0.9 + 6 * 0.75 + 100 * 0.3)
    assert returning_blocks(load("x", 50), 5.0) == 0.0


def test_returning_blocks_without_returns_counts_released_blocks_in_full() -> None:
    # An engine that reports released blocks but no returns: the old full count.
    old = load("x", free=40, running=2, released=12)
    assert returning_blocks(old, 5.0) == returning_blocks(old, 0.001) == 12.0
    assert mars_aware_score(old, 0.0, 5.0) == (40 - 12) / 2


def test_mars_aware_score_weighs_returns_by_hand() -> None:
    x = load(
        "x",
        free=40,
        running=2,
        demand=10,
        released=20,
        returns=((1.0, 10), (10.0, 10)),
        backlog=6400.0,
    )
    # Horizon 5: returning 10 * 0.8 + 0 = 8; (40 - 10 - 8) / 2 = 11; 11 - 0.01 * 200 = 9.
    assert mars_aware_score(x, 0.01, 5.0) == pytest.approx(9.0)
    # Horizon 20: 10 * 0.95 + 10 * 0.5 = 14.5; (40 - 10 - 14.5) / 2 = 7.75; - 2 = 5.75.
    assert mars_aware_score(x, 0.01, 20.0) == pytest.approx(5.75)


def test_mars_aware_prefers_blocks_returning_late_over_blocks_returning_now() -> None:
    loads = [
        load("a", free=20, released=8, returns=((20.0, 8),)),  # 8 blocks back in 20 s
        load("b", free=20, released=4, returns=((0.0, 4),)),  # 4 blocks back now
    ]
    # Horizon 5 (the default): a = 20 - 0 = 20, b = 20 - 4 = 16.
    decision = choose("mars_aware", loads)
    assert decision == DispatchDecision("a", "mars_aware (no affinity instance): score 20")
    assert choose("mars_aware", loads, return_horizon_s=5.0).instance_id == "a"
    # Counting every released block in full (no returns reported): a = 12, b = 16.
    full = [dataclasses.replace(x, paused_returns=()) for x in loads]
    assert choose("mars_aware", full).instance_id == "b"
    # A horizon far beyond every return comes back to the full count.
    assert choose("mars_aware", loads, return_horizon_s=1e9).instance_id == "b"


def test_mars_aware_prefers_healthy_affinity_over_load() -> None:
    loads = [load("a", free=90), load("b", free=1, running=5, released=50)]
    decision = choose("mars_aware", loads, req(affinity="b"))
    assert decision == DispatchDecision("b", "affinity")
    sick = [load("a", free=90), load("b", free=1, healthy=False)]
    decision = choose("mars_aware", sick, req(affinity="b"))
    assert decision.instance_id == "a"
    assert "'b' unhealthy or unknown" in decision.reason


# --- session_affinity ---------------------------------------------------------


def test_session_affinity_uses_the_affinity_instance() -> None:
    loads = [load("a", free=90), load("b", free=2, running=8)]
    assert choose("session_affinity", loads, req(affinity="b")) == DispatchDecision("b", "affinity")


def test_session_affinity_falls_back_to_least_load_by_default() -> None:
    loads = [load("a", free=10), load("b", free=60, running=2), load("c", free=90, healthy=False)]
    decision = choose("session_affinity", loads, req(affinity="c"))
    assert decision == DispatchDecision(
        "b",
        "fallback least_load (affinity instance 'c' unhealthy or unknown): least_load: freeness 30",
    )
    decision = choose("session_affinity", loads, req(affinity="gone"))
    assert decision.instance_id == "b"
    assert "'gone'" in decision.reason
    decision = choose("session_affinity", loads, req(affinity=None, session=None))
    assert decision.reason.startswith("fallback least_load (no affinity instance)")


def test_session_affinity_fallback_threads_round_robin_state() -> None:
    policy = make_dispatch_policy("session_affinity", fallback="round_robin")
    loads = [load("a", 1), load("b", 1), load("c", 1)]
    decision, state = policy.choose(req(), loads, START)
    assert (decision.instance_id, state) == ("a", DispatchState("a"))
    assert decision.reason == "fallback round_robin (no affinity instance): round_robin"
    # An affinity hit leaves the round-robin turn where it was.
    decision, state = policy.choose(req(affinity="c"), loads, state)
    assert (decision.instance_id, state) == ("c", DispatchState("a"))
    decision, state = policy.choose(req(), loads, state)
    assert decision.instance_id == "b"


def test_session_affinity_can_fall_back_to_mars_aware() -> None:
    loads = [load("a", free=40, running=2, released=30), load("b", free=30, running=2)]
    decision = choose("session_affinity", loads, fallback="mars_aware")
    assert decision.instance_id == "b"
    assert decision.reason.startswith("fallback mars_aware")


# --- health, errors, ties -----------------------------------------------------


@pytest.mark.parametrize("name", ["round_robin", "least_load", "session_affinity", "mars_aware"])
def test_unhealthy_instances_are_never_chosen(name: str) -> None:
    loads = [load("a", free=100, running=0, healthy=False), load("b", free=1, running=9)]
    for affinity in (None, "a", "b"):
        decision = choose(name, loads, req(affinity=affinity))
        assert decision.instance_id == "b", (name, affinity)


@pytest.mark.parametrize("name", ["round_robin", "least_load", "session_affinity", "mars_aware"])
def test_no_healthy_instance_raises(name: str) -> None:
    policy = make_dispatch_policy(name)
    sick = [load("b", 1, healthy=False), load("a", 1, healthy=False)]
    with pytest.raises(NoInstanceAvailable, match=r"no healthy instance.*'s1'.*\['a', 'b'\]"):
        policy.choose(req(affinity="a"), sick, START)
    with pytest.raises(ValueError, match="no instance is known"):
        policy.choose(req(session=None), [], START)


def test_duplicate_instance_ids_are_rejected() -> None:
    with pytest.raises(ValueError, match="'a' appears twice"):
        choose("least_load", [load("a", 1), load("a", 2)])


@pytest.mark.parametrize("name", ["round_robin", "least_load", "session_affinity", "mars_aware"])
def test_ties_go_to_the_smallest_id_whatever_the_order(name: str) -> None:
    loads = [load("n2", 10), load("n10", 10), load("n1", 10)]
    for order in itertools.permutations(loads):
        decision = choose(name, list(order))
        assert decision.instance_id == "n1", (name, order)


@pytest.mark.parametrize("name", ["round_robin", "least_load", "session_affinity", "mars_aware"])
def test_decisions_do_not_depend_on_load_order(name: str) -> None:
    loads = [
        load("a", free=40, running=2, released=30, backlog=100.0),
        load("b", free=30, running=2, demand=5, released=30, returns=((1.0, 20), (9.0, 10))),
        load("c", free=35, running=3, preserved=20),
        load("d", free=90, healthy=False),
    ]
    policy = make_dispatch_policy(name)
    state = DispatchState(last_instance="a")
    results = {policy.choose(req(), list(p), state) for p in itertools.permutations(loads)}
    assert len(results) == 1


# --- snapshot validation ------------------------------------------------------

INT_FIELDS = [
    "total_blocks",
    "free_blocks",
    "running",
    "waiting",
    "waiting_demand_blocks",
    "paused_preserved_blocks",
    "paused_released_blocks",
    "paused_preserved_sessions",
    "paused_discarded_sessions",
    "paused_swapped_sessions",
]


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("bad", [-1, 1.5, True, None])
def test_invalid_load_counts_are_named(field: str, bad: object) -> None:
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(load("a", 10), **{field: bad})


def test_free_blocks_cannot_exceed_total() -> None:
    with pytest.raises(ValueError, match=r"free_blocks \(101\) exceeds total_blocks \(100\)"):
        load("a", free=101)


def test_preserved_blocks_are_not_free() -> None:
    with pytest.raises(ValueError, match="paused_preserved_blocks"):
        load("a", free=60, preserved=41)
    assert load("a", free=60, preserved=40).paused_preserved_blocks == 40


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("instance_id", ""),
        ("instance_id", 3),
        ("predicted_backlog", -1.0),
        ("predicted_backlog", float("nan")),
        ("healthy", 1),
        ("block_size", 0),
        ("block_size", 16.0),
    ],
)
def test_invalid_load_fields_are_named(field: str, bad: object) -> None:
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(load("a", 10), **{field: bad})


@pytest.mark.parametrize(
    "bad",
    [
        None,
        "ab",
        ((1.0,),),
        [[1.0, 2, 3]],
        (3,),
        ((-1.0, 2),),
        ((math.nan, 2),),
        ((math.inf, 2),),
        ((True, 2),),
        (("1", 2),),
        ((1.0, -1),),
        ((1.0, 1.5),),
        ((1.0, False),),
    ],
)
def test_invalid_paused_returns_are_named(bad: object) -> None:
    with pytest.raises(ValueError, match="paused_returns"):
        load("a", 10, released=2, returns=bad)  # type: ignore[arg-type]


def test_paused_returns_from_the_engine_become_tuples_and_travel() -> None:
    # The engine's snapshot sends lists (or tuples); the load holds tuples, so
    # it stays hashable and survives pickling and `vars` round trips (the
    # global scheduler hands `vars(load)` to the ingress's placer).
    x = load("a", 10, released=4, returns=[[0.5, 3], (2, 1)])  # type: ignore[arg-type]
    assert x.paused_returns == ((0.5, 3), (2.0, 1))
    assert hash(x) == hash(load("a", 10, released=4, returns=((0.5, 3), (2.0, 1))))
    assert pickle.loads(pickle.dumps(x)) == x
    assert InstanceLoad(**vars(x)) == x
    assert charge_placement(x, 64).paused_returns == x.paused_returns


@pytest.mark.parametrize(
    ("field", "bad"),
    [("session_id", ""), ("prompt_tokens", -1), ("prompt_tokens", 2.5), ("affinity_instance", "")],
)
def test_invalid_request_fields_are_named(field: str, bad: object) -> None:
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(req(), **{field: bad})


def test_invalid_state_is_named() -> None:
    with pytest.raises(ValueError, match="last_instance"):
        DispatchState(last_instance="")


def test_loads_must_be_instance_loads() -> None:
    with pytest.raises(ValueError, match="InstanceLoad"):
        make_dispatch_policy("least_load").choose(req(), [{"instance_id": "a"}], START)  # type: ignore[list-item]


# --- purity -------------------------------------------------------------------


def test_dispatch_module_imports_no_ray_or_vllm() -> None:
    code = (
        "import sys, policies.dispatch;"
        "bad = sorted(m for m in sys.modules"
        " if m.split('.')[0] in ('ray', 'vllm', 'torch', 'workers', 'cluster', 'bench'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- charging a decision to the cached load ----------------------------------


def test_charge_placement_queues_the_session_and_its_blocks() -> None:
    before = load("a", free=10, demand=3)  # waiting 1
    after = charge_placement(before, 33)  # 33 tokens = 2 blocks of 32
    assert (after.waiting, after.waiting_demand_blocks) == (2, 5)
    assert (after.free_blocks, after.running) == (before.free_blocks, before.running)
    assert charge_placement(before, 32).waiting_demand_blocks == 4
    assert charge_placement(before, 0).waiting_demand_blocks == 3


def test_charged_loads_spread_a_burst_between_refreshes() -> None:
    # Equal instances: without charging, every session of a burst goes to "a".
    loads = {i: load(i, free=20) for i in ("a", "b")}
    chosen = []
    for _ in range(4):
        pick = choose("least_load", list(loads.values()))
        loads[pick.instance_id] = charge_placement(loads[pick.instance_id], 100)
        chosen.append(pick.instance_id)
    assert chosen == ["a", "b", "a", "b"]


def test_charge_placement_rejects_negative_tokens() -> None:
    with pytest.raises(ValueError, match="prompt_tokens"):
        charge_placement(load("a", free=1), -1)


# --- a deficit is not shared out ---------------------------------------------


@pytest.mark.parametrize("name", ["least_load", "mars_aware"])
def test_at_equal_deficit_the_busier_instance_ranks_lower(name: str) -> None:
    # Both owe 20 blocks; "a" runs 10 requests, "b" 2. Dividing the deficit
    # by the running requests (-2 vs -10) would pick the busier "a".
    loads = [load("a", free=10, running=10, demand=30), load("b", free=10, running=2, demand=30)]
    assert choose(name, loads).instance_id == "b"


def test_mars_aware_deficit_counts_released_blocks() -> None:
    # a: (10 - 0 - 30) * 4 = -80; b: (5 - 0 - 10) * 6 = -30.
    loads = [load("a", free=10, running=4, released=30), load("b", free=5, running=6, released=10)]
    assert mars_aware_score(loads[0], 0.0, 5.0) == -80.0
    assert mars_aware_score(loads[1], 0.0, 5.0) == -30.0
    assert choose("mars_aware", loads).instance_id == "b"
