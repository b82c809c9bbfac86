"""A paused session moves to another engine instance with its KV.

A session waiting on a tool call holds KV on its instance (preserved on the
device, or swapped to host). Moving it is one stop-and-copy that costs no
decode time (nothing of the session runs):

1. export: the source instance reads the session's KV (`MarsEngine.export_session`);
   it keeps it until the move commits;
2. import: the destination holds it as a host copy, passed from the source
   replica as a Ray object (Ray's object store, across nodes), never
   through this process;
3. commit: the session's record names the destination, by compare-and-set
   (`SessionEvent.MIGRATED`): only if it is still paused after the same
   turn, so a turn that started meanwhile wins and the move is undone;
4. release: the source drops its copy.

Each step has a timeout, and each failure its compensation: nothing
changed before the import (`ABORTED_SOURCE`); the destination's copy is
dropped when the import or the commit fails (`ABORTED_DESTINATION`,
`ABORTED_CONFLICT`). Whatever happens, the session's record is the source
of truth: at worst its next turn recomputes its KV from it.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from cluster.logs import serve_logger
from cluster.session_lifecycle import SessionConflict, SessionEvent, SessionState
from cluster.state_store import SessionRecord, StateStore, UnknownSession

logger = serve_logger(__name__)

MIGRATION_STEP_TIMEOUT_S = 60.0
"""The longest one remote step of a move (export and import together, a
release) may take: a session's KV is at most `max_model_len` tokens."""


class MigrationOutcome(str, enum.Enum):
    COMMITTED = "committed"
    REFUSED = "refused"
    """Nothing started: the session is not paused, or the destination is
    not another known instance."""
    ABORTED_SOURCE = "aborted_source"
    """The source could not export the session; nothing changed."""
    ABORTED_DESTINATION = "aborted_destination"
    """The destination could not take the session; its copy is dropped."""
    ABORTED_CONFLICT = "aborted_conflict"
    """A turn of the session started meanwhile (it runs on the source,
    which kept the KV); the destination's copy is dropped."""


@dataclass(frozen=True)
class Migration:
    """What one move did (`POST /v1/sessions/{id}/migrate` returns it)."""

    session_id: str
    source: str
    destination: str
    outcome: MigrationOutcome
    reason: str = ""
    kv_tokens: int = 0
    """Context tokens whose KV travelled (0: the source had discarded it,
    and the destination recomputes it at the next turn)."""
    kv_bytes: int = 0
    seconds: float = 0.0
    live: bool = False
    """A running turn moved (`cluster.live_migration`), not a paused session."""
    stages: int = 0
    """Copies of a live move's KV (the last one after the stop)."""
    written_ahead_tokens: int = 0
    """Of `kv_tokens`, those the destination wrote into its device blocks
    while the turn still decoded at the source (a live move's early
    stages): its continuation finds them in the prefix cache instead of
    loading them from host while stopped."""
    stopped_s: float | None = None
    """A live move's stop to its hand-over: the turn generated nothing then
    (the client's gap adds the continuation's start and its first token:
    the turn's `mars.moves[].downtime_ms`)."""

    def as_json(self) -> dict[str, Any]:
        return {**vars(self), "outcome": self.outcome.value}

    def log(self, reason: str) -> None:
        """The move's log line (`docs/observability.md`)."""
        stopped = "" if self.stopped_s is None else f" stopped_ms={1000 * self.stopped_s:.0f}"
        logger.info(
            "migration session=%s from=%s to=%s outcome=%s reason=%r live=%s stages=%d "
            "kv_tokens=%d written_ahead=%d bytes=%d seconds=%.3f%s%s",
            self.session_id,
            self.source,
            self.destination,
            self.outcome.value,
            reason,
            self.live,
            self.stages,
            self.kv_tokens,
            self.written_ahead_tokens,
            self.kv_bytes,
            self.seconds,
            stopped,
            f" detail={self.reason!r}" if self.reason else "",
        )


async def migrate_paused_session(
    record: SessionRecord,
    destination: str,
    store: StateStore,
    engines: Mapping[str, Any],
    *,
    reason: str,
    timeout_s: float = MIGRATION_STEP_TIMEOUT_S,
) -> Migration:
    """Move the session of `record` (as read just before) to `destination`;
    see the module docstring. `engines` are the instances' deployment
    handles; `reason` says why (an operator, a policy), for the log."""
    started = time.monotonic()
    session_id, source = record.session_id, record.instance_id

    def done(outcome: MigrationOutcome, detail: str = "", **moved: int) -> Migration:
        seconds = time.monotonic() - started
        migration = Migration(
            session_id, source, destination, outcome, detail, seconds=seconds, **moved
        )
        migration.log(reason)
        return migration

    refusal = _refusal(record, destination, engines)
    if refusal:
        return done(MigrationOutcome.REFUSED, refusal)
    exported = by_reference(engines[source]).export_session.remote(session_id)
    try:
        imported = await asyncio.wait_for(
            by_reference(engines[destination]).import_session.remote(exported), timeout_s
        )
    except Exception as exc:
        export_error = await error_of(exported, timeout_s)
        if export_error is not None:
            return done(MigrationOutcome.ABORTED_SOURCE, f"export failed: {export_error!r}")
        release(engines[destination], session_id, f"import failed on {destination}")
        return done(MigrationOutcome.ABORTED_DESTINATION, f"import failed: {exc!r}")
    try:
        await asyncio.to_thread(
            store.transition,
            session_id,
            SessionEvent.MIGRATED,
            record.turn_id,
            lambda current: replace(current, instance_id=destination),
        )
    except (SessionConflict, UnknownSession) as exc:
        release(engines[destination], session_id, "migration not committed")
        return done(MigrationOutcome.ABORTED_CONFLICT, str(exc))
    release(engines[source], session_id, f"migrated to {destination}")
    return done(MigrationOutcome.COMMITTED, **imported)


def _refusal(record: SessionRecord, destination: str, engines: Mapping[str, Any]) -> str:
    if destination not in engines:
        return f"instance_id {destination!r} is not an instance of this application"
    if destination == record.instance_id:
        return f"session {record.session_id!r} is already on {destination}"
    if record.state is not SessionState.PAUSED:
        return f"session {record.session_id!r} is {record.state.value}; it moves only while paused"
    return ""


def by_reference(engine: Any) -> Any:
    """The handle for the KV's path: its calls are Ray actor calls, whose
    results travel through Ray's object store from the source replica to
    the destination's (Serve's default gRPC transport between replicas caps a
    message at 4 MB, a few thousand tokens of a small model's KV)."""
    return engine.options(_by_reference=True)


async def error_of(response: Any, timeout_s: float) -> BaseException | None:
    """The error of a remote call whose result was passed on, if it failed."""
    try:
        await asyncio.wait_for(response, timeout_s)
    except Exception as exc:
        return exc
    return None


def in_background(call: Awaitable[Any], what: str) -> None:
    """Await a remote `call` (a compensation, a release) in the background,
    with the step timeout; a failure is logged as `what` failing."""

    async def run() -> None:
        try:
            await asyncio.wait_for(call, MIGRATION_STEP_TIMEOUT_S)
        except Exception as exc:
            logger.warning("%s failed: %r", what, exc)

    task = asyncio.get_running_loop().create_task(run())
    _IN_BACKGROUND.add(task)
    task.add_done_callback(_IN_BACKGROUND.discard)


_IN_BACKGROUND: set[asyncio.Task[None]] = set()
"""Calls in flight (a task nobody references may be collected)."""


def release(engine: Any, session_id: str, why: str) -> None:
    """Release the session's KV on `engine` in the background (a compensation,
    or the source's release after the commit). An engine that does not
    answer releases it at its idle sweep (`session_ttl_s`)."""
    call = engine.end_session.remote(session_id, why)
    in_background(call, f"release of session={session_id} ({why})")
