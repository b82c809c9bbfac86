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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from policies.cost_model import CostModel
from policies.memory import memory_over_time
from policies.starvation import StarvationConfig
from policies.starvation import starving as starving_ids
from policies.types import BatchView, RequestView, Strategy
from policies.waste import StrategyChoice, choose_strategy, demotions, least_waste_strategy

_NO_BATCH = BatchView(running_context_tokens=0, free_host_tokens=0)
"""Stand-in when `order` gets no batch: discard is charged only its own
recompute and swap is not considered (no host space is known to exist)."""

_PRESERVE = Strategy.PRESERVE  # module constants: enum attribute lookup is slow on 3.11
_DISCARD = Strategy.DISCARD
_DISCARD_ONLY = frozenset({_DISCARD})


@dataclass(frozen=True)
class EnginePolicy(ABC):
    """What the engine scheduler asks a policy, and when.

    Every method is pure and side-effect free; the engine owns all state
    (queues, the cached order, the starvation quantum).
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

    @abstractmethod
    def order(
        self,
        waiting: Sequence[RequestView],
        cost: CostModel,
        batch: BatchView | None = None,
    ) -> list[str]:
        """Admission order of `waiting` (first = admit next).

        Called by the engine scheduler before admitting waiting or swapped
        requests, when its cached order is stale (see `rerank_every`).
        `batch` is the running batch, for policies that price strategies.
        """

    def choose_strategy(
        self, view: RequestView, batch: BatchView, cost: CostModel
    ) -> StrategyChoice:
        """KV strategy for a request that just paused for an API call.

        Called by the engine scheduler once per pause, and each iteration for
        still-preserved paused requests (to feed `demotions`). Default: least
        INFERCEPT waste.
        """
        return choose_strategy(view, batch, cost)

    def demotions(
        self, paused: Sequence[tuple[RequestView, StrategyChoice]]
    ) -> list[tuple[str, Strategy]]:
        """Paused, still-preserved requests to demote this iteration, and to what.

        Called by the engine scheduler once per iteration with the requests
        whose KV is preserved during their API call. Default: MARS.md's rule
        (`policies.waste.demotions`).
        """
        return demotions(paused)

    def starving(self, waiting: Sequence[RequestView]) -> list[str]:
        """Ids that `order` promoted to the front for starving, longest-waiting first.

        Called by the engine scheduler with the same `waiting` as `order`, to
        learn which requests to hold at the front for `quantum_iterations`
        iterations (the quantum needs state across iterations, which the
        engine keeps). Default: none (no starvation guard).
        """
        return []

    @property
    def quantum_iterations(self) -> int:
        """Iterations a promoted starving request keeps the front; 0: no guard."""
        return 0

    @classmethod
    def from_params(cls, **params: Any) -> EnginePolicy:
        """Build from config parameters; unknown names raise ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        _reject_unknown(cls.name, params, known)
        return cls(**params)


def _reject_unknown(name: str, params: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(
            f"engine policy {name!r} got unknown parameter(s) {unknown}; it accepts {sorted(known)}"
        )


def _resumed_discard(view: RequestView) -> bool:
    """A request back from an API call whose KV was dropped: recompute it first."""
    return view.resumed_strategy is _DISCARD


_P = TypeVar("_P", bound=type[EnginePolicy])
_REGISTRY: dict[str, type[EnginePolicy]] = {}


def register_engine_policy(cls: _P) -> _P:
    """Class decorator: make `cls` buildable by `make_engine_policy(cls.name)`."""
    if cls.name in _REGISTRY:
        raise ValueError(f"engine policy {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def engine_policy_names() -> tuple[str, ...]:
    """Names `make_engine_policy` accepts, sorted."""
    return tuple(sorted(_REGISTRY))


def make_engine_policy(name: str, **params: Any) -> EnginePolicy:
    """Build the engine policy registered as `name` with its parameters.

    Raises ValueError for an unknown name (listing the known ones), an
    unknown parameter, or an invalid value (naming the parameter).
    """
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(
            f"unknown engine policy {name!r}; known policies: {list(engine_policy_names())}"
        )
    try:
        return cls.from_params(**params)
    except ValueError as exc:
        raise ValueError(f"engine policy {name!r}: {exc}") from exc


def _two_tier(
    waiting: Sequence[RequestView], key: Callable[[RequestView], tuple[Any, ...]]
) -> list[str]:
    """Resumed-discard requests first (by arrival), then the rest by `key`."""
    front = sorted(
        (v for v in waiting if _resumed_discard(v)), key=lambda v: (v.arrival_s, v.request_id)
    )
    rest = sorted((v for v in waiting if not _resumed_discard(v)), key=key)
    return [v.request_id for v in front] + [v.request_id for v in rest]


@register_engine_policy
@dataclass(frozen=True)
class VllmPolicy(EnginePolicy):
    """vLLM's behaviour: FCFS by queue entry, KV always discarded at a pause."""

    name: ClassVar[str] = "vllm"

    def order(
        self,
        waiting: Sequence[RequestView],
        cost: CostModel,
        batch: BatchView | None = None,
    ) -> list[str]:
        """FCFS by `queued_since_s`, so a resumed request waits at the tail."""
        ranked = sorted(waiting, key=lambda v: (v.queued_since_s, v.arrival_s, v.request_id))
        return [v.request_id for v in ranked]

    def choose_strategy(
        self, view: RequestView, batch: BatchView, cost: CostModel
    ) -> StrategyChoice:
        """Always DISCARD (the other wastes are reported as inf)."""
        return choose_strategy(view, batch, cost, allowed=_DISCARD_ONLY)

    def demotions(
        self, paused: Sequence[tuple[RequestView, StrategyChoice]]
    ) -> list[tuple[str, Strategy]]:
        """Every paused request, to DISCARD: vLLM never keeps a paused request's
        KV, so it is dropped at the first iteration after the pause."""
        return [(view.request_id, _DISCARD) for view, _ in paused]


@register_engine_policy
@dataclass(frozen=True)
class InferceptPolicy(EnginePolicy):
    """INFERCEPT: least-waste strategy per request, FCFS admission."""

    name: ClassVar[str] = "infercept"

    def order(
        self,
        waiting: Sequence[RequestView],
        cost: CostModel,
        batch: BatchView | None = None,
    ) -> list[str]:
        """Resumed-discard requests first, then FCFS by `arrival_s`."""
        return _two_tier(waiting, lambda v: (v.arrival_s, v.request_id))


@register_engine_policy
@dataclass(frozen=True)
class SjfPolicy(EnginePolicy):
    """Shortest job first by predicted tokens to generate; strategy as INFERCEPT."""

    name: ClassVar[str] = "sjf"

    def order(
        self,
        waiting: Sequence[RequestView],
        cost: CostModel,
        batch: BatchView | None = None,
    ) -> list[str]:
        """Resumed-discard requests first, then fewest `predicted_decode_tokens`."""
        return _two_tier(waiting, lambda v: (v.predicted_decode_tokens, v.arrival_s, v.request_id))


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
        _reject_unknown(cls.name, params, {"rerank_every", "starvation"} | starvation_fields)
        flat = {k: params.pop(k) for k in list(params) if k in starvation_fields}
        if flat and "starvation" in params:
            raise ValueError(f"give either starvation or its fields {sorted(flat)}, not both")
        if flat:
            params["starvation"] = StarvationConfig(**flat)
        return cls(**params)

    def starving(self, waiting: Sequence[RequestView]) -> list[str]:
        """Requests past `starvation.threshold_iterations` (see `policies.starvation`)."""
        return starving_ids(waiting, self.starvation)

    @property
    def quantum_iterations(self) -> int:
        """`starvation.quantum_iterations`: how long the engine holds a promoted request."""
        return self.starvation.quantum_iterations

    def score(self, view: RequestView, batch: BatchView, cost: CostModel) -> float:
        """Memory over time under the strategy the request would get at its next pause."""
        if view.predicted_api_s is None:
            strategy = _PRESERVE  # no call ahead: the strategy does not matter
        else:
            strategy = least_waste_strategy(view, batch, cost)
        return memory_over_time(view, strategy, cost)

    def order(
        self,
        waiting: Sequence[RequestView],
        cost: CostModel,
        batch: BatchView | None = None,
    ) -> list[str]:
        """Starving first, then resumed-discard, then smallest memory over time."""
        batch = batch if batch is not None else _NO_BATCH
        first = self.starving(waiting)
        promoted = set(first)
        remaining = [v for v in waiting if v.request_id not in promoted]
        return first + _two_tier(
            remaining, lambda v: (self.score(v, batch, cost), v.arrival_s, v.request_id)
        )
