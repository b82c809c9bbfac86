"""Online predictors of what MARS cannot know: API durations and decode lengths.

They learn from the sessions the engine serves (MARS.md, point 3), per key
(a tool or API type, or a segment index), falling back to a global estimate
and then to a configured prior. A client hint overrides the estimate. In
oracle mode (benchmarks replaying a trace) the true value is returned.

These are the only stateful objects in `policies`: the engine owns one of
each, calls `predict` when it builds a `RequestView` and `observe` when the
truth is known. They never read their inputs after returning.

Estimates are a plain running mean by default (every observation weighs the
same: right for stationary tools); give `alpha` for an exponentially
weighted mean that follows tools whose latency drifts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

GLOBAL_KEY = "__all__"
"""Key of the all-tools estimate in `error_report()`."""


def _check_value(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_alpha(alpha: float | None) -> None:
    if alpha is not None and not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1] or None, got {alpha!r}")


@dataclass
class StreamingStat:
    """Count, mean, and mean absolute prediction error of a stream of values."""

    alpha: float | None = None
    """None: plain running mean. Otherwise EWMA weight of the newest value."""
    count: int = 0
    mean: float = 0.0
    error_count: int = 0
    """Observations that came with a prediction (the MAE's denominator)."""
    mae: float = 0.0
    """Mean |predicted - actual| over those observations (always a plain mean)."""

    def __post_init__(self) -> None:
        _check_alpha(self.alpha)

    def update(self, actual: float, predicted: float | None = None) -> None:
        """Fold one observed value (and the prediction made for it) into the stats."""
        self.count += 1
        if self.alpha is None or self.count == 1:
            self.mean += (actual - self.mean) / self.count
        else:
            self.mean += self.alpha * (actual - self.mean)
        if predicted is not None:
            self.error_count += 1
            self.mae += (abs(predicted - actual) - self.mae) / self.error_count

    def report(self) -> dict[str, float]:
        """count, mean, mae and error_count as a plain dict."""
        return {
            "count": self.count,
            "mean": self.mean,
            "mae": self.mae,
            "error_count": self.error_count,
        }


@dataclass
class _KeyedPredictor:
    """Per-key streaming means with global and prior fallbacks, hints and oracle."""

    prior: float
    alpha: float | None = None
    oracle: bool = False
    """Return the `truth=` given to `predict` (benchmarks that know the trace)."""
    min_samples: int = 1
    """Observations a key (or the global stat) needs before its mean is used."""
    _value_name: ClassVar[str] = "value"
    _hint_name: ClassVar[str] = "hint"
    _predicted_name: ClassVar[str] = "predicted"
    _by_key: dict[str, StreamingStat] = field(default_factory=dict, init=False, repr=False)
    _global: StreamingStat = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_value("prior", self.prior)
        _check_alpha(self.alpha)
        if isinstance(self.min_samples, bool) or not isinstance(self.min_samples, int):
            raise ValueError(f"min_samples must be an int, got {self.min_samples!r}")
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {self.min_samples!r}")
        self._global = StreamingStat(alpha=self.alpha)

    def _estimate(self, key: str | None, hint: float | None, truth: float | None) -> float:
        if self.oracle:
            if truth is None:
                raise ValueError(f"truth is required in oracle mode (predicting {key!r})")
            return _check_value("truth", truth)
        if hint is not None:
            return _check_value(self._hint_name, hint)
        stat = self._by_key.get(key) if key is not None else None
        if stat is not None and stat.count >= self.min_samples:
            return stat.mean
        if self._global.count >= self.min_samples:
            return self._global.mean
        return self.prior

    def _observe(self, key: str | None, actual: float, predicted: float | None) -> None:
        actual = _check_value(self._value_name, actual)
        if predicted is not None:
            predicted = _check_value(self._predicted_name, predicted)
        if key is not None:
            stat = self._by_key.get(key)
            if stat is None:
                stat = self._by_key[key] = StreamingStat(alpha=self.alpha)
            stat.update(actual, predicted)
        self._global.update(actual, predicted)

    def error_report(self) -> dict[str, dict[str, float]]:
        """Per-key count/mean/mae/error_count, plus the all-keys stat under GLOBAL_KEY."""
        report = {key: stat.report() for key, stat in sorted(self._by_key.items())}
        report[GLOBAL_KEY] = self._global.report()
        return report


@dataclass
class ApiDurationPredictor(_KeyedPredictor):
    """Seconds the next API call will take, learned per tool.

    Falls back from the tool's mean to the all-tools mean to `prior`.
    """

    prior: float = 1.0
    """Seconds assumed before anything has been observed."""
    _value_name: ClassVar[str] = "actual_s"
    _hint_name: ClassVar[str] = "hint_s"
    _predicted_name: ClassVar[str] = "predicted_s"

    def predict(
        self, tool: str | None, hint_s: float | None = None, *, truth: float | None = None
    ) -> float:
        """Predicted seconds; a client's `hint_s` overrides the learned estimate
        (oracle mode returns `truth` and ignores the hint)."""
        return self._estimate(tool, hint_s, truth)

    def observe(self, tool: str | None, actual_s: float, predicted_s: float | None = None) -> None:
        """Record a finished call's duration and, if given, the prediction made for it."""
        self._observe(tool, actual_s, predicted_s)


@dataclass
class DecodeLengthPredictor(_KeyedPredictor):
    """Tokens a request generates before its next API call (or its end).

    Keyed by what the engine knows ahead (the previous tool's name, or the
    segment index as a string); None uses the all-keys estimate.
    """

    prior: float = 128.0
    """Tokens assumed before anything has been observed."""
    _value_name: ClassVar[str] = "actual_tokens"
    _hint_name: ClassVar[str] = "hint_tokens"
    _predicted_name: ClassVar[str] = "predicted_tokens"

    def predict(
        self, key: str | None, hint_tokens: int | None = None, *, truth: int | None = None
    ) -> int:
        """Predicted tokens, rounded; `hint_tokens` overrides, oracle returns `truth`."""
        return round(self._estimate(key, hint_tokens, truth))

    def observe(
        self, key: str | None, actual_tokens: int, predicted_tokens: int | None = None
    ) -> None:
        """Record a segment's generated tokens and, if given, the prediction made for it."""
        self._observe(key, actual_tokens, predicted_tokens)


def expected_call_s(predicted_s: float, elapsed_s: float) -> float:
    """The duration to price a running API call at, `elapsed_s` into it.

    The prediction while the call is within it; once the call has outrun it,
    the time already elapsed: a call that has taken X so far is expected to
    take at least X more (API and human-turn latencies are heavy-tailed).
    Without this, a call predicted to be instant would keep its KV preserved
    however long it actually takes.
    """
    return max(_check_value("predicted_s", predicted_s), _check_value("elapsed_s", elapsed_s))


def remaining_call_s(predicted_s: float | None, elapsed_s: float) -> float:
    """Seconds until a running API call is predicted to return, `elapsed_s`
    into it (a paused session's ``paused_returns`` entry for dispatch).

    ``expected_call_s(predicted_s, elapsed_s) - elapsed_s``: the rest of the
    prediction while the call is within it, and 0 (due now) once the call has
    outrun it or when there is no prediction (`predicted_s` None). Due now is
    the conservative reading for placement: an overdue call's prediction has
    proved wrong, so its session's KV blocks are counted as needed at any
    moment rather than assumed far off. `expected_call_s` reads an overdue
    call the other way (at least as long again) because each errs towards the
    safe side of its own decision: demotion frees the blocks of a call that
    may run long, placement keeps room for a session that may return now.
    Due now also keeps the estimate continuous: it counts down to 0 and stays.
    """
    if predicted_s is None:
        _check_value("elapsed_s", elapsed_s)
        return 0.0
    return max(0.0, expected_call_s(predicted_s, elapsed_s) - elapsed_s)
