"""Online predictors: streaming means, fallbacks, hints, oracle mode and MAE."""

from __future__ import annotations

import math

import pytest

from policies.predictors import (
    GLOBAL_KEY,
    ApiDurationPredictor,
    DecodeLengthPredictor,
    StreamingStat,
    expected_call_s,
    remaining_call_s,
)


def test_plain_running_mean() -> None:
    stat = StreamingStat()
    for x in (1.0, 2.0, 3.0, 6.0):
        stat.update(x)
    assert stat.count == 4
    assert stat.mean == pytest.approx(3.0)  # (1 + 2 + 3 + 6) / 4
    assert stat.error_count == 0


def test_ewma() -> None:
    stat = StreamingStat(alpha=0.5)
    stat.update(4.0)  # first value sets the mean: 4
    stat.update(8.0)  # 4 + 0.5 * (8 - 4) = 6
    assert stat.mean == pytest.approx(6.0)
    stat.update(2.0)  # 6 + 0.5 * (2 - 6) = 4
    assert stat.mean == pytest.approx(4.0)


def test_mae_counts_only_observations_with_a_prediction() -> None:
    stat = StreamingStat()
    stat.update(3.0, predicted=1.0)  # |1 - 3| = 2
    stat.update(5.0, predicted=6.0)  # |6 - 5| = 1
    stat.update(7.0)
    assert stat.mae == pytest.approx(1.5)  # (2 + 1) / 2
    assert stat.error_count == 2
    assert stat.count == 3


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5])
def test_invalid_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        StreamingStat(alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        ApiDurationPredictor(alpha=alpha)


def test_api_prior_then_per_tool_then_global() -> None:
    p = ApiDurationPredictor(prior=2.5)
    assert p.predict("search") == 2.5  # nothing observed: prior
    p.observe("search", 4.0)
    p.observe("search", 6.0)
    assert p.predict("search") == pytest.approx(5.0)  # (4 + 6) / 2
    assert p.predict("calc") == pytest.approx(5.0)  # unseen tool: global mean
    p.observe("calc", 1.0)
    assert p.predict("calc") == pytest.approx(1.0)
    assert p.predict(None) == pytest.approx(11 / 3)  # global (4 + 6 + 1) / 3


def test_api_default_prior() -> None:
    assert ApiDurationPredictor().predict(None) == 1.0


def test_api_hint_overrides() -> None:
    p = ApiDurationPredictor()
    p.observe("search", 4.0)
    assert p.predict("search", hint_s=0.5) == 0.5
    assert p.predict("search", 0.0) == 0.0


def test_min_samples_before_a_key_is_trusted() -> None:
    p = ApiDurationPredictor(prior=9.0, min_samples=2)
    p.observe("a", 1.0)
    assert p.predict("a") == 9.0  # key and global have 1 < 2 samples: prior
    p.observe("b", 3.0)
    assert p.predict("a") == pytest.approx(2.0)  # key 1 sample; global (1 + 3) / 2


def test_api_error_report() -> None:
    p = ApiDurationPredictor()
    p.observe("search", 4.0, predicted_s=1.0)  # error 3
    p.observe("search", 2.0, predicted_s=2.0)  # error 0
    p.observe("calc", 1.0, predicted_s=1.5)  # error 0.5
    report = p.error_report()
    assert list(report) == ["calc", "search", GLOBAL_KEY]
    assert report["search"] == {"count": 2, "mean": 3.0, "mae": 1.5, "error_count": 2}
    assert report["calc"]["mae"] == pytest.approx(0.5)
    assert report[GLOBAL_KEY]["count"] == 3
    assert report[GLOBAL_KEY]["mae"] == pytest.approx(3.5 / 3)  # (3 + 0 + 0.5) / 3


def test_api_oracle_returns_truth() -> None:
    p = ApiDurationPredictor(oracle=True)
    assert p.predict("search", hint_s=9.0, truth=3.0) == 3.0
    with pytest.raises(ValueError, match="truth"):
        p.predict("search")


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_api_invalid_values_are_named(bad: float) -> None:
    p = ApiDurationPredictor()
    with pytest.raises(ValueError, match="actual_s"):
        p.observe("x", bad)
    with pytest.raises(ValueError, match="predicted_s"):
        p.observe("x", 1.0, predicted_s=bad)
    with pytest.raises(ValueError, match="hint_s"):
        p.predict("x", hint_s=bad)
    with pytest.raises(ValueError, match="prior"):
        ApiDurationPredictor(prior=bad)
    with pytest.raises(ValueError, match="truth"):
        ApiDurationPredictor(oracle=True).predict("x", truth=bad)


def test_invalid_min_samples() -> None:
    with pytest.raises(ValueError, match="min_samples"):
        ApiDurationPredictor(min_samples=0)


def test_observe_rejects_before_updating() -> None:
    p = ApiDurationPredictor()
    with pytest.raises(ValueError):
        p.observe("x", 1.0, predicted_s=-1.0)
    assert p.error_report() == {GLOBAL_KEY: StreamingStat().report()}


def test_decode_length_predictor() -> None:
    p = DecodeLengthPredictor()
    assert p.predict(None) == 128  # default prior
    p.observe("seg0", 10)
    p.observe("seg0", 11)
    p.observe("seg0", 13, predicted_tokens=20)  # error 7
    assert p.predict("seg0") == 11  # 34 / 3 = 11.33 -> 11
    assert isinstance(p.predict("seg0"), int)
    assert p.predict("seg1") == 11  # global fallback
    assert p.predict("seg0", hint_tokens=40) == 40
    assert p.error_report()["seg0"]["mae"] == pytest.approx(7.0)
    with pytest.raises(ValueError, match="actual_tokens"):
        p.observe("seg0", -1)
    with pytest.raises(ValueError, match="hint_tokens"):
        p.predict("seg0", hint_tokens=-3)


def test_decode_length_oracle() -> None:
    p = DecodeLengthPredictor(oracle=True)
    assert p.predict("seg0", truth=42) == 42
    with pytest.raises(ValueError, match="truth"):
        p.predict("seg0", hint_tokens=5)


def test_expected_call_is_the_prediction_until_the_call_outruns_it() -> None:
    assert expected_call_s(5.0, 0.0) == 5.0
    assert expected_call_s(5.0, 4.9) == 5.0
    assert expected_call_s(5.0, 7.5) == 7.5  # overdue: at least as long again
    assert expected_call_s(0.0, 0.2) == 0.2
    with pytest.raises(ValueError, match="elapsed_s"):
        expected_call_s(1.0, -1.0)


def test_remaining_call_counts_down_to_due_now_and_stays_there() -> None:
    assert remaining_call_s(5.0, 0.0) == 5.0
    assert remaining_call_s(5.0, 1.5) == 3.5
    assert remaining_call_s(5.0, 5.0) == 0.0
    assert remaining_call_s(5.0, 30.0) == 0.0  # overdue: due now, not "as long again"
    assert remaining_call_s(None, 2.0) == 0.0  # no prediction: due now
    for predicted in (1.0, None):
        with pytest.raises(ValueError, match="elapsed_s"):
            remaining_call_s(predicted, -1.0)
    with pytest.raises(ValueError, match="predicted_s"):
        remaining_call_s(-1.0, 0.0)
