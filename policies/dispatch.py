"""The dispatch seam: on which engine instance a new session is placed.

The global scheduler (and the simulator) hold one `DispatchPolicy`, built by
name with `make_dispatch_policy`; policy names are compared nowhere else.
Each policy is a frozen dataclass of its parameters and is pure: a request,
one `InstanceLoad` snapshot per instance and a frozen `DispatchState` in; a
`DispatchDecision` and the next `DispatchState` out. The caller owns the
state and threads it from one call to the next.

Rules every policy follows (enforced by `DispatchPolicy.choose`):

- an instance with ``healthy=False`` is never chosen; one with
  ``accepting=False`` (draining) only for a session whose affinity it is;
  with no such instance, `choose` raises `NoInstanceAvailable`;
- ties are broken by the smallest `instance_id`, so a decision depends only
  on its inputs, never on the order of `loads`.

Policies:

- ``round_robin``: the healthy instances in `instance_id` order, in turn: the
  first healthy id after the one chosen last (`DispatchState.last_instance`),
  wrapping to the smallest. Instances that join, leave or fail between calls
  never make it skip or repeat the others.
- ``least_load``: highest Llumnix freeness (`llumnix_freeness`)::

      freeness = per_running(free_blocks - waiting_demand_blocks, running)
      per_running(x, n) = x / max(1, n)   if x >= 0
                          x * max(1, n)   if x < 0

  the KV blocks left once the waiting queue is admitted, per running request.
  It is negative on an instance whose queue already needs more than is free;
  a deficit is multiplied, not divided, by the running requests, so that at
  equal blocks the busier instance always ranks lower (Llumnix's plain
  division would rank an overloaded instance higher the more requests it
  runs, and pile new sessions on it).
- ``session_affinity``: the request's `affinity_instance` when it is known
  and healthy (reason ``"affinity"``); otherwise the policy named by its
  `fallback` parameter (default ``least_load``), and the reason says so.
- ``mars_aware``: affinity first, as ``session_affinity`` (the session's KV is
  there); otherwise the highest `mars_aware_score`::

      returning = sum(blocks * max(0, 1 - remaining_s / return_horizon_s)
                      for remaining_s, blocks in paused_returns)
      freeness  = per_running(free_blocks - waiting_demand_blocks - returning,
                              running)
      score     = freeness - backlog_weight * predicted_backlog / block_size

  Paused sessions whose KV was discarded or swapped out will need their
  blocks again when their API call returns, so those blocks are not really
  free. How much they compete with a session placed now depends on when
  they come back: one due during the new session's prefill and first
  segment takes blocks it needs, one due long after does not (by then the
  loads have been refreshed many times and the engine's admission and
  demotions have settled who holds what). So `returning_blocks` weighs each
  paused session's blocks by its predicted time to return, linearly: fully
  when due now (overdue calls and calls with no prediction count as due
  now, see `policies.predictors.remaining_call_s`), not at all at or beyond
  `return_horizon_s`. Counting them all in full, whatever their return time,
  piled new sessions on one instance in the HTTP benchmark. An instance that
  reports `paused_released_blocks` but no `paused_returns` (an engine that
  does not report returns) has all its released blocks counted in full.
  Blocks that paused sessions hold now (`paused_preserved_blocks`) are
  already outside `free_blocks` and count as used: the score does not assume
  the engine will demote them. The backlog term turns the engine's predicted
  memory over time (token*s) into block*s and charges `backlog_weight` blocks
  of freeness per block*s; equal scores go to the lower backlog, then to the
  smallest `instance_id`. With ``backlog_weight=0`` the backlog is only a
  tie-break.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from policies.registry import PolicyRegistry


class NoInstanceAvailable(ValueError):
    """No healthy instance to place a request on."""


def _check_non_negative_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _check_non_negative_float(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_positive_float(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_id(name: str, value: object, optional: bool) -> None:
    if optional and value is None:
        return
    if not isinstance(value, str) or not value:
        allowed = "a non-empty str or None" if optional else "a non-empty str"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class InstanceLoad:
    """One engine instance's load, as the global scheduler last saw it.

    Block counts are KV-cache blocks of `block_size` tokens on the device.
    """

    instance_id: str
    total_blocks: int
    free_blocks: int
    """Blocks free now. Blocks held by running requests and by paused sessions
    whose KV is preserved are not free."""
    running: int
    """Requests in the running batch."""
    waiting: int
    """Requests in the waiting queue."""
    waiting_demand_blocks: int
    """Blocks the waiting queue needs to admit all its requests."""
    paused_preserved_blocks: int
    """Blocks held now by paused sessions whose KV is preserved (part of the
    used blocks, so ``free_blocks + paused_preserved_blocks <= total_blocks``)."""
    paused_released_blocks: int
    """Blocks that paused sessions whose KV was discarded or swapped out will
    need again when they return."""
    paused_preserved_sessions: int = 0
    """Paused sessions whose KV is held on the device (preserve)."""
    paused_discarded_sessions: int = 0
    """Paused sessions whose KV was freed, to be recomputed on resume (discard)."""
    paused_swapped_sessions: int = 0
    """Paused sessions whose KV was copied to host memory (swap)."""
    predicted_backlog: float = 0.0
    """The engine's predicted memory-over-time backlog (token*s); 0 if unknown."""
    healthy: bool = True
    """False: the instance must not get new work (failed, unreachable)."""
    accepting: bool = True
    """False: the instance is draining: no new session or sessionless
    request goes there, while the sessions it holds still resume there
    until they move (`policies.migration.drain_plan`)."""
    block_size: int = 32
    """Tokens per KV block."""
    paused_returns: tuple[tuple[float, int], ...] = ()
    """One ``(remaining_s, blocks)`` pair per paused session counted in
    `paused_released_blocks`: the seconds until its API call is predicted to
    return (0: due now) and the blocks it will need then. Empty when the
    engine does not report them; lists (as an engine sends them) are turned
    into tuples."""

    def __post_init__(self) -> None:
        _check_id("instance_id", self.instance_id, optional=False)
        for name in (
            "total_blocks",
            "free_blocks",
            "running",
            "waiting",
            "waiting_demand_blocks",
            "paused_preserved_blocks",
            "paused_released_blocks",
            "paused_preserved_sessions",
            "paused_discarded_sessions",
            "paused_swapped_sessions",
        ):
            _check_non_negative_int(name, getattr(self, name))
        if self.free_blocks > self.total_blocks:
            raise ValueError(
                f"free_blocks ({self.free_blocks}) exceeds total_blocks ({self.total_blocks}) "
                f"on instance {self.instance_id!r}"
            )
        if self.free_blocks + self.paused_preserved_blocks > self.total_blocks:
            raise ValueError(
                f"paused_preserved_blocks ({self.paused_preserved_blocks}) + free_blocks "
                f"({self.free_blocks}) exceeds total_blocks ({self.total_blocks}) on instance "
                f"{self.instance_id!r}: preserved blocks are held, so they are not free"
            )
        _check_non_negative_float("predicted_backlog", self.predicted_backlog)
        for name in ("healthy", "accepting"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise ValueError(f"block_size must be an int >= 1, got {self.block_size!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {self.block_size!r}")
        object.__setattr__(self, "paused_returns", _checked_returns(self.paused_returns))


def _checked_returns(returns: object) -> tuple[tuple[float, int], ...]:
    """`InstanceLoad.paused_returns` as a tuple of ``(remaining_s, blocks)``
    tuples; raises ValueError naming the bad entry."""
    if not isinstance(returns, list | tuple):
        raise ValueError(
            f"paused_returns must be a list or tuple of (remaining_s, blocks) pairs, "
            f"got {returns!r}"
        )
    checked = []
    for i, pair in enumerate(returns):
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise ValueError(
                f"paused_returns[{i}] must be a (remaining_s, blocks) pair, got {pair!r}"
            )
        remaining_s, blocks = pair
        _check_non_negative_float(f"paused_returns[{i}] remaining_s", remaining_s)
        _check_non_negative_int(f"paused_returns[{i}] blocks", blocks)
        checked.append((float(remaining_s), blocks))
    return tuple(checked)


@dataclass(frozen=True)
class DispatchRequest:
    """A new session (or a sessionless request) to place."""

    session_id: str | None
    prompt_tokens: int
    affinity_instance: str | None = None
    """The instance that holds the session's KV, if any."""

    def __post_init__(self) -> None:
        _check_id("session_id", self.session_id, optional=True)
        _check_non_negative_int("prompt_tokens", self.prompt_tokens)
        _check_id("affinity_instance", self.affinity_instance, optional=True)


@dataclass(frozen=True)
class DispatchDecision:
    """Where the request goes, and why (for logs, metrics and the timeline)."""

    instance_id: str
    reason: str


@dataclass(frozen=True)
class DispatchState:
    """What a policy remembers between calls; the caller keeps it and passes
    the one `choose` returned to the next call."""

    last_instance: str | None = None
    """The instance `round_robin` chose last; None before its first choice."""

    def __post_init__(self) -> None:
        _check_id("last_instance", self.last_instance, optional=True)


def per_running(free: float, running: int) -> float:
    """`free` blocks per running request: divided by ``max(1, running)`` when
    there are blocks to share, multiplied when `free` is a deficit, so that
    more running requests always rank an instance lower (module docstring)."""
    requests = max(1, running)
    return free / requests if free >= 0 else free * requests


def llumnix_freeness(load: InstanceLoad) -> float:
    """Llumnix's freeness, ``per_running(free_blocks - waiting_demand_blocks, running)``."""
    return per_running(load.free_blocks - load.waiting_demand_blocks, load.running)


def charge_placement(load: InstanceLoad, prompt_tokens: int) -> InstanceLoad:
    """`load` as it will be once a session of `prompt_tokens` placed on it is
    queued: one more waiting request needing ``ceil(prompt_tokens /
    block_size)`` more blocks.

    A placer (`cluster.placement`) applies it to its cached load after each
    decision, until the next refresh replaces the estimate with the engine's
    real figures (Llumnix updates its instance info on dispatch the same way).
    """
    _check_non_negative_int("prompt_tokens", prompt_tokens)
    blocks = -(-prompt_tokens // load.block_size)
    return dataclasses.replace(
        load, waiting=load.waiting + 1, waiting_demand_blocks=load.waiting_demand_blocks + blocks
    )


def returning_blocks(load: InstanceLoad, return_horizon_s: float) -> float:
    """Paused sessions' released blocks as competing with a session placed
    now: each session's blocks times ``max(0, 1 - remaining_s /
    return_horizon_s)``, or all of `paused_released_blocks` when the load
    has no `paused_returns` (module docstring)."""
    if not load.paused_returns:
        return float(load.paused_released_blocks)
    return sum(
        blocks * max(0.0, 1.0 - remaining_s / return_horizon_s)
        for remaining_s, blocks in load.paused_returns
    )


def mars_aware_score(load: InstanceLoad, backlog_weight: float, return_horizon_s: float) -> float:
    """MARS-aware placement score (higher is better); see the module docstring."""
    free = load.free_blocks - load.waiting_demand_blocks - returning_blocks(load, return_horizon_s)
    freeness = per_running(free, load.running)
    return freeness - backlog_weight * load.predicted_backlog / load.block_size


def _healthy_by_id(request: DispatchRequest, loads: Sequence[InstanceLoad]) -> list[InstanceLoad]:
    """The healthy instances of `loads`, by `instance_id`; raises on duplicates
    and when none is healthy."""
    seen: set[str] = set()
    for load in loads:
        if not isinstance(load, InstanceLoad):
            raise ValueError(f"loads must hold InstanceLoad objects, got {load!r}")
        if load.instance_id in seen:
            raise ValueError(f"instance_id {load.instance_id!r} appears twice in loads")
        seen.add(load.instance_id)
    healthy = sorted(
        (load for load in loads if load.healthy and _takes(request, load)),
        key=lambda load: load.instance_id,
    )
    if not healthy:
        who = "sessionless request" if request.session_id is None else repr(request.session_id)
        known = (
            f"all {len(seen)} unhealthy or draining: {sorted(seen)}"
            if seen
            else "no instance is known"
        )
        raise NoInstanceAvailable(f"no healthy instance to place {who} on ({known})")
    return healthy


def _takes(request: DispatchRequest, load: InstanceLoad) -> bool:
    """Whether `load`'s instance takes `request`: a draining instance takes
    only the sessions it holds (their affinity), until they move."""
    return load.accepting or load.instance_id == request.affinity_instance


def _best(
    healthy: Sequence[InstanceLoad], key: Callable[[InstanceLoad], tuple[float, ...]]
) -> InstanceLoad:
    """The instance of `healthy` with the smallest ``(*key(load), instance_id)``."""
    return min(healthy, key=lambda load: (*key(load), load.instance_id))


def _affinity(request: DispatchRequest, healthy: Sequence[InstanceLoad]) -> tuple[str | None, str]:
    """The affinity instance if it is healthy (and None otherwise), and why not."""
    wanted = request.affinity_instance
    if wanted is None:
        return None, "no affinity instance"
    if any(load.instance_id == wanted for load in healthy):
        return wanted, "affinity"
    return None, f"affinity instance {wanted!r} unhealthy or unknown"


@dataclass(frozen=True)
class DispatchPolicy(ABC):
    """What the global scheduler asks a placement policy, and when."""

    name: ClassVar[str]
    """Registry key; set by each concrete policy."""

    def choose(
        self,
        request: DispatchRequest,
        loads: Sequence[InstanceLoad],
        state: DispatchState,
    ) -> tuple[DispatchDecision, DispatchState]:
        """The instance for `request`, and the state for the next call.

        Called by the global scheduler once per new session (or sessionless
        request), with the latest load of every instance it knows. Pure: the
        inputs are not changed. Raises `NoInstanceAvailable` when no instance
        is healthy, ValueError when an instance id appears twice.
        """
        return self.pick(request, _healthy_by_id(request, loads), state)

    @abstractmethod
    def pick(
        self,
        request: DispatchRequest,
        healthy: Sequence[InstanceLoad],
        state: DispatchState,
    ) -> tuple[DispatchDecision, DispatchState]:
        """`choose` among `healthy`: the healthy instances, sorted by id, never empty."""

    @classmethod
    def from_params(cls, **params: Any) -> DispatchPolicy:
        """Build from config parameters; unknown names raise ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        _POLICIES.reject_unknown(cls.name, params, known)
        return cls(**params)


_POLICIES: PolicyRegistry[type[DispatchPolicy]] = PolicyRegistry("dispatch policy")
register_dispatch_policy = _POLICIES.register
"""Class decorator: make a policy class buildable by `make_dispatch_policy(cls.name)`."""


def dispatch_policy_names() -> tuple[str, ...]:
    """Names `make_dispatch_policy` accepts, sorted."""
    return _POLICIES.names()


def make_dispatch_policy(name: str, **params: Any) -> DispatchPolicy:
    """Build the dispatch policy registered as `name` with its parameters.

    Raises ValueError for an unknown name (listing the known ones), an
    unknown parameter, or an invalid value (naming the parameter).
    """
    policy: DispatchPolicy = _POLICIES.make(name, **params)
    return policy


@register_dispatch_policy
@dataclass(frozen=True)
class RoundRobinDispatch(DispatchPolicy):
    """Healthy instances in turn, in `instance_id` order."""

    name: ClassVar[str] = "round_robin"

    def pick(
        self,
        request: DispatchRequest,
        healthy: Sequence[InstanceLoad],
        state: DispatchState,
    ) -> tuple[DispatchDecision, DispatchState]:
        """The first healthy id after `state.last_instance`, wrapping to the smallest."""
        last = state.last_instance
        after = [load for load in healthy if last is None or load.instance_id > last]
        chosen = (after or healthy)[0].instance_id
        return DispatchDecision(chosen, "round_robin"), DispatchState(last_instance=chosen)


@register_dispatch_policy
@dataclass(frozen=True)
class LeastLoadDispatch(DispatchPolicy):
    """Highest Llumnix freeness (`llumnix_freeness`)."""

    name: ClassVar[str] = "least_load"

    def pick(
        self,
        request: DispatchRequest,
        healthy: Sequence[InstanceLoad],
        state: DispatchState,
    ) -> tuple[DispatchDecision, DispatchState]:
        """Highest freeness; ties to the smallest id. The state passes through."""
        best = _best(healthy, lambda load: (-llumnix_freeness(load),))
        reason = f"least_load: freeness {llumnix_freeness(best):.4g}"
        return DispatchDecision(best.instance_id, reason), state


@register_dispatch_policy
@dataclass(frozen=True)
class SessionAffinityDispatch(DispatchPolicy):
    """The session's instance when it is healthy, else the `fallback` policy."""

    name: ClassVar[str] = "session_affinity"

    fallback: str = "least_load"
    """Name of the policy that places requests with no usable affinity instance."""
    _inner: DispatchPolicy = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.fallback == self.name:
            raise ValueError(f"fallback must name another policy than {self.name!r}")
        if not isinstance(self.fallback, str) or self.fallback not in _POLICIES:
            raise ValueError(
                f"fallback must name a dispatch policy, one of "
                f"{[n for n in dispatch_policy_names() if n != self.name]}; "
                f"got {self.fallback!r}"
            )
        object.__setattr__(self, "_inner", make_dispatch_policy(self.fallback))

    def pick(
        self,
        request: DispatchRequest,
        healthy: Sequence[InstanceLoad],
        state: DispatchState,
    ) -> tuple[DispatchDecision, DispatchState]:
        """Affinity (reason ``"affinity"``), or the fallback's choice with a
        reason ``"fallback <name> (<why>): <fallback's reason>"``."""
        chosen, why = _affinity(request, healthy)
        if chosen is not None:
            return DispatchDecision(chosen, why), state
        decision, state = self._inner.pick(request, healthy, state)
        reason = f"fallback {self.fallback} ({why}): {decision.reason}"
        return DispatchDecision(decision.instance_id, reason), state


@register_dispatch_policy
@dataclass(frozen=True)
class MarsAwareDispatch(DispatchPolicy):
    """Affinity first, then the highest `mars_aware_score`."""

    name: ClassVar[str] = "mars_aware"

    backlog_weight: float = 1e-3
    """Blocks of freeness charged per block*s of predicted backlog (>= 0)."""
    return_horizon_s: float = 5.0
    """Seconds ahead a paused session's return competes with a session placed
    now (> 0): its blocks count fully when due now, less the later it is due,
    and not at all from this horizon on (`returning_blocks`)."""

    def __post_init__(self) -> None:
        _check_non_negative_float("backlog_weight", self.backlog_weight)
        _check_positive_float("return_horizon_s", self.return_horizon_s)

    def score(self, load: InstanceLoad) -> float:
        """`mars_aware_score` of `load` under this policy's parameters."""
        return mars_aware_score(load, self.backlog_weight, self.return_horizon_s)

    def pick(
        self,
        request: DispatchRequest,
        healthy: Sequence[InstanceLoad],
        state: DispatchState,
    ) -> tuple[DispatchDecision, DispatchState]:
        """Affinity (reason ``"affinity"``); else the highest score, then the
        lowest backlog, then the smallest id. The state passes through."""
        chosen, why = _affinity(request, healthy)
        if chosen is not None:
            return DispatchDecision(chosen, why), state
        best = _best(healthy, lambda load: (-self.score(load), load.predicted_backlog))
        reason = f"mars_aware ({why}): score {self.score(best):.4g}"
        return DispatchDecision(best.instance_id, reason), state
