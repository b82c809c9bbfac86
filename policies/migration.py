"""Where the paused sessions of a draining instance go.

`drain_plan` is pure: the sessions an instance holds paused, and the latest
load of every instance, in; one destination per session out. Used by the
ingress's drain (`POST /v1/instances/{id}/drain`, `mars-serve drain`).

Each session goes to the healthy, accepting instance (other than the one
draining) with the highest Llumnix freeness (`llumnix_freeness`), the
largest sessions first, and each assignment is charged to its destination
(its blocks no longer counted free), so that
a drain spreads its sessions over the other instances instead of piling
them on the one that looked freest before the first move.

`RelocatePaused` (a `MigrationPolicy`, built by name from the serving
config's `migration` section) is Llumnix's load balancing applied to the
sessions that wait on a tool call: a move costs them no decode time, and
it takes their KV, and their next turn, from an instance under pressure
to one with room. `BalanceRunning` is Llumnix's own: it moves running
turns, live, from the instance with the least room per running request to
the one with the most.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from policies.dispatch import InstanceLoad, NoInstanceAvailable, llumnix_freeness, per_running
from policies.registry import PolicyRegistry


@dataclass(frozen=True)
class HeldSession:
    """A session an instance holds: paused on its client, or with a turn
    running there (which a drain moves live)."""

    session_id: str
    kv_blocks: int
    """Blocks its KV needs wherever it goes (held, swapped or to recompute)."""
    returns_in_s: float | None = None
    """Seconds until its tool call is predicted to return (0: due now);
    None when the engine has no prediction, or the session is running."""
    on_device: bool = False
    """Its KV is preserved in the instance's device blocks (counted out of
    `free_blocks`), not swapped out or discarded (counted in
    `paused_released_blocks`)."""
    moved_s_ago: float | None = None
    """Seconds since a migration policy last moved it (None: never)."""
    movable: bool = True
    """False for a running turn whose sampler state cannot travel
    (`workers.turns.live_move_refusal`): it moves only once paused."""
    queued: bool = False
    """A turn waiting for its first schedule (or preempted): it holds no
    blocks yet; its demand is in the instance's `waiting_demand_blocks`."""

    def __post_init__(self) -> None:
        if not isinstance(self.session_id, str) or not self.session_id:
            raise ValueError(f"session_id must be a non-empty string, got {self.session_id!r}")
        if isinstance(self.kv_blocks, bool) or not isinstance(self.kv_blocks, int):
            raise ValueError(f"kv_blocks must be an int >= 0, got {self.kv_blocks!r}")
        if self.kv_blocks < 0:
            raise ValueError(f"kv_blocks must be an int >= 0, got {self.kv_blocks!r}")
        for name in ("returns_in_s", "moved_s_ago"):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, (int, float)) and 0 <= value < math.inf
            ):
                raise ValueError(f"{name} must be a finite number >= 0 or None, got {value!r}")


def drain_plan(
    source: str, sessions: Sequence[HeldSession], loads: Sequence[InstanceLoad]
) -> list[tuple[str, str]]:
    """`(session_id, destination)` for each of `sessions`, held by `source`;
    see the module docstring. Raises `NoInstanceAvailable` when no other
    instance is healthy and accepting (and there is a session to move)."""
    if not sessions:
        return []
    targets = {
        load.instance_id: load
        for load in loads
        if load.instance_id != source and load.healthy and load.accepting
    }
    if not targets:
        raise NoInstanceAvailable(
            f"no other healthy instance to drain {source!r} to "
            f"(known: {sorted(load.instance_id for load in loads)})"
        )
    plan = []
    for session in sorted(sessions, key=lambda s: (-s.kv_blocks, s.session_id)):
        best = min(targets.values(), key=lambda load: (-llumnix_freeness(load), load.instance_id))
        plan.append((session.session_id, best.instance_id))
        targets[best.instance_id] = replace(
            best,
            free_blocks=max(0, best.free_blocks - session.kv_blocks),
            paused_released_blocks=best.paused_released_blocks + session.kv_blocks,
            paused_swapped_sessions=best.paused_swapped_sessions + 1,
        )
    return plan


@dataclass(frozen=True)
class Move:
    """One session to move (`MigrationPolicy.plan`): paused, or with its
    running turn moved `live`."""

    session_id: str
    source: str
    destination: str
    live: bool = False


@dataclass(frozen=True)
class MigrationPolicy(ABC):
    """What the global scheduler asks a migration policy, once a round."""

    name: ClassVar[str]
    """Registry key; set by each concrete policy."""

    @abstractmethod
    def plan(
        self,
        loads: Sequence[InstanceLoad],
        paused: Mapping[str, Sequence[HeldSession]],
        running: Mapping[str, Sequence[HeldSession]] | None = None,
    ) -> list[Move]:
        """The moves of this round, in order. `loads` is the latest load of
        every instance; `paused` the sessions each instance holds paused,
        `running` those whose turn runs there (None: not asked for).
        Pure: the inputs are not changed."""

    @classmethod
    def from_params(cls, **params: Any) -> MigrationPolicy:
        """Build from config parameters; unknown names raise ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        _POLICIES.reject_unknown(cls.name, params, known)
        return cls(**params)


_POLICIES: PolicyRegistry[type[MigrationPolicy]] = PolicyRegistry("migration policy")
register_migration_policy = _POLICIES.register
"""Class decorator: make a policy class buildable by `make_migration_policy(cls.name)`."""


def migration_policy_names() -> tuple[str, ...]:
    """Names `make_migration_policy` accepts, sorted."""
    return _POLICIES.names()


def make_migration_policy(name: str, **params: Any) -> MigrationPolicy:
    """Build the migration policy registered as `name` with its parameters.

    Raises ValueError for an unknown name (listing the known ones), an
    unknown parameter, or an invalid value (naming the parameter).
    """
    policy: MigrationPolicy = _POLICIES.make(name, **params)
    return policy


def committed_freeness(load: InstanceLoad) -> float:
    """Llumnix's freeness with every paused session's KV counted as taken:
    ``per_running(free - waiting demand - released paused blocks, running)``.
    Preserved KV is already out of `free_blocks`; discarded or swapped KV
    comes back with its session's next turn, so it is demand the instance
    has committed to, whenever the call returns."""
    free = load.free_blocks - load.waiting_demand_blocks - load.paused_released_blocks
    return per_running(free, load.running)


@register_migration_policy
@dataclass(frozen=True)
class RelocatePaused(MigrationPolicy):
    """Move paused sessions off an instance under pressure.

    An instance is under pressure when its `committed_freeness` is below
    `source_below` (blocks per running request; below 0, what it holds and
    queues exceeds its KV). Its paused sessions go, the soonest to return
    first (their demand is the nearest), to the healthy, accepting instance
    with the highest committed freeness, as long as that one stays at least
    `min_gap` ahead of the source after the move (each move is charged to
    both: the session's blocks leave the source's commitments and join the
    destination's), and at most `max_moves` a round. A session predicted to
    return within `min_return_s` stays: its next turn would race the move.
    A session this policy moved less than `settle_s` ago stays too: the
    loads lag the moves, and without it a session can go back and forth.
    """

    name: ClassVar[str] = "relocate_paused"
    source_below: float = 0.0
    min_gap: float = 4.0
    max_moves: int = 4
    min_return_s: float = 0.5
    settle_s: float = 10.0

    def __post_init__(self) -> None:
        _check_params(
            self, numbers=("source_below",), at_least_0=("min_gap", "min_return_s", "settle_s")
        )

    def plan(
        self,
        loads: Sequence[InstanceLoad],
        paused: Mapping[str, Sequence[HeldSession]],
        running: Mapping[str, Sequence[HeldSession]] | None = None,
    ) -> list[Move]:
        current = {load.instance_id: load for load in loads if load.healthy}
        moves: list[Move] = []
        for source in sorted(current, key=lambda i: (committed_freeness(current[i]), i)):
            if committed_freeness(current[source]) >= self.source_below:
                break  # the rest are freer still
            movable = [
                s
                for s in paused.get(source, ())
                if (s.returns_in_s is None or s.returns_in_s >= self.min_return_s)
                and (s.moved_s_ago is None or s.moved_s_ago >= self.settle_s)
            ]
            movable.sort(
                key=lambda s: (math.inf if s.returns_in_s is None else s.returns_in_s, s.session_id)
            )
            for session in movable:
                if len(moves) == self.max_moves:
                    return moves
                if committed_freeness(current[source]) >= self.source_below:
                    break
                targets = [
                    load
                    for load in current.values()
                    if load.instance_id != source and load.accepting
                ]
                if not targets:
                    return moves
                best = max(targets, key=lambda load: (committed_freeness(load), load.instance_id))
                shed = _without(current[source], session)
                taken = replace(
                    best, paused_released_blocks=best.paused_released_blocks + session.kv_blocks
                )
                if committed_freeness(taken) - committed_freeness(shed) < self.min_gap:
                    break  # no instance has room enough for this one, nor later ones
                moves.append(Move(session.session_id, source, best.instance_id))
                current[source], current[best.instance_id] = shed, taken
        return moves


@register_migration_policy
@dataclass(frozen=True)
class BalanceRunning(MigrationPolicy):
    """Move running turns, live, off an instance short of room (Llumnix's
    load balancing).

    An instance sheds when its `committed_freeness` is below `source_below`
    and another healthy, accepting instance's is at least `min_gap` above
    it once the move is charged to both (the turn's blocks and its place in
    the batch leave one and join the other). The smallest turns go first
    (Llumnix's shortest-running order: the cheapest copy, the shortest
    stop), at most `max_moves` a round (Llumnix moves one request per
    instance at a time). A session this policy moved less than `settle_s`
    ago stays, and so does a turn that cannot move live (`movable`).
    The waiting queue's demand counts against the source's freeness, so an
    instance whose queue does not fit sheds running turns to make room for
    it: Llumnix's de-fragmentation, which counts the queue head's demand as
    virtual usage.
    Paused sessions are not moved: `RelocatePaused` does that.
    """

    name: ClassVar[str] = "balance_running"
    source_below: float = 0.0
    min_gap: float = 4.0
    max_moves: int = 1
    settle_s: float = 10.0

    def __post_init__(self) -> None:
        _check_params(self, numbers=("source_below",), at_least_0=("min_gap", "settle_s"))

    def plan(
        self,
        loads: Sequence[InstanceLoad],
        paused: Mapping[str, Sequence[HeldSession]],
        running: Mapping[str, Sequence[HeldSession]] | None = None,
    ) -> list[Move]:
        healthy = [load for load in loads if load.healthy]
        # Each instance's blocks left over its commitments, and its batch:
        # committed freeness is `per_running(room, batch)`, moves charged here.
        room = {
            load.instance_id: load.free_blocks
            - load.waiting_demand_blocks
            - load.paused_released_blocks
            for load in healthy
        }
        batch = {load.instance_id: load.running for load in healthy}
        accepting = {load.instance_id for load in healthy if load.accepting}

        def freeness(instance_id: str) -> float:
            return per_running(room[instance_id], batch[instance_id])

        running = running or {}
        moves: list[Move] = []
        for source in sorted(room, key=lambda i: (freeness(i), i)):
            movable = sorted(
                (
                    s
                    for s in running.get(source, ())
                    if s.movable
                    and not s.queued
                    and (s.moved_s_ago is None or s.moved_s_ago >= self.settle_s)
                ),
                key=lambda s: (s.kv_blocks, s.session_id),
            )
            for session in movable:
                if len(moves) == self.max_moves:
                    return moves
                if freeness(source) >= self.source_below:
                    break
                targets = sorted(accepting - {source})
                if not targets:
                    return moves
                best = max(targets, key=lambda i: (freeness(i), i))
                blocks = session.kv_blocks
                shed = per_running(room[source] + blocks, max(0, batch[source] - 1))
                taken = per_running(room[best] - blocks, batch[best] + 1)
                if taken - shed < self.min_gap:
                    break  # the smallest turn left is too large; larger ones more so
                moves.append(Move(session.session_id, source, best, live=True))
                room[source] += blocks
                room[best] -= blocks
                batch[source] = max(0, batch[source] - 1)
                batch[best] += 1
        return moves


def _check_params(
    policy: MigrationPolicy, *, numbers: Sequence[str], at_least_0: Sequence[str]
) -> None:
    """ValueError naming the parameter unless each of `numbers` and
    `at_least_0` is a finite number (the latter >= 0) and `max_moves` an
    int >= 1."""
    for field in (*numbers, *at_least_0):
        value = getattr(policy, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{field} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{field} must be finite, got {value!r}")
        if field in at_least_0 and value < 0:
            raise ValueError(f"{field} must be >= 0, got {value!r}")
    moves = policy.max_moves
    if isinstance(moves, bool) or not isinstance(moves, int) or moves < 1:
        raise ValueError(f"max_moves must be an int >= 1, got {moves!r}")


def _without(load: InstanceLoad, session: HeldSession) -> InstanceLoad:
    """`load` once `session` left it: its device blocks free again, or its
    released blocks no longer owed. (At its destination it is a host copy,
    one more session's released blocks.)"""
    if session.on_device:
        blocks = min(session.kv_blocks, load.paused_preserved_blocks)
        return replace(
            load,
            free_blocks=load.free_blocks + blocks,
            paused_preserved_blocks=load.paused_preserved_blocks - blocks,
        )
    released = max(0, load.paused_released_blocks - session.kv_blocks)
    return replace(load, paused_released_blocks=released)
