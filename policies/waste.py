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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from policies.cost_model import CostModel
from policies.types import BatchView, RequestView, Strategy

ALL_STRATEGIES: frozenset[Strategy] = frozenset(Strategy)

_PRESERVE = Strategy.PRESERVE  # module constants: enum attribute lookup is slow on 3.11
_DISCARD = Strategy.DISCARD
_SWAP = Strategy.SWAP


def waste_preserve(context_tokens: int, api_s: float, cost: CostModel) -> float:
    """T * C * M: the request's KV sits idle in device memory for the whole call."""
    return api_s * context_tokens * cost.kv_bytes_per_token


def waste_discard(context_tokens: int, other_tokens: int, cost: CostModel) -> float:
    """t_prefill(C) * C * M + t_prefill(C) * C_other * M: recompute holds both."""
    t_prefill = cost.prefill_time(context_tokens)
    m = cost.kv_bytes_per_token
    return t_prefill * context_tokens * m + t_prefill * other_tokens * m


def waste_swap(context_tokens: int, batch_tokens: int, cost: CostModel) -> float:
    """2 * t_swap(C) * C_batch * M: the whole batch waits on the copy out and back."""
    return 2 * cost.swap_time(context_tokens) * batch_tokens * cost.kv_bytes_per_token


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


def _wastes(
    view: RequestView, batch: BatchView, cost: CostModel, allowed: frozenset[Strategy]
) -> tuple[float, float, float]:
    """(preserve, discard, swap) wastes of `view`; inf for a strategy not possible."""
    c = view.context_tokens
    api_s = view.predicted_api_s if view.predicted_api_s is not None else 0.0
    if not 0 <= api_s < math.inf:
        raise ValueError(f"predicted_api_s must be finite and >= 0, got {api_s!r}")
    batch_tokens = batch.running_context_tokens
    every = allowed is ALL_STRATEGIES  # skips the set lookups on the hot path
    w_preserve = waste_preserve(c, api_s, cost) if every or _PRESERVE in allowed else math.inf
    w_discard = (
        waste_discard(c, max(0, batch_tokens - c), cost)
        if every or _DISCARD in allowed
        else math.inf
    )
    swap_ok = (every or _SWAP in allowed) and c <= batch.free_host_tokens
    w_swap = waste_swap(c, batch_tokens, cost) if swap_ok else math.inf
    return w_preserve, w_discard, w_swap


def _least(w_preserve: float, w_discard: float, w_swap: float) -> tuple[Strategy, float]:
    """The least-waste strategy and its waste (inf: nothing possible); strict "<"
    in preserve, swap, discard order implements the tie-break."""
    best, best_waste = _PRESERVE, w_preserve
    if w_swap < best_waste:
        best, best_waste = _SWAP, w_swap
    if w_discard < best_waste:
        best, best_waste = _DISCARD, w_discard
    return best, best_waste


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
    if not allowed:
        raise ValueError("allowed must name at least one Strategy, got an empty set")
    w_preserve, w_discard, w_swap = _wastes(view, batch, cost, allowed)
    best, best_waste = _least(w_preserve, w_discard, w_swap)
    if best_waste == math.inf:
        raise ValueError(
            f"no strategy is possible for {view.request_id!r}: allowed="
            f"{sorted(s.value for s in allowed)}, context {view.context_tokens} tokens > "
            f"free_host_tokens {batch.free_host_tokens}"
        )
    return StrategyChoice(best, w_preserve, w_discard, w_swap)


def least_waste_strategy(view: RequestView, batch: BatchView, cost: CostModel) -> Strategy:
    """`choose_strategy(view, batch, cost).strategy` with every strategy allowed,
    without building the StrategyChoice (the MARS ranking calls it per request)."""
    return _least(*_wastes(view, batch, cost, ALL_STRATEGIES))[0]


def demotions(
    paused: Sequence[tuple[RequestView, StrategyChoice]],
) -> list[tuple[str, Strategy]]:
    """Which paused, still-preserved requests to demote this iteration, and to what.

    `paused` holds the requests whose KV is still preserved during their API
    call, each with its current choice. Every one whose choice is not
    PRESERVE is demoted to that choice, except the single one whose chosen
    strategy has the largest waste: it is the costliest to demote, and its
    call may return before the next iteration, so it keeps its KV for now
    (MARS.md; the reference code demotes all but one per iteration).
    Returned cheapest waste first (ties by request id), so that if host space
    runs out part-way, the cheap demotions were the ones carried out.
    """
    candidates = [
        (view.request_id, choice) for view, choice in paused if choice.strategy is not _PRESERVE
    ]
    if not candidates:
        return []
    # Largest waste stays; ties keep the smallest request id, for determinism.
    kept = min(candidates, key=lambda item: (-item[1].waste, item[0]))
    demoted = [item for item in candidates if item is not kept]
    demoted.sort(key=lambda item: (item[1].waste, item[0]))
    return [(request_id, choice.strategy) for request_id, choice in demoted]
