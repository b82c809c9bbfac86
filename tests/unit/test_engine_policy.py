"""Engine policies: registry, admission order, strategy and demotion per policy."""

from __future__ import annotations

import dataclasses
import math
import random
from typing import ClassVar

import pytest

from policies.cost_model import CostModel
from policies.engine_policy import (
    EnginePolicy,
    MarsPolicy,
    engine_policy_names,
    make_engine_policy,
    register_engine_policy,
)
from policies.memory import memory_over_time
from policies.starvation import StarvationConfig
from policies.types import BatchView, RequestView, Strategy
from policies.waste import StrategyChoice, choose_strategy

# b = 0.01, a = 0.001, swap 1e-4 s/token, M = 2 bytes/token, budget 100.
COST = CostModel(0.01, 0.001, 0.0001, 2.0, token_budget=100)
BATCH = BatchView(running_context_tokens=400, free_host_tokens=1000)


def rv(request_id: str, **kw: object) -> RequestView:
    fields: dict[str, object] = dict(
        arrival_s=0.0, context_tokens=100, predicted_decode_tokens=10, predicted_api_s=None
    )
    fields.update(kw)
    return RequestView(request_id, **fields)  # type: ignore[arg-type]


# --- registry -------------------------------------------------------------------------


def test_registry_holds_the_four_policies() -> None:
    assert engine_policy_names() == ("infercept", "mars", "sjf", "vllm")
    for name in engine_policy_names():
        policy = make_engine_policy(name)
        assert isinstance(policy, EnginePolicy)
        assert policy.name == name
        assert policy.rerank_every == 1


def test_unknown_policy_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown engine policy 'fifo'") as info:
        make_engine_policy("fifo")
    for name in ("infercept", "mars", "sjf", "vllm"):
        assert name in str(info.value)


def test_unknown_param_is_named() -> None:
    with pytest.raises(ValueError, match="threshold_iterations"):
        make_engine_policy("vllm", threshold_iterations=5)
    with pytest.raises(ValueError, match="bogus"):
        make_engine_policy("mars", bogus=1)


@pytest.mark.parametrize(
    ("name", "params", "named"),
    [
        ("vllm", {"rerank_every": 0}, "rerank_every"),
        ("sjf", {"rerank_every": 2.5}, "rerank_every"),
        ("mars", {"rerank_every": -1}, "rerank_every"),
        ("mars", {"threshold_iterations": 0}, "threshold_iterations"),
        ("mars", {"quantum_iterations": 10}, "quantum_iterations"),
        ("mars", {"starvation": 100}, "starvation"),
    ],
)
def test_invalid_param_is_named(name: str, params: dict[str, object], named: str) -> None:
    with pytest.raises(ValueError, match=named) as info:
        make_engine_policy(name, **params)
    assert repr(name) in str(info.value)


def test_mars_params_flat_or_as_config() -> None:
    flat = make_engine_policy(
        "mars", threshold_iterations=7, count_only_after_first_run=False, rerank_every=5
    )
    assert isinstance(flat, MarsPolicy)
    assert flat.starvation == StarvationConfig(7, count_only_after_first_run=False)
    assert flat.rerank_every == 5
    config = StarvationConfig(threshold_iterations=9)
    assert make_engine_policy("mars", starvation=config) == MarsPolicy(starvation=config)
    with pytest.raises(ValueError, match="not both"):
        make_engine_policy("mars", starvation=config, threshold_iterations=3)


def test_duplicate_registration_rejected() -> None:
    @dataclasses.dataclass(frozen=True)
    class Clash(MarsPolicy):
        name: ClassVar[str] = "mars"

    with pytest.raises(ValueError, match="already registered"):
        register_engine_policy(Clash)


def test_policies_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_engine_policy("mars").rerank_every = 3  # type: ignore[misc]


# --- vllm -----------------------------------------------------------------------------


def test_vllm_is_fcfs_by_queue_entry_and_resumed_goes_to_tail() -> None:
    waiting = [
        rv(
            "resumed",
            arrival_s=0.0,
            queued_since_s=9.0,
            has_run=True,
            resumed_strategy=Strategy.DISCARD,
        ),
        rv("second", arrival_s=2.0, queued_since_s=2.0),
        rv("first", arrival_s=1.0, queued_since_s=1.0),
    ]
    assert make_engine_policy("vllm").order(waiting, COST) == ["first", "second", "resumed"]


def test_vllm_always_discards_every_paused_request() -> None:
    policy = make_engine_policy("vllm")
    short_call = rv("r", predicted_api_s=0.01, has_run=True)  # preserve would win elsewhere
    choice = policy.choose_strategy(short_call, BATCH, COST)
    assert choice.strategy is Strategy.DISCARD
    assert choice.waste_preserve == choice.waste_swap == math.inf
    other = rv("s", predicted_api_s=0.01, has_run=True)
    discard = StrategyChoice(Strategy.DISCARD, math.inf, 1.0, math.inf)
    paused = [(short_call, discard), (other, discard)]
    assert policy.demotions(paused) == [("r", Strategy.DISCARD), ("s", Strategy.DISCARD)]


# --- infercept ------------------------------------------------------------------------


def test_infercept_is_fcfs_by_arrival_with_resumed_discard_first() -> None:
    waiting = [
        rv("late", arrival_s=3.0),
        rv("early", arrival_s=1.0, queued_since_s=50.0),
        rv("resumed", arrival_s=2.0, has_run=True, resumed_strategy=Strategy.DISCARD),
        rv("swapped", arrival_s=0.5, has_run=True, resumed_strategy=Strategy.SWAP),
    ]
    assert make_engine_policy("infercept").order(waiting, COST) == [
        "resumed",
        "swapped",
        "early",
        "late",
    ]


@pytest.mark.parametrize("name", ["infercept", "sjf", "mars"])
def test_least_waste_strategy_and_demotion(name: str) -> None:
    policy = make_engine_policy(name)
    v = rv("r", predicted_api_s=2.0, has_run=True)
    assert policy.choose_strategy(v, BATCH, COST) == choose_strategy(v, BATCH, COST)
    assert policy.choose_strategy(v, BATCH, COST).strategy is Strategy.SWAP
    paused = [
        (rv("a"), StrategyChoice(Strategy.DISCARD, 50.0, 10.0, math.inf)),
        (rv("b"), StrategyChoice(Strategy.SWAP, 90.0, 80.0, 30.0)),
    ]
    assert policy.demotions(paused) == [("a", Strategy.DISCARD)]


# --- sjf ------------------------------------------------------------------------------


def test_sjf_orders_by_predicted_decode_tokens_then_arrival() -> None:
    waiting = [
        rv("long", arrival_s=0.0, predicted_decode_tokens=500),
        rv("short_late", arrival_s=2.0, predicted_decode_tokens=5),
        rv("short_early", arrival_s=1.0, predicted_decode_tokens=5),
        rv("mid", arrival_s=0.5, predicted_decode_tokens=50),
        rv(
            "resumed",
            arrival_s=3.0,
            predicted_decode_tokens=900,
            has_run=True,
            resumed_strategy=Strategy.DISCARD,
        ),
    ]
    assert make_engine_policy("sjf").order(waiting, COST) == [
        "resumed",
        "short_early",
        "short_late",
        "mid",
        "long",
    ]


# --- mars -----------------------------------------------------------------------------

# A: c = 1000, d = 5, T = 60 s, new. With no batch given, swap is not considered:
#   preserve waste 60 * 1000 * 2 = 120000; discard prefill(1000) = 10 * 0.01 + 1.0 = 1.1,
#   1.1 * 1000 * 2 = 2200 -> DISCARD.
#   area = prefill 1.1 * 1000 = 1100
#        + decode 0.011 * (5 * 1000 + 15) = 55.165
#        + recompute prefill(1005) * 1005 = (11 * 0.01 + 1.005) * 1005 = 1120.575
#        = 2275.74
# B: c = 100, d = 50, no call, new: area = 0.11 * 100 + 0.011 * (50 * 100 + 1275)
#        = 11 + 69.025 = 80.025
HOLDER = rv(
    "holder", arrival_s=0.0, context_tokens=1000, predicted_decode_tokens=5, predicted_api_s=60.0
)
TALKER = rv("talker", arrival_s=1.0, context_tokens=100, predicted_decode_tokens=50)


def test_mars_score_by_hand() -> None:
    policy = make_engine_policy("mars")
    assert isinstance(policy, MarsPolicy)
    no_batch = BatchView(0, 0)
    assert policy.score(HOLDER, no_batch, COST) == pytest.approx(2275.74)
    assert policy.score(TALKER, no_batch, COST) == pytest.approx(80.025)


def test_mars_ranks_by_memory_over_time_not_tokens() -> None:
    # SJF and FCFS take the holder first (5 tokens, earlier); MARS takes the talker.
    waiting = [HOLDER, TALKER]
    assert make_engine_policy("sjf").order(waiting, COST) == ["holder", "talker"]
    assert make_engine_policy("infercept").order(waiting, COST) == ["holder", "talker"]
    assert make_engine_policy("mars").order(waiting, COST) == ["talker", "holder"]


def test_mars_admits_small_later_request_before_earlier_large_one() -> None:
    big = rv(
        "big", arrival_s=0.0, context_tokens=2000, predicted_decode_tokens=200, predicted_api_s=30.0
    )
    small = rv(
        "small", arrival_s=5.0, context_tokens=50, predicted_decode_tokens=10, predicted_api_s=0.1
    )
    assert make_engine_policy("mars").order([big, small], COST, BATCH) == ["small", "big"]
    assert make_engine_policy("vllm").order([big, small], COST, BATCH) == ["big", "small"]


def test_mars_scores_under_the_strategy_the_batch_implies() -> None:
    policy = make_engine_policy("mars")
    assert isinstance(policy, MarsPolicy)
    rng = random.Random(2)
    for i in range(200):
        v = rv(
            f"r{i}",
            context_tokens=rng.randint(1, 3000),
            predicted_decode_tokens=rng.randint(0, 300),
            predicted_api_s=rng.choice([None, rng.uniform(0, 60)]),
            predicted_api_return_tokens=rng.randint(0, 100),
            has_run=rng.random() < 0.5,
        )
        b = BatchView(rng.randint(0, 20000), rng.randint(0, 4000))
        strategy = choose_strategy(v, b, COST).strategy
        assert policy.score(v, b, COST) == memory_over_time(v, strategy, COST)


def test_mars_puts_starving_then_resumed_discard_first() -> None:
    waiting = [
        TALKER,
        rv(
            "resumed",
            arrival_s=4.0,
            context_tokens=3000,
            has_run=True,
            resumed_strategy=Strategy.DISCARD,
        ),
        rv(
            "starving",
            arrival_s=3.0,
            context_tokens=4000,
            predicted_api_s=100.0,
            has_run=True,
            waited_iterations=100,
        ),
        rv(
            "never_ran",
            arrival_s=2.0,
            context_tokens=4000,
            predicted_api_s=100.0,
            waited_iterations=1000,
        ),  # has not run: cannot starve by default
    ]
    order = make_engine_policy("mars").order(waiting, COST, BATCH)
    assert order == ["starving", "resumed", "talker", "never_ran"]
    lenient = make_engine_policy("mars", threshold_iterations=101)
    assert lenient.order(waiting, COST, BATCH)[0] == "resumed"


def test_order_does_not_mutate_and_is_deterministic() -> None:
    waiting = (HOLDER, TALKER, rv("x", arrival_s=0.5))
    before = list(waiting)
    for name in engine_policy_names():
        policy = make_engine_policy(name)
        assert policy.order(waiting, COST, BATCH) == policy.order(waiting, COST, BATCH)
    assert list(waiting) == before


def test_empty_waiting() -> None:
    for name in engine_policy_names():
        assert make_engine_policy(name).order([], COST) == []
