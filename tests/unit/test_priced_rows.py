"""Priced rows against the scalar path: the engine's cached terms change no decision.

`PricedRows` packs each waiting request's batch-independent waste and
memory-area terms into its cached row, and the policies then use those terms
instead of computing them from the columns. Over iterations in which requests
arrive, are admitted, change and wait, every order, strategy and waste must be
exactly what the per-request (scalar) path and the from-scratch columns give.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

import numpy as np
import pytest

from policies import (
    BatchView,
    CostModel,
    PricedRows,
    RequestColumns,
    RequestView,
    Strategy,
    choose_strategies,
    engine_policy_names,
    make_engine_policy,
)
from policies.engine_policy import MarsPolicy
from policies.memory import area_terms
from policies.waste import waste_terms
from tests.unit.test_columns import BATCHES, COSTS, RESUMED, _scalar_order, random_views


def _join(priced: PricedRows, views: list[RequestView], rows: dict[str, bytes]) -> RequestColumns:
    """What the engine does per iteration: join the cached rows with the waited counts."""
    ids = [v.request_id for v in views]
    return priced.columns(ids, [rows[i] for i in ids], [v.waited_iterations for v in views])


def _carries_terms(columns: RequestColumns, cost: CostModel) -> bool:
    """Whether the policies read the terms from the joined rows (views of the
    table that the columns view too) rather than computing them."""
    table = columns.arrival_s.base
    assert table is not None
    return waste_terms(columns, cost).preserve.base is table and (
        area_terms(columns, cost).before_call.base is table
    )


def _assert_same_decisions(
    columns: RequestColumns,
    views: list[RequestView],
    cost: CostModel,
    batch: BatchView | None,
) -> None:
    """Every policy decides on `columns` exactly as on the views one at a time,
    and as on columns built from scratch."""
    fresh = RequestColumns.from_views(views)
    for name in engine_policy_names():
        policy = make_engine_policy(name)
        expected = _scalar_order(name, views, cost, batch)
        assert policy.order(columns, cost, batch) == expected, name
        assert policy.order(fresh, cost, batch) == expected, name
        if batch is None:
            continue
        choices = policy.choose_strategies(columns, batch, cost)
        from_scratch = policy.choose_strategies(fresh, batch, cost)
        for field in ("codes", "waste_preserve", "waste_discard", "waste_swap"):
            np.testing.assert_array_equal(
                getattr(choices, field), getattr(from_scratch, field), err_msg=name
            )
        for i, view in enumerate(views):
            assert choices.choice(i) == policy.choose_strategy(view, batch, cost), name
    mars = make_engine_policy("mars")
    assert isinstance(mars, MarsPolicy)
    scored_batch = batch if batch is not None else BatchView(0, 0)
    np.testing.assert_array_equal(
        mars.scores(columns, scored_batch, cost), mars.scores(fresh, scored_batch, cost)
    )


def _changed(rng: random.Random, view: RequestView) -> RequestView:
    """`view` after something its row shows changed (a resume, new predictions)."""
    return dataclasses.replace(
        view,
        context_tokens=view.context_tokens + rng.choice([0, 1, rng.randint(1, 500)]),
        predicted_decode_tokens=rng.choice([0, 1, rng.randint(0, 500)]),
        predicted_api_s=rng.choice([None, 0.0, rng.expovariate(0.2)]),
        has_run=rng.random() < 0.7,
        resumed_strategy=rng.choice(RESUMED),
        queued_since_s=view.queued_since_s + rng.uniform(0.0, 5.0),
    )


@pytest.mark.parametrize("seed", range(10))
def test_priced_rows_decide_as_the_scalar_path_across_iterations(seed: int) -> None:
    rng = random.Random(seed)
    ties = seed % 2 == 0
    cost = COSTS[seed % len(COSTS)]
    priced = PricedRows(cost)
    serial = itertools.count()
    waiting: dict[str, RequestView] = {}
    rows: dict[str, bytes] = {}  # cached until the request changes, as on the engine's records
    for _ in range(12):
        for view in random_views(rng, rng.choice([0, 1, 5, 40]), ties=ties):
            request_id = f"{view.request_id}-{next(serial)}"
            waiting[request_id] = dataclasses.replace(view, request_id=request_id)
        for request_id in rng.sample(sorted(waiting), k=min(len(waiting), rng.randint(0, 15))):
            del waiting[request_id]  # admitted
            rows.pop(request_id, None)
        for request_id in rng.sample(sorted(waiting), k=min(len(waiting), rng.randint(0, 10))):
            waiting[request_id] = _changed(rng, waiting[request_id])
            rows.pop(request_id, None)
        for request_id, view in waiting.items():
            waited = view.waited_iterations + 1 if rng.random() < 0.9 else 0
            waiting[request_id] = dataclasses.replace(view, waited_iterations=waited)
            if request_id not in rows:
                rows[request_id] = priced.row(waiting[request_id])
        views = list(waiting.values())
        rng.shuffle(views)  # the queue's order is the last ranking's, plus arrivals
        columns = _join(priced, views, rows)
        assert _carries_terms(columns, cost)
        running = rng.choice([0, 3, rng.randint(0, 20_000)])
        for batch in (None, BatchView(running, rng.choice([0, 4, rng.randint(0, 20_000)]))):
            _assert_same_decisions(columns, views, cost, batch)


@pytest.mark.parametrize("seed", range(4))
def test_priced_rows_under_every_fixed_batch(seed: int) -> None:
    views = random_views(random.Random(seed), 150, ties=seed % 2 == 0)
    cost = COSTS[seed % len(COSTS)]
    priced = PricedRows(cost)
    columns = _join(priced, views, {v.request_id: priced.row(v) for v in views})
    assert _carries_terms(columns, cost)
    for batch in BATCHES:
        _assert_same_decisions(columns, views, cost, batch)


def test_the_terms_in_rows_equal_the_terms_of_columns() -> None:
    views = random_views(random.Random(3), 200, ties=False)
    for cost in COSTS:
        priced = PricedRows(cost)
        columns = _join(priced, views, {v.request_id: priced.row(v) for v in views})
        fresh = RequestColumns.from_views(views)
        for cached, computed in (
            (waste_terms(columns, cost), waste_terms(fresh, cost)),
            (area_terms(columns, cost), area_terms(fresh, cost)),
        ):
            for name, a, b in zip(cached._fields, cached, computed, strict=True):
                np.testing.assert_array_equal(a, b, err_msg=name)


def test_rows_priced_under_another_cost_model_are_priced_from_scratch() -> None:
    views = random_views(random.Random(11), 60, ties=False)
    old, new = PricedRows(COSTS[0]), PricedRows(COSTS[2])
    rows = {v.request_id: (old if i % 3 == 0 else new).row(v) for i, v in enumerate(views)}
    columns = _join(new, views, rows)
    assert not _carries_terms(columns, COSTS[2])
    _assert_same_decisions(columns, views, COSTS[2], BATCHES[0])
    # Same costs, another PricedRows (the engine replaced it): not trusted either.
    again = PricedRows(COSTS[2])
    assert not _carries_terms(_join(again, views, rows), COSTS[2])


def test_a_request_whose_terms_raise_leaves_its_columns_to_raise_as_before() -> None:
    priced = PricedRows(COSTS[0])
    # A starving request is not scored, so its invalid prediction does not raise.
    starving_bad = RequestView("s", 0.0, 10, -5, 1.0, has_run=True, waited_iterations=500)
    fine = RequestView("f", 1.0, 10, 1, 1.0)
    rows = {v.request_id: priced.row(v) for v in (fine, starving_bad)}
    columns = _join(priced, [fine, starving_bad], rows)
    assert not _carries_terms(columns, COSTS[0])
    assert make_engine_policy("mars").order(columns, COSTS[0], BATCHES[0]) == ["s", "f"]
    bad_api = RequestView("r", 0.0, 10, 1, math.inf, has_run=True)
    columns = _join(priced, [bad_api], {"r": priced.row(bad_api)})
    with pytest.raises(ValueError, match="predicted_api_s"):
        choose_strategies(columns, BATCHES[0], COSTS[0])
    with pytest.raises(ValueError, match="not a number"):
        priced.row(RequestView("r", 0.0, 1.5, 1, None))  # type: ignore[arg-type]


def test_resumed_strategies_and_empty_waiting() -> None:
    priced = PricedRows(COSTS[0])
    assert make_engine_policy("mars").order(priced.columns([], [], []), COSTS[0]) == []
    views = [
        RequestView(f"r{i}", float(i), 100 * i, i, 1.0, has_run=True, resumed_strategy=s)
        for i, s in enumerate((None, *Strategy))
    ]
    columns = _join(priced, views, {v.request_id: priced.row(v) for v in views})
    assert columns.resumed_swap.tolist() == [False, False, False, True]
    _assert_same_decisions(columns, views, COSTS[0], BATCHES[0])
