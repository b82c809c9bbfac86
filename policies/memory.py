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

from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from policies._arrays import Floats, Ints, first_negative, read_only, where
from policies.cost_model import CostModel
from policies.types import (
    DISCARD_CODE,
    PRESERVE_CODE,
    RequestColumns,
    RequestView,
    Strategy,
    strategy_code,
)
from policies.waste import LeastWaste, pick_least

# The area functions read a `RequestView` (one request, Python scalars) or a
# `RequestColumns` (numpy arrays, one entry per request): both expose the
# fields used here under the same names, and every step is an operator or a
# `policies._arrays` helper that works on either.


def _reload_area(r: Any, cost: CostModel) -> Floats:
    """Area of bringing the context back into device memory before decoding."""
    c = r.context_tokens
    return where(
        r.needs_recompute,
        cost.prefill_time(c) * c,
        where(r.needs_swap_in, cost.swap_time(c) * c, 0.0),
    )


def _decode_area(r: Any, cost: CostModel, batch_tokens: int) -> Floats:
    """Area of decoding d tokens while the KV grows by one token per step."""
    c = r.context_tokens
    d = r.predicted_decode_tokens
    step_s = cost.iteration_time(batch_tokens)
    return step_s * (d * c + d * (d + 1) / 2)


class AreaTerms(NamedTuple):
    """A request's area split where the strategy enters, of one `RequestView` or
    of each request of a `RequestColumns`: the area before the call, and the
    call's area under each strategy (0.0 for all three with no call ahead).

    They depend on the request and the cost model only, so an engine that
    ranks the same waiting requests every iteration can keep them per request
    (`policies.priced_rows`); the least-waste strategy, which depends on the
    running batch, then just picks one call area.
    """

    before_call: Floats
    """Reload plus decode areas."""
    call_preserve: Floats
    call_discard: Floats
    call_swap: Floats


def area_terms(r: Any, cost: CostModel, *, batch_tokens: int = 1) -> AreaTerms:
    """`AreaTerms` of a `RequestView`, or of every request of a `RequestColumns`
    (computed once per columns, cost model and `batch_tokens`, unless the
    columns were joined from rows that carry them). Raises ValueError for
    negative decode tokens or an API duration below zero.
    """
    if isinstance(r, RequestColumns):
        key = (area_terms, cost, batch_tokens)
        return r.memo(key, lambda: read_only(_area_terms(r, cost, batch_tokens)))
    return _area_terms(r, cost, batch_tokens)


def keep_area_terms(
    columns: RequestColumns, cost: CostModel, terms: AreaTerms, *, batch_tokens: int = 1
) -> None:
    """Give `columns` their `AreaTerms` under `cost` and `batch_tokens`, known
    already (read-only arrays, one entry per request): `area_terms` then
    returns them."""
    columns.memo((area_terms, cost, batch_tokens), lambda: terms)


def _area_terms(r: Any, cost: CostModel, batch_tokens: int) -> AreaTerms:
    bad = first_negative(r.predicted_decode_tokens)
    if bad is not None:
        raise ValueError(f"predicted_decode_tokens must be >= 0, got {bad!r}")
    bad = first_negative(r.api_s)  # api_s is 0.0 where no call is expected
    if bad is not None:
        raise ValueError(f"predicted_api_s must be >= 0, got {bad!r}")
    before_call = _reload_area(r, cost) + _decode_area(r, cost, batch_tokens)
    # The area spent on the KV around the next API call, under each strategy.
    held = r.context_tokens + r.predicted_decode_tokens
    rebuilt = held + r.predicted_api_return_tokens
    has_call = r.has_api_call
    return AreaTerms(
        before_call,
        call_preserve=where(has_call, held * r.api_s, 0.0),
        call_discard=where(has_call, cost.prefill_time(rebuilt) * rebuilt, 0.0),
        call_swap=where(has_call, 2 * cost.swap_time(held) * held, 0.0),
    )


def memory_area(r: Any, code: Ints, cost: CostModel, *, batch_tokens: int = 1) -> Floats:
    """`memory_over_time` of a `RequestView` or of every request in a
    `RequestColumns`, under the strategy with code `code` (per request for
    columns: see `policies.types.STRATEGY_BY_CODE`). Raises ValueError for
    negative decode tokens or an API duration below zero.
    """
    terms = area_terms(r, cost, batch_tokens=batch_tokens)
    call = where(
        code == PRESERVE_CODE,
        terms.call_preserve,
        where(code == DISCARD_CODE, terms.call_discard, terms.call_swap),
    )
    return terms.before_call + call


def least_waste_area(r: Any, least: LeastWaste, cost: CostModel) -> Floats:
    """`memory_area` of a `RequestView` or of every request in a `RequestColumns`
    under the least-waste strategy that `least` describes (see
    `policies.waste.least_waste`): the comparisons that pick the strategy pick
    its call area, with no strategy codes in between (MARS's score)."""
    terms = area_terms(r, cost)
    call = pick_least(least, terms.call_preserve, terms.call_discard, terms.call_swap)
    return terms.before_call + call


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
    return memory_area(view, strategy_code(strategy), cost, batch_tokens=batch_tokens)


def memory_over_time_columns(
    columns: RequestColumns,
    codes: NDArray[np.integer],
    cost: CostModel,
    *,
    batch_tokens: int = 1,
) -> NDArray[np.float64]:
    """`memory_over_time` of every request in `columns`, each under the strategy
    whose code (`policies.types.STRATEGY_BY_CODE`) is in `codes`; equal, entry
    for entry, to the scalar function on the same request."""
    return memory_area(columns, codes, cost, batch_tokens=batch_tokens)
