"""Columns against scalars: every vectorized answer equals the scalar function's.

`RequestColumns` feeds the same formulas numpy arrays instead of one
request's numbers, so on any input the columns path must give exactly (not
approximately) what the per-request path gives: the same floats, the same
strategies, the same admission order.
"""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest

from policies import (
    BatchView,
    CostModel,
    RequestColumns,
    RequestView,
    Strategy,
    choose_strategies,
    choose_strategy,
    engine_policy_names,
    make_engine_policy,
    memory_over_time,
    memory_over_time_columns,
)
from policies.engine_policy import MarsPolicy
from policies.memory import least_waste_area
from policies.starvation import StarvationConfig, starving, starving_flags
from policies.types import ROW_DTYPE, STRATEGY_BY_CODE, strategy_code
from policies.waste import ALL_STRATEGIES, least_waste, least_waste_code, least_waste_strategy

COSTS = (
    CostModel(0.01, 0.001, 0.0001, 2.0, token_budget=100),
    CostModel(0.5, 0.25, 0.125, 2.0, token_budget=4),  # binary-exact: many ties
    CostModel(0.01, 5e-5, 2e-6, 8e5),
)
RESUMED = (None, None, Strategy.DISCARD, Strategy.SWAP, Strategy.PRESERVE)


def random_views(rng: random.Random, n: int, *, ties: bool) -> list[RequestView]:
    """`n` views mixing None API calls, every resumed strategy, zero-token
    contexts and decodes, and (with `ties`) many equal keys."""
    views = []
    for i in range(n):
        arrival = float(rng.randint(0, 3)) if ties else rng.uniform(0.0, 100.0)
        views.append(
            RequestView(
                request_id=f"{rng.choice('abcdef')}{i}",
                arrival_s=arrival,
                context_tokens=rng.choice([0, 1, 4, 100, rng.randint(0, 5000)]),
                predicted_decode_tokens=rng.choice([0, 1, 10, rng.randint(0, 500)]),
                predicted_api_s=rng.choice([None, 0.0, 1.0, rng.expovariate(0.2)]),
                predicted_api_return_tokens=rng.choice([0, rng.randint(0, 200)]),
                waited_iterations=rng.choice([0, 100, 150, rng.randint(0, 200)]),
                has_run=rng.random() < 0.5,
                resumed_strategy=rng.choice(RESUMED),
                queued_since_s=arrival if ties else arrival + rng.uniform(0.0, 10.0),
            )
        )
    return views


BATCHES = (
    BatchView(400, 1000),
    BatchView(60_000, 0),  # no host space: swap never possible
    BatchView(0, 100_000),
    BatchView(3, 4),
)


def cases() -> list[tuple[int, bool]]:
    return [(seed, seed % 2 == 0) for seed in range(12)]


@pytest.mark.parametrize(("seed", "ties"), cases())
def test_columns_hold_the_views(seed: int, ties: bool) -> None:
    views = random_views(random.Random(seed), 60, ties=ties)
    columns = RequestColumns.from_views(views)
    assert len(columns) == len(views)
    assert columns.request_ids.tolist() == [v.request_id for v in views]
    for name in ("has_api_call", "api_s", "needs_recompute", "needs_swap_in", "has_run"):
        assert getattr(columns, name).tolist() == [getattr(v, name) for v in views], name
    assert columns.resumed_discard.tolist() == [
        v.resumed_strategy is Strategy.DISCARD for v in views
    ]
    for name in ("context_tokens", "predicted_decode_tokens", "waited_iterations"):
        assert getattr(columns, name).tolist() == [getattr(v, name) for v in views], name
    with pytest.raises(ValueError, match="read-only"):
        columns.context_tokens[0] = 1


def test_cached_rows_give_the_same_columns_with_fresh_waited_counts() -> None:
    """The engine caches each waiting request's row and passes this
    iteration's waited counts separately; the columns must be the same."""
    views = random_views(random.Random(7), 40, ties=False)
    rows = [RequestColumns.row(v) for v in views]
    waited = [v.waited_iterations + 3 for v in views]
    cached = RequestColumns.from_rows([v.request_id for v in views], rows, waited)
    fresh = RequestColumns.from_views(
        [dataclasses.replace(v, waited_iterations=v.waited_iterations + 3) for v in views]
    )
    for field in dataclasses.fields(RequestColumns):
        np.testing.assert_array_equal(getattr(cached, field.name), getattr(fresh, field.name))


@pytest.mark.parametrize(("seed", "ties"), cases())
def test_memory_over_time_columns_equals_scalar(seed: int, ties: bool) -> None:
    rng = random.Random(seed)
    views = random_views(rng, 80, ties=ties)
    columns = RequestColumns.from_views(views)
    cost = COSTS[seed % len(COSTS)]
    codes = np.array([rng.randrange(3) for _ in views])
    areas = memory_over_time_columns(columns, codes, cost)
    for view, code, area in zip(views, codes.tolist(), areas.tolist(), strict=True):
        assert area == memory_over_time(view, STRATEGY_BY_CODE[code], cost)


@pytest.mark.parametrize(("seed", "ties"), cases())
def test_choose_strategies_equals_scalar(seed: int, ties: bool) -> None:
    views = random_views(random.Random(seed), 80, ties=ties)
    columns = RequestColumns.from_views(views)
    cost = COSTS[seed % len(COSTS)]
    for batch in BATCHES:
        for name in engine_policy_names():
            policy = make_engine_policy(name)
            choices = policy.choose_strategies(columns, batch, cost)
            assert len(choices) == len(views)
            for i, view in enumerate(views):
                assert choices.choice(i) == policy.choose_strategy(view, batch, cost)


@pytest.mark.parametrize(("seed", "ties"), cases())
def test_order_of_columns_equals_order_of_views(seed: int, ties: bool) -> None:
    rng = random.Random(seed)
    views = random_views(rng, rng.choice([0, 1, 2, 7, 150]), ties=ties)
    columns = RequestColumns.from_views(views)
    cost = COSTS[seed % len(COSTS)]
    for batch in (None, *BATCHES):
        for name in engine_policy_names():
            policy = make_engine_policy(name)
            expected = _scalar_order(name, views, cost, batch)
            assert policy.order(views, cost, batch) == expected, name
            assert policy.order(columns, cost, batch) == expected, name


def _scalar_order(
    name: str, views: list[RequestView], cost: CostModel, batch: BatchView | None
) -> list[str]:
    """Each policy's documented order, written with `sorted` over views."""

    def ids(ranked: list[RequestView]) -> list[str]:
        return [v.request_id for v in ranked]

    def two_tier(pool: list[RequestView], key) -> list[str]:  # type: ignore[no-untyped-def]
        resumed = [v for v in pool if v.resumed_strategy is Strategy.DISCARD]
        rest = [v for v in pool if v.resumed_strategy is not Strategy.DISCARD]
        return ids(sorted(resumed, key=lambda v: (v.arrival_s, v.request_id))) + ids(
            sorted(rest, key=key)
        )

    if name == "vllm":
        return ids(sorted(views, key=lambda v: (v.queued_since_s, v.arrival_s, v.request_id)))
    if name == "infercept":
        return two_tier(views, lambda v: (v.arrival_s, v.request_id))
    if name == "sjf":
        return two_tier(views, lambda v: (v.predicted_decode_tokens, v.arrival_s, v.request_id))
    mars = make_engine_policy("mars")
    assert isinstance(mars, MarsPolicy)
    scored_batch = batch if batch is not None else BatchView(0, 0)
    first = starving(views, mars.starvation)
    remaining = [v for v in views if v.request_id not in set(first)]
    return first + two_tier(
        remaining,
        lambda v: (mars.score(v, scored_batch, cost), v.arrival_s, v.request_id),
    )


@pytest.mark.parametrize(("seed", "ties"), cases())
def test_mars_scores_equal_scalar_scores(seed: int, ties: bool) -> None:
    views = random_views(random.Random(seed), 80, ties=ties)
    columns = RequestColumns.from_views(views)
    cost = COSTS[seed % len(COSTS)]
    mars = make_engine_policy("mars")
    assert isinstance(mars, MarsPolicy)
    for batch in BATCHES:
        scores = mars.scores(columns, batch, cost).tolist()
        assert scores == [mars.score(v, batch, cost) for v in views]


@pytest.mark.parametrize("count_all", [True, False])
def test_starving_flags_equal_scalar(count_all: bool) -> None:
    views = random_views(random.Random(5), 100, ties=True)
    config = StarvationConfig(threshold_iterations=100, count_only_after_first_run=not count_all)
    flags = starving_flags(RequestColumns.from_views(views), config).tolist()
    assert flags == [bool(starving_flags(v, config)) for v in views]


def test_cost_model_takes_arrays() -> None:
    cost = COSTS[0]
    tokens = np.array([0, 1, 100, 101, 250])
    for method in ("iteration_time", "prefill_time", "decode_time", "swap_time"):
        got = getattr(cost, method)(tokens).tolist()
        assert got == [getattr(cost, method)(t) for t in tokens.tolist()], method
        with pytest.raises(ValueError, match="-3"):
            getattr(cost, method)(np.array([4, -3]))


def test_invalid_columns_raise_like_scalars() -> None:
    bad_api = RequestView("r", 0.0, 10, 1, math.inf, has_run=True)
    columns = RequestColumns.from_views([RequestView("ok", 0.0, 10, 1, 1.0), bad_api])
    with pytest.raises(ValueError, match="predicted_api_s"):
        choose_strategy(bad_api, BATCHES[0], COSTS[0])
    with pytest.raises(ValueError, match="predicted_api_s"):
        choose_strategies(columns, BATCHES[0], COSTS[0])
    negative = RequestColumns.from_views([RequestView("r", 0.0, 10, -1, 1.0)])
    with pytest.raises(ValueError, match="predicted_decode_tokens"):
        memory_over_time_columns(negative, np.array([0]), COSTS[0])
    stuck = RequestColumns.from_views([RequestView("big", 0.0, 50, 1, 1.0)])
    with pytest.raises(ValueError, match="no strategy is possible for 'big'"):
        choose_strategies(stuck, BatchView(0, 10), COSTS[0], allowed=frozenset({Strategy.SWAP}))
    with pytest.raises(ValueError, match="not a number"):
        RequestColumns.from_views([RequestView("r", 0.0, 1.5, 1, None)])  # type: ignore[arg-type]


def test_mars_skips_unscored_invalid_predictions_as_before() -> None:
    # A starving request is not scored, so its invalid prediction does not raise
    # (the per-request ranking never priced it either).
    starving_bad = RequestView("s", 0.0, 10, -5, 1.0, has_run=True, waited_iterations=500)
    fine = RequestView("f", 1.0, 10, 1, 1.0)
    order = make_engine_policy("mars").order([fine, starving_bad], COSTS[0], BATCHES[0])
    assert order == ["s", "f"]


def test_strategy_codes_round_trip() -> None:
    assert [strategy_code(s) for s in STRATEGY_BY_CODE] == [0, 1, 2]
    assert set(STRATEGY_BY_CODE) == set(ALL_STRATEGIES)


def test_columns_reject_ragged_arrays() -> None:
    columns = RequestColumns.from_views(random_views(random.Random(0), 3, ties=False))
    with pytest.raises(ValueError, match="arrival_s"):
        RequestColumns(
            **{**_fields(columns), "arrival_s": np.zeros(2)}  # type: ignore[arg-type]
        )


def _fields(columns: RequestColumns) -> dict[str, object]:
    import dataclasses

    return {f.name: getattr(columns, f.name) for f in dataclasses.fields(columns)}


def test_mars_order_and_choose_strategies_share_the_pricing() -> None:
    views = random_views(random.Random(9), 50, ties=False)
    columns = RequestColumns.from_views(views)
    mars = make_engine_policy("mars")
    mars.order(columns, COSTS[0], BATCHES[0])
    first = mars.choose_strategies(columns, BATCHES[0], COSTS[0])
    again = mars.choose_strategies(columns, BATCHES[0], COSTS[0])
    assert first.waste_swap is again.waste_swap  # priced once per columns, batch, cost
    assert not first.waste_swap.flags.writeable
    other_batch = mars.choose_strategies(columns, BATCHES[1], COSTS[0])
    assert other_batch.waste_swap is not first.waste_swap
    for i, view in enumerate(views):
        assert other_batch.choice(i) == choose_strategy(view, BATCHES[1], COSTS[0])


def test_from_table_rejects_a_writable_table_and_ragged_waited_counts() -> None:
    views = random_views(random.Random(1), 3, ties=False)
    ids = [v.request_id for v in views]
    table = np.frombuffer(b"".join(RequestColumns.row(v) for v in views), dtype=ROW_DTYPE)
    with pytest.raises(ValueError, match="read-only"):
        RequestColumns.from_table(ids, table.copy(), [0, 0, 0])
    with pytest.raises(ValueError, match="waited_iterations must hold 3"):
        RequestColumns.from_table(ids, table, [0, 0])
    with pytest.raises(ValueError, match="waited_iterations must be ints"):
        RequestColumns.from_table(ids, table, [0, 1.5, 0])  # type: ignore[list-item]
    columns = RequestColumns.from_table(ids, table, [4, 5, 6])
    assert columns.waited_iterations.tolist() == [4, 5, 6]
    assert all(getattr(columns, name).flags.aligned for name in ROW_DTYPE.names)


@pytest.mark.parametrize(("seed", "ties"), cases())
def test_least_waste_area_is_the_memory_area_under_the_least_waste_strategy(
    seed: int, ties: bool
) -> None:
    views = random_views(random.Random(seed), 80, ties=ties)
    columns = RequestColumns.from_views(views)
    cost = COSTS[seed % len(COSTS)]
    for batch in BATCHES:
        codes = least_waste_code(columns, batch, cost)
        expected = memory_over_time_columns(columns, codes, cost)
        got = least_waste_area(columns, least_waste(columns, batch, cost), cost)
        np.testing.assert_array_equal(got, expected)
        for view, area in zip(views, got.tolist(), strict=True):
            strategy = least_waste_strategy(view, batch, cost)
            assert area == memory_over_time(view, strategy, cost)
            assert area == least_waste_area(view, least_waste(view, batch, cost), cost)
