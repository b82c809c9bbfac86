"""INFERCEPT waste terms, the least-waste strategy, and MARS's demotion rule."""

from __future__ import annotations

import math
import random

import pytest

from policies.cost_model import CostModel
from policies.types import BatchView, RequestView, Strategy
from policies.waste import (
    StrategyChoice,
    choose_strategy,
    demotions,
    least_waste_strategy,
    waste_discard,
    waste_preserve,
    waste_swap,
)

# b = 0.01, a = 0.001, swap 1e-4 s/token, M = 2 bytes/token, budget 100.
COST = CostModel(
    iter_fixed_s=0.01,
    iter_per_token_s=0.001,
    swap_s_per_token=0.0001,
    kv_bytes_per_token=2.0,
    token_budget=100,
)


def view(c: int = 100, api_s: float | None = 2.0) -> RequestView:
    return RequestView("r", 0.0, c, 10, api_s, has_run=True)


def test_waste_preserve() -> None:
    # T * C * M = 2 * 100 * 2 = 400
    assert waste_preserve(100, 2.0, COST) == pytest.approx(400.0)


def test_waste_discard() -> None:
    # prefill_time(100) = 0.11; 0.11 * 100 * 2 + 0.11 * 300 * 2 = 22 + 66 = 88
    assert waste_discard(100, 300, COST) == pytest.approx(88.0)


def test_waste_swap() -> None:
    # 2 * swap_time(100) * C_batch * M = 2 * 0.01 * 400 * 2 = 16
    assert waste_swap(100, 400, COST) == pytest.approx(16.0)


def test_swap_wins() -> None:
    # preserve 400, discard (C_other = 400 - 100 = 300) 88, swap 16
    choice = choose_strategy(view(), BatchView(400, free_host_tokens=1000), COST)
    assert choice.strategy is Strategy.SWAP
    assert choice.waste_preserve == pytest.approx(400.0)
    assert choice.waste_discard == pytest.approx(88.0)
    assert choice.waste_swap == pytest.approx(16.0)
    assert choice.waste == pytest.approx(16.0)


def test_swap_disallowed_by_host_space_falls_to_discard() -> None:
    # Context 100 > 50 free host tokens: swap inf; discard 88 < preserve 400.
    choice = choose_strategy(view(), BatchView(400, free_host_tokens=50), COST)
    assert choice.strategy is Strategy.DISCARD
    assert choice.waste_swap == math.inf


def test_swap_allowed_when_context_exactly_fits() -> None:
    choice = choose_strategy(view(), BatchView(400, free_host_tokens=100), COST)
    assert choice.strategy is Strategy.SWAP


def test_preserve_wins_for_a_short_call() -> None:
    # preserve 0.01 * 100 * 2 = 2 < swap 16 < discard 88
    choice = choose_strategy(view(api_s=0.01), BatchView(400, 1000), COST)
    assert choice.strategy is Strategy.PRESERVE
    assert choice.waste_preserve == pytest.approx(2.0)


def test_discard_wins_when_swap_is_slow() -> None:
    # swap 0.01 s/token: swap 2 * 1.0 * 400 * 2 = 1600 > preserve 400 > discard 88
    slow = CostModel(0.01, 0.001, 0.01, 2.0, token_budget=100)
    choice = choose_strategy(view(), BatchView(400, 1000), slow)
    assert choice.strategy is Strategy.DISCARD
    assert choice.waste_swap == pytest.approx(1600.0)


def test_no_api_call_counts_as_zero_duration() -> None:
    choice = choose_strategy(view(api_s=None), BatchView(400, 1000), COST)
    assert choice.strategy is Strategy.PRESERVE
    assert choice.waste_preserve == 0.0


def test_allowed_restricts_and_reports_inf() -> None:
    choice = choose_strategy(
        view(api_s=0.01), BatchView(400, 1000), COST, allowed=frozenset({Strategy.DISCARD})
    )
    assert choice.strategy is Strategy.DISCARD
    assert choice.waste_preserve == math.inf
    assert choice.waste_swap == math.inf
    assert choice.waste_discard == pytest.approx(88.0)


def test_nothing_possible_raises() -> None:
    with pytest.raises(ValueError, match="free_host_tokens"):
        choose_strategy(view(), BatchView(400, 0), COST, allowed=frozenset({Strategy.SWAP}))
    with pytest.raises(ValueError, match="allowed"):
        choose_strategy(view(), BatchView(400, 0), COST, allowed=frozenset())


def test_negative_api_duration_is_named() -> None:
    with pytest.raises(ValueError, match="predicted_api_s"):
        choose_strategy(view(api_s=-1.0), BatchView(0, 0), COST)


# Binary-exact numbers for ties: b = 0.5, a = 0.25, M = 2, budget 100.
def test_tie_preserve_beats_swap() -> None:
    cost = CostModel(0.5, 0.25, 0.125, 2.0, token_budget=100)
    # C = 4, C_batch = 4: preserve 1.0 * 4 * 2 = 8; swap 2 * 0.5 * 4 * 2 = 8;
    # discard prefill(4) = 0.5 + 1.0 = 1.5; 1.5 * 4 * 2 + 0 = 12
    choice = choose_strategy(view(c=4, api_s=1.0), BatchView(4, 100), cost)
    assert choice.waste_preserve == choice.waste_swap == 8.0
    assert choice.strategy is Strategy.PRESERVE


def test_tie_swap_beats_discard() -> None:
    cost = CostModel(0.5, 0.25, 0.1875, 2.0, token_budget=100)
    # swap 2 * (4 * 0.1875) * 4 * 2 = 12; discard 1.5 * 4 * 2 = 12
    choice = choose_strategy(
        view(c=4, api_s=1.0),
        BatchView(4, 100),
        cost,
        allowed=frozenset({Strategy.SWAP, Strategy.DISCARD}),
    )
    assert choice.waste_swap == choice.waste_discard == 12.0
    assert choice.strategy is Strategy.SWAP


def test_least_waste_strategy_matches_choose_strategy() -> None:
    rng = random.Random(1)
    for i in range(300):
        v = RequestView(f"r{i}", 0.0, rng.randint(0, 3000), rng.randint(0, 300), rng.uniform(0, 30))
        b = BatchView(rng.randint(0, 20000), rng.randint(0, 5000))
        assert least_waste_strategy(v, b, COST) is choose_strategy(v, b, COST).strategy


def choice(strategy: Strategy, waste: float) -> StrategyChoice:
    wastes = {s: math.inf for s in Strategy}
    wastes[strategy] = waste
    return StrategyChoice(
        strategy, wastes[Strategy.PRESERVE], wastes[Strategy.DISCARD], wastes[Strategy.SWAP]
    )


def paused(request_id: str, strategy: Strategy, waste: float) -> tuple[RequestView, StrategyChoice]:
    return RequestView(request_id, 0.0, 10, 0, 5.0, has_run=True), choice(strategy, waste)


def test_demotions_keep_the_costliest_and_demote_the_rest_cheapest_first() -> None:
    items = [
        paused("a", Strategy.DISCARD, 10.0),
        paused("b", Strategy.SWAP, 30.0),  # largest waste: stays preserved
        paused("c", Strategy.PRESERVE, 50.0),  # chose preserve: never demoted
        paused("d", Strategy.SWAP, 20.0),
    ]
    expected = [("a", Strategy.DISCARD), ("d", Strategy.SWAP)]
    assert demotions(items) == expected
    shuffled = items[:]
    random.Random(0).shuffle(shuffled)
    assert demotions(shuffled) == expected


def test_demotions_edge_cases() -> None:
    assert demotions([]) == []
    assert demotions([paused("a", Strategy.PRESERVE, 1.0)]) == []
    assert demotions([paused("a", Strategy.DISCARD, 1.0)]) == []  # the only one stays
    # Tie on the largest waste: the smaller id stays.
    tied = [paused("y", Strategy.DISCARD, 30.0), paused("x", Strategy.SWAP, 30.0)]
    assert demotions(tied) == [("y", Strategy.DISCARD)]


def test_demotions_keep_none_when_memory_is_needed() -> None:
    items = [
        paused("a", Strategy.DISCARD, 10.0),
        paused("b", Strategy.SWAP, 30.0),
        paused("c", Strategy.PRESERVE, 50.0),  # chose preserve: still never demoted
    ]
    expected = [("a", Strategy.DISCARD), ("b", Strategy.SWAP)]
    assert demotions(items, memory_needed=True) == expected
    assert demotions([paused("a", Strategy.DISCARD, 1.0)], memory_needed=True) == [
        ("a", Strategy.DISCARD)
    ]
