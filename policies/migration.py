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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from policies.dispatch import InstanceLoad, NoInstanceAvailable, llumnix_freeness


@dataclass(frozen=True)
class PausedSession:
    """A session an instance holds while it waits on its client."""

    session_id: str
    kv_blocks: int
    """Blocks its KV needs wherever it goes (held, swapped or to recompute)."""

    def __post_init__(self) -> None:
        if not isinstance(self.session_id, str) or not self.session_id:
            raise ValueError(f"session_id must be a non-empty string, got {self.session_id!r}")
        if isinstance(self.kv_blocks, bool) or not isinstance(self.kv_blocks, int):
            raise ValueError(f"kv_blocks must be an int >= 0, got {self.kv_blocks!r}")
        if self.kv_blocks < 0:
            raise ValueError(f"kv_blocks must be an int >= 0, got {self.kv_blocks!r}")


def drain_plan(
    source: str, sessions: Sequence[PausedSession], loads: Sequence[InstanceLoad]
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
