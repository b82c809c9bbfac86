"""CostModel: every formula against hand-computed numbers, and the profiling fit."""

from __future__ import annotations

import math

import pytest

from policies.cost_model import CostModel

# b = 0.01 s/iteration, a = 0.001 s/token, swap 1e-4 s/token, M = 2 bytes, budget 100.
COST = CostModel(
    iter_fixed_s=0.01,
    iter_per_token_s=0.001,
    swap_s_per_token=0.0001,
    kv_bytes_per_token=2.0,
    token_budget=100,
)


def test_default_token_budget_is_the_reference_384() -> None:
    assert CostModel(0.0, 0.0, 0.0, 0.0).token_budget == 384


def test_iteration_time() -> None:
    # 0.01 + 0.001 * 50 = 0.06
    assert COST.iteration_time(50) == pytest.approx(0.06)
    assert COST.iteration_time(0) == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        (0, 0.0),  # nothing to compute, no iteration
        (1, 0.011),  # 1 chunk: 0.01 + 0.001 * 1
        (100, 0.11),  # 1 chunk: 0.01 + 0.001 * 100
        (101, 0.121),  # 2 chunks: 2 * 0.01 + 0.001 * 101
        (250, 0.28),  # 3 chunks: 3 * 0.01 + 0.001 * 250
    ],
)
def test_prefill_time_is_chunked(tokens: int, expected: float) -> None:
    assert COST.prefill_time(tokens) == pytest.approx(expected)


def test_decode_time() -> None:
    # 10 steps * (0.01 + 0.001 * 1) = 0.11
    assert COST.decode_time(10) == pytest.approx(0.11)
    # 10 steps * (0.01 + 0.001 * 5) = 0.15
    assert COST.decode_time(10, batch_tokens=5) == pytest.approx(0.15)
    assert COST.decode_time(0) == 0.0


def test_swap_time() -> None:
    # 300 * 1e-4 = 0.03
    assert COST.swap_time(300) == pytest.approx(0.03)


@pytest.mark.parametrize("method", ["iteration_time", "prefill_time", "decode_time", "swap_time"])
def test_negative_tokens_rejected(method: str) -> None:
    with pytest.raises(ValueError, match="tokens"):
        getattr(COST, method)(-1)


@pytest.mark.parametrize(
    "field", ["iter_fixed_s", "iter_per_token_s", "swap_s_per_token", "kv_bytes_per_token"]
)
@pytest.mark.parametrize("bad", [-0.5, math.nan, math.inf])
def test_invalid_fields_are_named(field: str, bad: float) -> None:
    params = dict(iter_fixed_s=0.0, iter_per_token_s=0.0, swap_s_per_token=0.0)
    params["kv_bytes_per_token"] = 0.0
    params[field] = bad
    with pytest.raises(ValueError, match=field):
        CostModel(**params)


@pytest.mark.parametrize("budget", [0, -384, 1.5, True])
def test_invalid_token_budget(budget: object) -> None:
    with pytest.raises(ValueError, match="token_budget"):
        CostModel(0.0, 0.0, 0.0, 0.0, token_budget=budget)  # type: ignore[arg-type]


def test_fit_recovers_exact_linear_data() -> None:
    # seconds = 0.005 + 2e-5 * tokens, sampled exactly.
    samples = [(t, 0.005 + 2e-5 * t) for t in (1, 64, 128, 256, 384)]
    cost = CostModel.fit(samples, swap_s_per_token=1e-6, kv_bytes_per_token=4096.0)
    assert cost.iter_fixed_s == pytest.approx(0.005)
    assert cost.iter_per_token_s == pytest.approx(2e-5)
    assert cost.swap_s_per_token == 1e-6
    assert cost.kv_bytes_per_token == 4096.0
    assert cost.token_budget == 384


def test_fit_clamps_negative_slope_to_the_mean() -> None:
    # Times fall with tokens (noise): slope -> 0, intercept -> mean (0.02 + 0.01) / 2 = 0.015.
    cost = CostModel.fit([(10, 0.02), (20, 0.01)], swap_s_per_token=0, kv_bytes_per_token=1)
    assert cost.iter_per_token_s == 0.0
    assert cost.iter_fixed_s == pytest.approx(0.015)


def test_fit_clamps_negative_intercept_and_refits_through_origin() -> None:
    # y = -0.01 + 0.001 x at x = 20, 40: y = 0.01, 0.03. OLS intercept -0.01 < 0, so
    # intercept -> 0 and slope = sum(xy) / sum(xx) = (0.2 + 1.2) / (400 + 1600) = 0.0007.
    cost = CostModel.fit([(20, 0.01), (40, 0.03)], swap_s_per_token=0, kv_bytes_per_token=1)
    assert cost.iter_fixed_s == 0.0
    assert cost.iter_per_token_s == pytest.approx(0.0007)


def test_fit_needs_two_distinct_token_counts() -> None:
    with pytest.raises(ValueError, match="2 distinct"):
        CostModel.fit([(10, 0.1), (10, 0.2)], swap_s_per_token=0, kv_bytes_per_token=1)
    with pytest.raises(ValueError, match="2 distinct"):
        CostModel.fit([], swap_s_per_token=0, kv_bytes_per_token=1)


def test_fit_rejects_negative_samples() -> None:
    with pytest.raises(ValueError, match="seconds"):
        CostModel.fit([(10, -0.1), (20, 0.2)], swap_s_per_token=0, kv_bytes_per_token=1)


def test_cost_model_is_frozen() -> None:
    with pytest.raises(AttributeError):
        COST.iter_fixed_s = 1.0  # type: ignore[misc]
