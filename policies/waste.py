"""INFERCEPT's memory-waste terms, the per-request KV strategy, and demotion.

With C = the request's context tokens, M = KV bytes per token, T = the API
call's duration, C_other = context tokens of the other running requests and
C_batch = context tokens of the whole running batch (all in byte * seconds):

- waste_preserve = T * C * M               (memory held idle for the call)
- waste_discard  = t_prefill(C) * C * M + t_prefill(C) * C_other * M
                   (the recompute holds the request's memory and stalls the batch)
- waste_swap     = 2 * t_swap(C) * C_batch * M
                   (the copy out and back stalls the batch; needs host space)

The chosen strategy is the allowed one with the least waste.

`choose_strategy` prices one `RequestView`; `choose_strategies` prices every
request of a `RequestColumns` at once with the same functions (they work on
Python scalars and on numpy arrays alike), so both give the same answers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from policies._arrays import Flags, Floats, Ints, first_outside, floor_at, read_only, smaller, where
from policies.cost_model import CostModel
from policies.types import (
    DISCARD_CODE,
    PRESERVE_CODE,
    STRATEGY_BY_CODE,
    SWAP_CODE,
    BatchView,
    RequestColumns,
    RequestView,
    Strategy,
)

ALL_STRATEGIES: frozenset[Strategy] = frozenset(Strategy)

_PRESERVE = Strategy.PRESERVE  # module constants: enum attribute lookup is slow on 3.11
_DISCARD = Strategy.DISCARD
_SWAP = Strategy.SWAP
_INT8_CODES = (np.int8(PRESERVE_CODE), np.int8(DISCARD_CODE), np.int8(SWAP_CODE))
"""Codes for `pick_least`'s preserve, discard, swap: picked as int8 (numpy keeps
a typed scalar's type), `StrategyChoices.codes`' dtype."""


def waste_preserve(context_tokens: Ints, api_s: Floats, cost: CostModel) -> Floats:
    """T * C * M: the request's KV sits idle in device memory for the whole call."""
    return api_s * context_tokens * cost.kv_bytes_per_token


def waste_discard(context_tokens: Ints, other_tokens: Ints, cost: CostModel) -> Floats:
    """t_prefill(C) * C * M + t_prefill(C) * C_other * M: recompute holds both."""
    t_prefill = cost.prefill_time(context_tokens)
    own = _own_recompute_waste(t_prefill, context_tokens, cost)
    return _recompute_waste(own, t_prefill, other_tokens, cost)


def waste_swap(context_tokens: Ints, batch_tokens: int, cost: CostModel) -> Floats:
    """2 * t_swap(C) * C_batch * M: the whole batch waits on the copy out and back."""
    return _round_trip_waste(2 * cost.swap_time(context_tokens), batch_tokens, cost)


# The waste formulas split where the running batch enters, so that the part
# before it (`WasteTerms`) can be kept per request between iterations.


def _own_recompute_waste(t_prefill: Floats, context_tokens: Ints, cost: CostModel) -> Floats:
    """t_prefill(C) * C * M: the discard waste of the request's own memory."""
    return t_prefill * context_tokens * cost.kv_bytes_per_token


def _recompute_waste(own: Floats, t_prefill: Floats, other_tokens: Ints, cost: CostModel) -> Floats:
    """The discard waste, from its own part and the other running tokens."""
    return own + t_prefill * other_tokens * cost.kv_bytes_per_token


def _round_trip_waste(round_trip_s: Floats, batch_tokens: int, cost: CostModel) -> Floats:
    """The swap waste, from the seconds of the copy out and back (2 * t_swap(C))."""
    return round_trip_s * batch_tokens * cost.kv_bytes_per_token


class WasteTerms(NamedTuple):
    """The parts of a request's wastes that the running batch does not change,
    of one `RequestView` or of each request of a `RequestColumns`.

    They depend on the request and the cost model only, so an engine that
    prices the same waiting requests every iteration can keep them per request
    (`policies.priced_rows`) and pay per iteration only for the batch's part.
    """

    preserve: Floats
    """`waste_preserve`: T * C * M."""
    prefill_s: Floats
    """t_prefill(C)."""
    own_recompute: Floats
    """t_prefill(C) * C * M."""
    round_trip_s: Floats
    """2 * t_swap(C)."""


def waste_terms(r: Any, cost: CostModel) -> WasteTerms:
    """`WasteTerms` of a `RequestView`, or of every request of a `RequestColumns`
    (computed once per columns and cost model, unless the columns were joined
    from rows that carry them). Raises ValueError for an API duration that is
    not finite and >= 0, or a negative context.
    """
    if isinstance(r, RequestColumns):
        return r.memo((waste_terms, cost), lambda: read_only(_waste_terms(r, cost)))
    return _waste_terms(r, cost)


def keep_waste_terms(columns: RequestColumns, cost: CostModel, terms: WasteTerms) -> None:
    """Give `columns` their `WasteTerms` under `cost`, known already (read-only
    arrays, one entry per request): `waste_terms` then returns them."""
    columns.memo((waste_terms, cost), lambda: terms)


def _waste_terms(r: Any, cost: CostModel) -> WasteTerms:
    c = r.context_tokens
    api_s = r.api_s  # 0.0 when no call is expected
    bad = first_outside(api_s, 0.0, math.inf)
    if bad is not None:
        raise ValueError(f"predicted_api_s must be finite and >= 0, got {bad!r}")
    t_prefill = cost.prefill_time(c)
    return WasteTerms(
        preserve=waste_preserve(c, api_s, cost),
        prefill_s=t_prefill,
        own_recompute=_own_recompute_waste(t_prefill, c, cost),
        round_trip_s=2 * cost.swap_time(c),
    )


@dataclass(frozen=True)
class StrategyChoice:
    """A strategy decision and the wastes it was made from (inf = not allowed)."""

    strategy: Strategy
    waste_preserve: float
    waste_discard: float
    waste_swap: float

    def waste_of(self, strategy: Strategy) -> float:
        """The predicted waste (byte * seconds) of `strategy`."""
        if strategy is _PRESERVE:
            return self.waste_preserve
        if strategy is _DISCARD:
            return self.waste_discard
        return self.waste_swap

    @property
    def waste(self) -> float:
        """The waste of the chosen strategy."""
        return self.waste_of(self.strategy)


@dataclass(frozen=True, eq=False)
class StrategyChoices:
    """`StrategyChoice`s of every request in a `RequestColumns`, as columns."""

    codes: NDArray[np.int8]
    """Chosen strategy per request, as `policies.types.STRATEGY_BY_CODE` codes."""
    waste_preserve: NDArray[np.float64]
    waste_discard: NDArray[np.float64]
    waste_swap: NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.codes)

    def choice(self, index: int) -> StrategyChoice:
        """The `StrategyChoice` of the request at position `index`."""
        return StrategyChoice(
            STRATEGY_BY_CODE[int(self.codes[index])],
            float(self.waste_preserve[index]),
            float(self.waste_discard[index]),
            float(self.waste_swap[index]),
        )


def _barred(strategy: Strategy, allowed: frozenset[Strategy]) -> float:
    """Added to a strategy's waste: 0.0 when allowed, inf when not."""
    return 0.0 if strategy in allowed else math.inf


def _wastes(
    r: Any, batch: BatchView, cost: CostModel, allowed: frozenset[Strategy]
) -> tuple[Floats, Floats, Floats]:
    """(preserve, discard, swap) wastes of a `RequestView` or of each request of a
    `RequestColumns`; inf for a strategy not possible."""
    terms = waste_terms(r, cost)
    c = r.context_tokens
    batch_tokens = batch.running_context_tokens
    w_preserve = terms.preserve
    other_tokens = floor_at(batch_tokens - c, 0)
    w_discard = _recompute_waste(terms.own_recompute, terms.prefill_s, other_tokens, cost)
    fits_host = c <= batch.free_host_tokens
    w_swap = where(fits_host, _round_trip_waste(terms.round_trip_s, batch_tokens, cost), math.inf)
    if allowed is not ALL_STRATEGIES:  # skips the set lookups on the common path
        w_preserve = w_preserve + _barred(_PRESERVE, allowed)
        w_discard = w_discard + _barred(_DISCARD, allowed)
        w_swap = w_swap + _barred(_SWAP, allowed)
    return w_preserve, w_discard, w_swap


class LeastWaste(NamedTuple):
    """The two comparisons that pick the least-waste strategy, of one
    `RequestView` or per request of a `RequestColumns`: DISCARD where
    `discard`, else SWAP where `swap`, else PRESERVE. `pick_least` picks with
    them what belongs to the chosen strategy (its code, its memory area) in two
    selections, with no comparison of codes."""

    discard: Flags
    """Discard wastes strictly less than preserve and swap."""
    swap: Flags
    """Swap wastes strictly less than preserve."""


def _least(w_preserve: Floats, w_discard: Floats, w_swap: Floats) -> LeastWaste:
    """The least-waste strategy; strict "<" in preserve, swap, discard order
    implements the tie-break."""
    return LeastWaste(discard=w_discard < smaller(w_preserve, w_swap), swap=w_swap < w_preserve)


def pick_least(least: LeastWaste, preserve: Any, discard: Any, swap: Any) -> Any:
    """Whichever of `preserve`, `discard` and `swap` belongs to the least-waste
    strategy that `least` describes (per request, for columns)."""
    return where(least.discard, discard, where(least.swap, swap, preserve))


def _none_possible(w_preserve: Floats, w_discard: Floats, w_swap: Floats) -> Flags:
    """Whether every strategy's waste is inf (none is allowed or possible)."""
    return smaller(smaller(w_preserve, w_swap), w_discard) == math.inf


def _check_allowed(allowed: frozenset[Strategy]) -> None:
    if not allowed:
        raise ValueError("allowed must name at least one Strategy, got an empty set")


def _nothing_possible(
    request_id: str, context_tokens: int, batch: BatchView, allowed: frozenset[Strategy]
) -> ValueError:
    return ValueError(
        f"no strategy is possible for {request_id!r}: allowed="
        f"{sorted(s.value for s in allowed)}, context {context_tokens} tokens > "
        f"free_host_tokens {batch.free_host_tokens}"
    )


def choose_strategy(
    view: RequestView,
    batch: BatchView,
    cost: CostModel,
    *,
    allowed: frozenset[Strategy] = ALL_STRATEGIES,
) -> StrategyChoice:
    """Pick the least-waste strategy for `view`'s next API call.

    A predicted duration of None counts as 0 (nothing known to wait for, so
    preserving wastes nothing). Swap is also disallowed when the host swap
    space cannot take the context. Ties break preserve < swap < discard:
    preserve needs no work, and a swap is cheaper to undo than a recompute.
    """
    _check_allowed(allowed)
    w_preserve, w_discard, w_swap = _wastes(view, batch, cost, allowed)
    if _none_possible(w_preserve, w_discard, w_swap):
        raise _nothing_possible(view.request_id, view.context_tokens, batch, allowed)
    best = pick_least(_least(w_preserve, w_discard, w_swap), _PRESERVE, _DISCARD, _SWAP)
    return StrategyChoice(best, w_preserve, w_discard, w_swap)


def choose_strategies(
    columns: RequestColumns,
    batch: BatchView,
    cost: CostModel,
    *,
    allowed: frozenset[Strategy] = ALL_STRATEGIES,
) -> StrategyChoices:
    """`choose_strategy` for every request in `columns` at once (same rules, same
    numbers); raises for the first request with no possible strategy."""
    _check_allowed(allowed)
    w_preserve, w_discard, w_swap, least = _priced(columns, batch, cost, allowed)
    stuck = _none_possible(w_preserve, w_discard, w_swap)
    if stuck.any():
        i = int(np.argmax(stuck))
        raise _nothing_possible(
            columns.request_ids[i], int(columns.context_tokens[i]), batch, allowed
        )
    codes = pick_least(least, *_INT8_CODES)
    return StrategyChoices(codes, w_preserve, w_discard, w_swap)


_Priced = tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], LeastWaste]


def _priced(
    columns: RequestColumns, batch: BatchView, cost: CostModel, allowed: frozenset[Strategy]
) -> _Priced:
    """(preserve, discard, swap) wastes and the least-waste strategy of every
    request in `columns`, computed once per columns, batch, cost and `allowed`."""

    def compute() -> _Priced:
        w_preserve, w_discard, w_swap = read_only(_wastes(columns, batch, cost, allowed))
        return w_preserve, w_discard, w_swap, read_only(_least(w_preserve, w_discard, w_swap))

    return columns.memo(("priced", batch, cost, allowed), compute)


def least_waste(r: Any, batch: BatchView, cost: CostModel) -> LeastWaste:
    """The least-waste strategy (every strategy allowed) of a `RequestView`, or per
    request of a `RequestColumns` (computed once per columns, batch and cost)."""
    if isinstance(r, RequestColumns):
        return _priced(r, batch, cost, ALL_STRATEGIES)[3]
    return _least(*_wastes(r, batch, cost, ALL_STRATEGIES))


def least_waste_code(r: Any, batch: BatchView, cost: CostModel) -> Ints:
    """Code of the least-waste strategy (every strategy allowed) of a `RequestView`,
    or per request of a `RequestColumns`; no `StrategyChoice` is built."""
    return pick_least(least_waste(r, batch, cost), PRESERVE_CODE, DISCARD_CODE, SWAP_CODE)


def least_waste_strategy(view: RequestView, batch: BatchView, cost: CostModel) -> Strategy:
    """`choose_strategy(view, batch, cost).strategy` with every strategy allowed,
    without building the StrategyChoice."""
    return pick_least(least_waste(view, batch, cost), _PRESERVE, _DISCARD, _SWAP)


def demotions(
    paused: Sequence[tuple[RequestView, StrategyChoice]],
    *,
    memory_needed: bool = False,
) -> list[tuple[str, Strategy]]:
    """Which paused, still-preserved requests to demote this iteration, and to what.

    `paused` holds the requests whose KV is still preserved during their API
    call, each with its current choice. Every one whose choice is not
    PRESERVE is demoted to that choice, except the single one whose chosen
    strategy has the largest waste: it is the costliest to demote, and its
    call may return before the next iteration, so it keeps its KV for now
    (MARS.md; the reference code demotes all but one per iteration).
    When `memory_needed` (the engine has requests it cannot admit for lack
    of KV blocks), none is kept: an idle KV cache held through an API call
    would stall the requests that could run in its place.
    Returned cheapest waste first (ties by request id), so that if host space
    runs out part-way, the cheap demotions were the ones carried out.
    """
    candidates = [
        (view.request_id, choice) for view, choice in paused if choice.strategy is not _PRESERVE
    ]
    if not candidates:
        return []
    if not memory_needed:
        # Largest waste stays; ties keep the smallest request id, for determinism.
        kept = min(candidates, key=lambda item: (-item[1].waste, item[0]))
        candidates = [item for item in candidates if item is not kept]
    candidates.sort(key=lambda item: (item[1].waste, item[0]))
    return [(request_id, choice.strategy) for request_id, choice in candidates]
