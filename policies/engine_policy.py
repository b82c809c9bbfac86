"""The engine-policy seam: admission order, KV strategy, and demotion.

The engine scheduler (and the simulator) hold one `EnginePolicy`, built by
name with `make_engine_policy`; policy names are compared nowhere else. Each
policy is a frozen dataclass of its parameters and is pure: snapshots in,
decisions out.

Policies, as in MARS.md:

- ``vllm``: first come first served by `queued_since_s` (a request back from
  an API call re-enters at the tail); always DISCARD at a pause; no demotion.
- ``infercept``: FCFS by `arrival_s`; least-waste strategy; a request back
  from a DISCARD goes to the front (it recomputes first).
- ``sjf``: fewest `predicted_decode_tokens` first (ties by arrival);
  strategy, demotion and resumed-discard handling as ``infercept``.
- ``mars``: starving requests first, then resumed-discard requests, then
  the rest by predicted memory over time under the strategy each would get
  at its next pause.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from policies.cost_model import CostModel
from policies.memory import least_waste_area
from policies.registry import PolicyRegistry
from policies.starvation import StarvationConfig, starving_flags, starving_positions
from policies.types import BatchView, RequestColumns, RequestView, Strategy
from policies.waste import (
    StrategyChoice,
    StrategyChoices,
    choose_strategies,
    choose_strategy,
    demotions,
    least_waste,
)

_NO_BATCH = BatchView(running_context_tokens=0, free_host_tokens=0)
"""Stand-in when `order` gets no batch: discard is charged only its own
recompute and swap is not considered (no host space is known to exist)."""

_DISCARD = Strategy.DISCARD
_DISCARD_ONLY = frozenset({_DISCARD})
_RELEASES = frozenset({_DISCARD, Strategy.SWAP})


@dataclass(frozen=True)
class EnginePolicy(ABC):
    """What the engine scheduler asks a policy, and when.

    Every method is pure and side-effect free; the engine owns all state
    (queues, the cached order, the waited iterations).
    """

    name: ClassVar[str]
    """Registry key; set by each concrete policy."""

    rerank_every: int = 1
    """The engine caches `order`'s result and calls it again only when the
    waiting set changed or every `rerank_every` iterations."""

    def __post_init__(self) -> None:
        value = self.rerank_every
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"rerank_every must be an int >= 1, got {value!r}")

    def order(
        self,
        waiting: Sequence[RequestView] | RequestColumns,
        cost: CostModel,
        batch: BatchView | None = None,
    ) -> list[str]:
        """Admission order of `waiting` (first = admit next).

        Called by the engine scheduler before admitting waiting or swapped
        requests, when its cached order is stale (see `rerank_every`).
        `batch` is the running batch, for policies that price strategies.
        `waiting` may already be columns (`RequestColumns.from_views`), so an
        engine that also calls `choose_strategies` builds them once.
        """
        columns = RequestColumns.of(waiting)
        return columns.ids_at(self.rank(columns, cost, batch))

    @abstractmethod
    def rank(
        self, columns: RequestColumns, cost: CostModel, batch: BatchView | None
    ) -> NDArray[np.intp]:
        """Positions in `columns` in admission order; `order` maps them to ids."""

    def choose_strategy(
        self, view: RequestView, batch: BatchView, cost: CostModel
    ) -> StrategyChoice:
        """KV strategy for a request that just paused for an API call.

        Called by the engine scheduler once per pause, and each iteration for
        still-preserved paused requests (to feed `demotions`). Default: least
        INFERCEPT waste.
        """
        return choose_strategy(view, batch, cost)

    def choose_strategies(
        self, columns: RequestColumns, batch: BatchView, cost: CostModel
    ) -> StrategyChoices:
        """`choose_strategy` for every request in `columns` at once, entry for
        entry equal to it; for an engine that prices many requests per iteration."""
        return choose_strategies(columns, batch, cost)

    def demotions(
        self,
        paused: Sequence[tuple[RequestView, StrategyChoice]],
        *,
        memory_needed: bool = False,
    ) -> list[tuple[str, Strategy]]:
        """Paused, still-preserved requests to demote this iteration, and to what.

        Called by the engine scheduler once per iteration with the requests
        whose KV is preserved during their API call; `memory_needed` says
        that some waiting request cannot be admitted for lack of KV blocks.
        Default: MARS.md's rule (`policies.waste.demotions`).
        """
        return demotions(paused, memory_needed=memory_needed)

    def eviction_strategy(self, view: RequestView, batch: BatchView, cost: CostModel) -> Strategy:
        """How to free the KV of a ready request that holds blocks it cannot grow.

        Called by the engine scheduler when nothing could run in the last
        iteration although requests were ready: every one that holds KV needs
        more blocks than are free, and nothing is running to preempt. The
        engine evicts the one `order` puts last. Default: the cheaper of
        DISCARD and SWAP by INFERCEPT's waste.
        """
        return choose_strategy(view, batch, cost, allowed=_RELEASES).strategy

    @classmethod
    def from_params(cls, **params: Any) -> EnginePolicy:
        """Build from config parameters; unknown names raise ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        _POLICIES.reject_unknown(cls.name, params, known)
        return cls(**params)


_POLICIES: PolicyRegistry[type[EnginePolicy]] = PolicyRegistry("engine policy")
register_engine_policy = _POLICIES.register
"""Class decorator: make a policy class buildable by `make_engine_policy(cls.name)`."""


def engine_policy_names() -> tuple[str, ...]:
    """Names `make_engine_policy` accepts, sorted."""
    return _POLICIES.names()


def check_engine_policy_name(name: str) -> str:
    """`name` if it is an engine policy; else ValueError listing the known ones
    (for config validators that must name the field before parameters are seen)."""
    return _POLICIES.check_name(name)


def make_engine_policy(name: str, **params: Any) -> EnginePolicy:
    """Build the engine policy registered as `name` with its parameters.

    Raises ValueError for an unknown name (listing the known ones), an
    unknown parameter, or an invalid value (naming the parameter).
    """
    policy: EnginePolicy = _POLICIES.make(name, **params)
    return policy


def _two_tier(
    columns: RequestColumns,
    among: NDArray[np.intp],
    key: Callable[[NDArray[np.intp]], NDArray[np.generic]] | None = None,
) -> NDArray[np.intp]:
    """`among` (positions) ordered: requests back from a DISCARD first (they
    recompute first; by arrival), then the rest by (`key(rest)`, arrival); ties
    end at the request id. `key` maps positions to keys aligned with them;
    None orders the rest by arrival alone.
    """
    resumed_discard = columns.resumed_discard[among]
    front, rest = among[resumed_discard], among[~resumed_discard]
    arrival = columns.arrival_s
    front = columns.argsort(front, arrival[front])
    if key is None:
        rest = columns.argsort(rest, arrival[rest])
    else:
        rest = columns.argsort(rest, key(rest), arrival[rest])
    return np.concatenate((front, rest))


def _everyone(columns: RequestColumns) -> NDArray[np.intp]:
    return np.arange(len(columns))


_NOBODY: NDArray[np.intp] = np.arange(0)


@register_engine_policy
@dataclass(frozen=True)
class VllmPolicy(EnginePolicy):
    """vLLM's behaviour: FCFS by queue entry, KV always discarded at a pause."""

    name: ClassVar[str] = "vllm"

    def rank(
        self, columns: RequestColumns, cost: CostModel, batch: BatchView | None
    ) -> NDArray[np.intp]:
        """FCFS by `queued_since_s`, so a resumed request waits at the tail."""
        return columns.argsort(_everyone(columns), columns.queued_since_s, columns.arrival_s)

    def choose_strategy(
        self, view: RequestView, batch: BatchView, cost: CostModel
    ) -> StrategyChoice:
        """Always DISCARD (the other wastes are reported as inf)."""
        return choose_strategy(view, batch, cost, allowed=_DISCARD_ONLY)

    def choose_strategies(
        self, columns: RequestColumns, batch: BatchView, cost: CostModel
    ) -> StrategyChoices:
        """Always DISCARD, for every request (the other wastes are inf)."""
        return choose_strategies(columns, batch, cost, allowed=_DISCARD_ONLY)

    def demotions(
        self,
        paused: Sequence[tuple[RequestView, StrategyChoice]],
        *,
        memory_needed: bool = False,
    ) -> list[tuple[str, Strategy]]:
        """Every paused request, to DISCARD: vLLM never keeps a paused request's
        KV, so it is dropped at the first iteration after the pause."""
        return [(view.request_id, _DISCARD) for view, _ in paused]

    def eviction_strategy(self, view: RequestView, batch: BatchView, cost: CostModel) -> Strategy:
        """DISCARD, as vLLM's own preemption (recompute)."""
        return _DISCARD


@register_engine_policy
@dataclass(frozen=True)
class InferceptPolicy(EnginePolicy):
    """INFERCEPT: least-waste strategy per request, FCFS admission."""

    name: ClassVar[str] = "infercept"

    def rank(
        self, columns: RequestColumns, cost: CostModel, batch: BatchView | None
    ) -> NDArray[np.intp]:
        """Resumed-discard requests first, then FCFS by `arrival_s`."""
        return _two_tier(columns, _everyone(columns))


@register_engine_policy
@dataclass(frozen=True)
class SjfPolicy(EnginePolicy):
    """Shortest job first by predicted tokens to generate; strategy as INFERCEPT."""

    name: ClassVar[str] = "sjf"

    def rank(
        self, columns: RequestColumns, cost: CostModel, batch: BatchView | None
    ) -> NDArray[np.intp]:
        """Resumed-discard requests first, then fewest `predicted_decode_tokens`."""
        decode_tokens = columns.predicted_decode_tokens
        return _two_tier(columns, _everyone(columns), decode_tokens.__getitem__)


@register_engine_policy
@dataclass(frozen=True)
class MarsPolicy(EnginePolicy):
    """MARS: rank by predicted memory over time, with a starvation guard."""

    name: ClassVar[str] = "mars"

    starvation: StarvationConfig = field(default_factory=StarvationConfig)
    """When a waiting request jumps the ranking (see `policies.starvation`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.starvation, StarvationConfig):
            raise ValueError(f"starvation must be a StarvationConfig, got {self.starvation!r}")

    @classmethod
    def from_params(cls, **params: Any) -> EnginePolicy:
        """Accept `rerank_every`, `starvation`, or StarvationConfig's fields flat."""
        starvation_fields = {f.name for f in dataclasses.fields(StarvationConfig)}
        _POLICIES.reject_unknown(
            cls.name, params, {"rerank_every", "starvation"} | starvation_fields
        )
        flat = {k: params.pop(k) for k in list(params) if k in starvation_fields}
        if flat and "starvation" in params:
            raise ValueError(f"give either starvation or its fields {sorted(flat)}, not both")
        if flat:
            params["starvation"] = StarvationConfig(**flat)
        return cls(**params)

    def score(self, view: RequestView, batch: BatchView, cost: CostModel) -> float:
        """Memory over time under the strategy the request would get at its next pause."""
        return _memory_score(view, batch, cost)

    def scores(
        self, columns: RequestColumns, batch: BatchView, cost: CostModel
    ) -> NDArray[np.float64]:
        """`score` of every request in `columns`, entry for entry."""
        return _memory_score(columns, batch, cost)

    def rank(
        self, columns: RequestColumns, cost: CostModel, batch: BatchView | None
    ) -> NDArray[np.intp]:
        """Starving first, then resumed-discard, then smallest memory over time."""
        batch = batch if batch is not None else _NO_BATCH
        hungry = starving_flags(columns, self.starvation)
        if hungry.any():
            first = starving_positions(columns, self.starvation, hungry)
            rest = np.flatnonzero(~hungry)
        else:  # the common case: nobody to sort first, and everyone to rank
            first, rest = _NOBODY, _everyone(columns)

        def score(positions: NDArray[np.intp]) -> NDArray[np.float64]:
            # Scoring everyone and picking is cheaper than copying the columns
            # of `positions`. Only the scored requests' predictions may raise, so
            # if any raises, score just those (and raise only if they do).
            try:
                return self.scores(columns, batch, cost)[positions]
            except ValueError:
                return self.scores(columns.take(positions), batch, cost)

        return np.concatenate((first, _two_tier(columns, rest, score)))


def _memory_score(r: Any, batch: BatchView, cost: CostModel) -> Any:
    """MARS's score of a `RequestView` (or of each request of a `RequestColumns`):
    memory over time under the least-waste strategy. With no call ahead the
    strategy does not change the area (there is no API term)."""
    return least_waste_area(r, least_waste(r, batch, cost), cost)
