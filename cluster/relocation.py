"""The global scheduler's migration rounds: a migration policy's moves
(`policies.migration`), carried out.

One round (`relocation_round`) asks every healthy instance what it holds,
paused sessions and sessions with a turn running, hands that and the
latest loads to the policy, and makes each move the policy plans: a paused
session's with its KV (`cluster.migration`), a running turn's live
(`cluster.live_migration`). Each is checked against the session's record
first, since the loads and holdings are a moment old.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from cluster.live_migration import move_running_turn
from cluster.logs import serve_logger
from cluster.migration import (
    MIGRATION_STEP_TIMEOUT_S,
    Migration,
    MigrationOutcome,
    migrate_paused_session,
)
from cluster.session_lifecycle import SessionState
from cluster.state_store import StateStore, UnknownSession
from policies import InstanceLoad, MigrationPolicy

logger = serve_logger(__name__)

MOVED_MEMORY_S = 600.0
"""How long the global scheduler remembers when its policy moved a session
(`relocation_round`): longer than any sensible `settle_s`."""

RELOCATION = "relocation"
"""The reason of the moves the global scheduler's migration policy makes."""


async def relocation_round(
    policy: MigrationPolicy,
    loads: Sequence[InstanceLoad],
    store: StateStore,
    engines: Mapping[str, Any],
    *,
    moved_at: dict[str, float] | None = None,
    timeout_s: float = MIGRATION_STEP_TIMEOUT_S,
) -> list[Migration]:
    """One round of a migration policy over `loads` (the latest of every
    instance): the sessions each healthy instance holds, paused or with a
    turn running, the moves `policy` plans for them, each carried out in
    turn (a running turn's live, `cluster.live_migration`). A session whose
    record no longer matches the plan (its turn started or ended, it moved
    or closed since) is left as it is. An instance that does not say what
    it holds is left out of this round. `moved_at` (session id to
    `time.monotonic()` of its last committed move by the policy) is read
    for each session's `moved_s_ago` and updated by the round's moves."""
    moved_at = {} if moved_at is None else moved_at
    now = time.monotonic()
    healthy = [load.instance_id for load in loads if load.healthy]
    answers = await asyncio.gather(
        *(asyncio.wait_for(engines[i].held_sessions.remote(), timeout_s) for i in healthy),
        return_exceptions=True,
    )
    paused, running = {}, {}
    for instance_id, answer in zip(healthy, answers, strict=True):
        if isinstance(answer, BaseException):
            logger.warning(
                "relocation: instance %s did not list its sessions: %r", instance_id, answer
            )
            continue
        paused[instance_id], running[instance_id] = (
            [
                replace(held, moved_s_ago=now - moved_at[held.session_id])
                if held.session_id in moved_at
                else held
                for held in answer[kind]
            ]
            for kind in ("paused", "live")
        )
    migrations = []
    for move in policy.plan(loads, paused, running):
        try:
            record = await asyncio.to_thread(store.get_session, move.session_id)
        except UnknownSession:
            continue
        if move.live:
            if record.state is not SessionState.GENERATING:
                continue
            migration = await move_running_turn(
                record,
                move.destination,
                engines,
                reason=RELOCATION,
                expected_source=move.source,
                timeout_s=timeout_s,
            )
        else:
            if record.instance_id != move.source or record.state is not SessionState.PAUSED:
                continue
            migration = await migrate_paused_session(
                record, move.destination, store, engines, reason=RELOCATION, timeout_s=timeout_s
            )
        if migration.outcome is MigrationOutcome.COMMITTED:
            moved_at[move.session_id] = time.monotonic()
        migrations.append(migration)
    for session_id, at in list(moved_at.items()):  # forget the ones long settled
        if now - at > MOVED_MEMORY_S:
            del moved_at[session_id]
    return migrations
