"""Predicted memory-over-time area of a request: MARS's ranking score.

The area (token * seconds) under a request's KV-memory curve from now to
the return of its next API call, under a given KV `Strategy`. With
c = `context_tokens`, d = `predicted_decode_tokens`, T = `predicted_api_s`,
R = `predicted_api_return_tokens`, C = c + d:

1. Context not yet in device memory:
   - never run, or resumed after DISCARD (recompute):  prefill_time(c) * c
   - resumed after SWAP (reload from host):             swap_time(c) * c
   (memory is charged at the full context while the work runs: a deliberate
   over-estimate that keeps the score O(1)).
2. Decode d tokens; each step takes t = iteration_time(batch_tokens) and
   memory grows one token per step, from c + 1 to c + d:
   t * (d * c + d * (d + 1) / 2).
3. The API call, only when T is not None:
   - PRESERVE: C * T                               (held idle for the call)
   - DISCARD:  prefill_time(C + R) * (C + R)       (nothing held during the
     call; the recompute of context plus returned tokens afterwards)
   - SWAP:     2 * swap_time(C) * C                (held during the copy out
     and the copy back)

Smaller is better: a request that holds little memory for little time frees
room for others soonest. `batch_tokens` defaults to 1 (a per-request decode
step) because the ranking compares requests, and the batch size is common to
all of them.
"""

from __future__ import annotations

from policies.cost_model import CostModel
from policies.types import RequestView, Strategy

_PRESERVE = Strategy.PRESERVE  # module constants: enum attribute lookup is slow on 3.11
_DISCARD = Strategy.DISCARD
_SWAP = Strategy.SWAP


def _reload_area(view: RequestView, cost: CostModel) -> float:
    """Area of bringing the context back into device memory before decoding."""
    c = view.context_tokens
    if not view.has_run or view.resumed_strategy is _DISCARD:
        return cost.prefill_time(c) * c
    if view.resumed_strategy is _SWAP:
        return cost.swap_time(c) * c
    return 0.0


def _decode_area(view: RequestView, cost: CostModel, batch_tokens: int) -> float:
    """Area of decoding d tokens while the KV grows by one token per step."""
    c = view.context_tokens
    d = view.predicted_decode_tokens
    step_s = cost.iteration_time(batch_tokens)
    return step_s * (d * c + d * (d + 1) / 2)


def _api_area(view: RequestView, strategy: Strategy, cost: CostModel) -> float:
    """Area spent on the KV around the next API call under `strategy`."""
    if view.predicted_api_s is None:
        return 0.0
    held = view.context_tokens + view.predicted_decode_tokens
    if strategy is _PRESERVE:
        return held * view.predicted_api_s
    if strategy is _DISCARD:
        rebuilt = held + view.predicted_api_return_tokens
        return cost.prefill_time(rebuilt) * rebuilt
    return 2 * cost.swap_time(held) * held


def memory_over_time(
    view: RequestView,
    strategy: Strategy,
    cost: CostModel,
    *,
    batch_tokens: int = 1,
) -> float:
    """Token * seconds the request occupies until its next API call returns.

    See the module docstring for the formula. O(1); raises ValueError for
    negative token counts or an API duration below zero.
    """
    if view.predicted_decode_tokens < 0:
        raise ValueError(
            f"predicted_decode_tokens must be >= 0, got {view.predicted_decode_tokens!r}"
        )
    if view.predicted_api_s is not None and view.predicted_api_s < 0:
        raise ValueError(f"predicted_api_s must be >= 0, got {view.predicted_api_s!r}")
    return (
        _reload_area(view, cost)
        + _decode_area(view, cost, batch_tokens)
        + _api_area(view, strategy, cost)
    )
