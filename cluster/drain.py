"""Draining an engine instance: it takes no new session, and every session
it holds moves to the others.

One round (`drain_instance`): the instance stops taking new sessions
(placement sees it at its next load refresh), then each session paused on
it moves with its KV (`cluster.migration`) and each session whose turn runs
there moves live, its client's stream going on (`cluster.live_migration`),
to the instance `policies.drain_plan` picks. A turn that cannot move live
(its sampler's state would not travel) ends where it runs, and its session
moves at a later round, once paused. Rounds are idempotent: repeat until
one reports `drained`. Scaling down drains an instance first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cluster.live_migration import move_running_turn
from cluster.logs import serve_logger
from cluster.migration import (
    MIGRATION_STEP_TIMEOUT_S,
    Migration,
    MigrationOutcome,
    migrate_paused_session,
    release,
)
from cluster.session_lifecycle import SessionState
from cluster.state_store import StateStore, UnknownSession
from policies import InstanceLoad, drain_plan

logger = serve_logger(__name__)

DRAIN = "drain"
"""The reason of the moves a drain makes."""


@dataclass(frozen=True)
class DrainRound:
    """One round of a drain (`POST /v1/instances/{id}/drain` returns it)."""

    instance_id: str
    migrations: list[Migration] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    """Sessions the instance held whose record is elsewhere or gone (a move
    whose release had not reached it, an expired session): their KV is
    dropped, nothing to move."""
    running_turns: int = 0
    """Turns running at the round's start (moved live, or pausing here for
    the next round)."""

    @property
    def drained(self) -> bool:
        """Nothing left here: no turn ran and every session moved."""
        committed = all(m.outcome is MigrationOutcome.COMMITTED for m in self.migrations)
        return self.running_turns == 0 and committed

    def as_json(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "accepting": False,
            "drained": self.drained,
            "running_turns": self.running_turns,
            "migrations": [m.as_json() for m in self.migrations],
            "released": self.released,
        }


async def drain_instance(
    instance_id: str,
    store: StateStore,
    engines: Mapping[str, Any],
    loads: Callable[[], Awaitable[Sequence[InstanceLoad]]],
    *,
    timeout_s: float = MIGRATION_STEP_TIMEOUT_S,
) -> DrainRound:
    """One round of draining `instance_id`; see the module docstring.
    Raises `NoInstanceAvailable` when no other instance takes sessions."""
    engine = engines[instance_id]
    held = await asyncio.wait_for(engine.drain.remote(), timeout_s)
    current = await loads()
    migrations, released = [], []
    for session_id, destination in drain_plan(instance_id, held["paused"], current):
        try:
            record = await asyncio.to_thread(store.get_session, session_id)
        except UnknownSession:
            record = None
        if record is None or record.instance_id != instance_id:
            elsewhere = "no record" if record is None else f"its record is on {record.instance_id}"
            release(engine, session_id, f"drain: {elsewhere}")
            released.append(session_id)
            continue
        migrations.append(
            await migrate_paused_session(
                record, destination, store, engines, reason=DRAIN, timeout_s=timeout_s
            )
        )
    for session_id, destination in drain_plan(instance_id, held["live"], current):
        try:
            record = await asyncio.to_thread(store.get_session, session_id)
        except UnknownSession:
            continue  # closed meanwhile
        if record.state is SessionState.GENERATING:
            migrations.append(
                await move_running_turn(
                    record, destination, engines, reason=DRAIN, timeout_s=timeout_s
                )
            )
    drain = DrainRound(instance_id, migrations, released, held["running"])
    logger.info(
        "drain round instance=%s moved=%d failed=%d released=%d running_turns=%d drained=%s",
        instance_id,
        sum(m.outcome is MigrationOutcome.COMMITTED for m in migrations),
        sum(m.outcome is not MigrationOutcome.COMMITTED for m in migrations),
        len(released),
        drain.running_turns,
        drain.drained,
    )
    return drain
