"""memory_over_time against hand-computed areas (token * seconds)."""

from __future__ import annotations

import pytest

from policies.cost_model import CostModel
from policies.memory import memory_over_time
from policies.types import RequestView, Strategy

# b = 0.01, a = 0.001, swap 1e-4 s/token, budget 100 tokens.
COST = CostModel(
    iter_fixed_s=0.01,
    iter_per_token_s=0.001,
    swap_s_per_token=0.0001,
    kv_bytes_per_token=2.0,
    token_budget=100,
)

# c = 100, d = 10, T = 2 s, R = 20; already running (no reload).
VIEW = RequestView(
    request_id="r",
    arrival_s=0.0,
    context_tokens=100,
    predicted_decode_tokens=10,
    predicted_api_s=2.0,
    predicted_api_return_tokens=20,
    has_run=True,
)

# Decode: t = iteration_time(1) = 0.011; area = 0.011 * (10 * 100 + 10 * 11 / 2)
#       = 0.011 * 1055 = 11.605
DECODE = 11.605


def test_no_api_call_is_decode_only() -> None:
    view = RequestView("r", 0.0, 100, 10, None, has_run=True)
    for strategy in Strategy:
        assert memory_over_time(view, strategy, COST) == pytest.approx(DECODE)


def test_preserve() -> None:
    # C = 110 held for T = 2 s: 220; + decode 11.605
    assert memory_over_time(VIEW, Strategy.PRESERVE, COST) == pytest.approx(231.605)


def test_discard() -> None:
    # C + R = 130; prefill_time(130) = 2 * 0.01 + 0.13 = 0.15; 0.15 * 130 = 19.5; + 11.605
    assert memory_over_time(VIEW, Strategy.DISCARD, COST) == pytest.approx(31.105)


def test_swap() -> None:
    # 2 * swap_time(110) * 110 = 2 * 0.011 * 110 = 2.42; + 11.605
    assert memory_over_time(VIEW, Strategy.SWAP, COST) == pytest.approx(14.025)


def test_new_request_adds_its_prefill() -> None:
    # prefill_time(100) * 100 = (0.01 + 0.1) * 100 = 11.0; preserve total 231.605 + 11.0
    view = RequestView("r", 0.0, 100, 10, 2.0, 20, has_run=False)
    assert memory_over_time(view, Strategy.PRESERVE, COST) == pytest.approx(242.605)


def test_resumed_after_discard_adds_recompute() -> None:
    view = RequestView("r", 0.0, 100, 10, 2.0, 20, has_run=True, resumed_strategy=Strategy.DISCARD)
    assert memory_over_time(view, Strategy.PRESERVE, COST) == pytest.approx(242.605)


def test_resumed_after_swap_adds_reload() -> None:
    # swap_time(100) * 100 = 0.01 * 100 = 1.0; preserve total 231.605 + 1.0
    view = RequestView("r", 0.0, 100, 10, 2.0, 20, has_run=True, resumed_strategy=Strategy.SWAP)
    assert memory_over_time(view, Strategy.PRESERVE, COST) == pytest.approx(232.605)


def test_batch_tokens_sets_the_step_time() -> None:
    # t = 0.01 + 0.001 * 5 = 0.015; 0.015 * 1055 = 15.825; + preserve 220
    assert memory_over_time(VIEW, Strategy.PRESERVE, COST, batch_tokens=5) == pytest.approx(235.825)


def test_zero_decode_tokens() -> None:
    # No decode; preserve: 100 * 2 = 200
    view = RequestView("r", 0.0, 100, 0, 2.0, has_run=True)
    assert memory_over_time(view, Strategy.PRESERVE, COST) == pytest.approx(200.0)


def test_invalid_predictions_are_named() -> None:
    with pytest.raises(ValueError, match="predicted_api_s"):
        memory_over_time(RequestView("r", 0.0, 1, 1, -1.0), Strategy.PRESERVE, COST)
    with pytest.raises(ValueError, match="predicted_decode_tokens"):
        memory_over_time(RequestView("r", 0.0, 1, -1, 1.0), Strategy.PRESERVE, COST)
