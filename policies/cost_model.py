"""Time costs of engine work, measured on the model and hardware in use.

MARS ranks requests and INFERCEPT chooses a KV strategy from predicted
times (an iteration, a recompute, a swap). Those times depend on the model,
the accelerator and the engine build, so they are *fitted from start-up
profiling* (`CostModel.fit`) or read from config; nothing here knows a GPU.

One engine iteration that processes `n` batched tokens is modelled as
``iter_fixed_s + iter_per_token_s * n`` (MARS.md's b + a * tokens). Prefill
is chunked: a context of `c` tokens takes ``ceil(c / token_budget)``
iterations that together process `c` tokens.

Every time method takes one token count or a numpy array of them (one per
request) and answers in kind: the formulas use only operators that work on
both, so the ranking of 1,000 requests runs as a few array operations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from policies._arrays import Floats, Ints, first_negative

DEFAULT_TOKEN_BUDGET = 384
"""Iteration token budget of the reference MARS runs (chunked prefill)."""


def _check_non_negative(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_tokens(name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0 tokens, got {value!r}")


@dataclass(frozen=True)
class CostModel:
    """Linear iteration-time model plus swap and KV-size constants.

    All times are seconds; every method is pure, O(1) per token count, and
    accepts a numpy array of counts as well as one count (see the module
    docstring).
    """

    iter_fixed_s: float
    """b: seconds every iteration costs regardless of its tokens."""
    iter_per_token_s: float
    """a: seconds each batched token adds to an iteration."""
    swap_s_per_token: float
    """Seconds to copy one token's KV one way between device and host."""
    kv_bytes_per_token: float
    """Bytes of KV cache one token occupies (all layers); M in the waste terms."""
    token_budget: int = DEFAULT_TOKEN_BUDGET
    """Most tokens one iteration processes; sets how many chunks a prefill takes."""

    def __post_init__(self) -> None:
        _check_non_negative("iter_fixed_s", self.iter_fixed_s)
        _check_non_negative("iter_per_token_s", self.iter_per_token_s)
        _check_non_negative("swap_s_per_token", self.swap_s_per_token)
        _check_non_negative("kv_bytes_per_token", self.kv_bytes_per_token)
        if isinstance(self.token_budget, bool) or not isinstance(self.token_budget, int):
            raise ValueError(f"token_budget must be an int, got {self.token_budget!r}")
        if self.token_budget <= 0:
            raise ValueError(f"token_budget must be > 0, got {self.token_budget!r}")

    def iteration_time(self, num_tokens: Ints) -> Floats:
        """Seconds of one iteration that processes `num_tokens` batched tokens."""
        bad = first_negative(num_tokens)
        if bad is not None:
            raise ValueError(f"num_tokens must be >= 0 tokens, got {bad!r}")
        return self.iter_fixed_s + self.iter_per_token_s * num_tokens

    def prefill_time(self, tokens: Ints) -> Floats:
        """Seconds to (re)compute `tokens` of context in budget-sized chunks.

        Each chunk is its own iteration, so the fixed cost is paid
        ``ceil(tokens / token_budget)`` times; the per-token cost once per token.
        Zero tokens take no iteration and 0.0 seconds.
        """
        bad = first_negative(tokens)
        if bad is not None:
            raise ValueError(f"tokens must be >= 0 tokens, got {bad!r}")
        if isinstance(tokens, np.ndarray):
            # Float division is exact for whole multiples and, unlike numpy's
            # integer floor division, cheap: this runs for every waiting request.
            n_iter = np.ceil(tokens / self.token_budget)
        else:
            n_iter = -(-tokens // self.token_budget)
        return n_iter * self.iter_fixed_s + self.iter_per_token_s * tokens

    def decode_time(self, tokens: Ints, batch_tokens: int = 1) -> Floats:
        """Seconds to decode `tokens` tokens, one per iteration of `batch_tokens` tokens."""
        bad = first_negative(tokens)
        if bad is not None:
            raise ValueError(f"tokens must be >= 0 tokens, got {bad!r}")
        return tokens * self.iteration_time(batch_tokens)

    def swap_time(self, tokens: Ints) -> Floats:
        """Seconds to copy `tokens` tokens of KV one way (out or in)."""
        bad = first_negative(tokens)
        if bad is not None:
            raise ValueError(f"tokens must be >= 0 tokens, got {bad!r}")
        return tokens * self.swap_s_per_token

    @classmethod
    def fit(
        cls,
        samples: Sequence[tuple[int, float]],
        *,
        swap_s_per_token: float,
        kv_bytes_per_token: float,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
    ) -> CostModel:
        """Fit ``seconds = b + a * tokens`` by ordinary least squares.

        `samples` are (batched tokens, measured iteration seconds) pairs from
        start-up profiling. Both coefficients are clamped at 0: measurement
        noise can tilt a fit negative, and a negative time would invert the
        ranking; when the intercept is clamped the slope is refitted through
        the origin. Needs at least two distinct token counts, or the slope is
        undetermined.
        """
        if len({tokens for tokens, _ in samples}) < 2:
            raise ValueError(
                f"samples must hold at least 2 distinct token counts, got {len(samples)} "
                f"sample(s) with {len({t for t, _ in samples})} distinct"
            )
        for tokens, seconds in samples:
            _check_tokens("samples[].tokens", tokens)
            _check_non_negative("samples[].seconds", seconds)
        n = len(samples)
        mean_x = sum(t for t, _ in samples) / n
        mean_y = sum(s for _, s in samples) / n
        sxx = sum((t - mean_x) ** 2 for t, _ in samples)
        sxy = sum((t - mean_x) * (s - mean_y) for t, s in samples)
        slope = max(0.0, sxy / sxx)
        intercept = mean_y - slope * mean_x
        if intercept < 0:
            # Refit through the origin so the clamped line still fits the data best.
            intercept = 0.0
            sum_xx = sum(t * t for t, _ in samples)
            slope = max(0.0, sum(t * s for t, s in samples) / sum_xx)
        return cls(
            iter_fixed_s=intercept,
            iter_per_token_s=slope,
            swap_s_per_token=swap_s_per_token,
            kv_bytes_per_token=kv_bytes_per_token,
            token_budget=token_budget,
        )
