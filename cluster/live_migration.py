"""A running turn moves to another engine instance while its client's
stream goes on (Llumnix's live migration, in the serving path).

Any ingress replica may coordinate a move (`POST /v1/sessions/{id}/migrate`
on a session whose turn is generating); the replica streaming the turn
follows it without a word from the coordinator, so the client's HTTP
connection never changes hands:

1. stages: while the turn decodes on the source, its finished KV blocks are
   copied to the destination (`EngineInstance.live_stage` passed by
   reference to `stage_in`: source to destination through Ray's object
   store, never through this process), up to `MAX_STAGES` times, each stage
   the blocks written since the previous one, until fewer than
   `STOP_BELOW_BLOCKS` new ones are left;
2. stop: the source stops the turn and reads its last blocks; the turn's
   stream waits (its session's KV stays parked on the source);
3. commit: the destination parks the whole KV under the session's id;
4. hand-over: the source ends the turn on its feed with `TurnMoved`, after
   its last output; the streaming replica starts the continuation (the
   tokens so far as its prompt, the rest of `max_tokens`) on the
   destination (`cluster.turn.Turn`), which loads the KV, and the session's
   record is committed there when the turn ends;
5. release: the source drops the session.

One transition function (`advance`) walks `LiveMoveState`, and each abort
has its compensation. The turn ended on its own or could not move
(`ABORTED_SOURCE`), or the destination failed (`ABORTED_DESTINATION`),
before the stop: the destination's stages are dropped and the turn goes on
at the source, untouched. The destination failed after the stop
(`TAKEN_BACK`): the source hands the turn over to itself and continues it
with the KV it kept. Every remote step has a timeout; a stopped turn that
is never handed over goes on at the source after `STOPPED_LEASE_S`, and a
destination drops stages that stop coming after `INCOMING_LEASE_S`.

What cannot travel with the turn (a seeded sampler's generator, a stop
string's held-back text, a grammar's state, output-based penalties, more
than one choice) makes the source refuse the move
(`workers.turns.live_move_refusal`).
"""

from __future__ import annotations

import asyncio
import enum
import time
import uuid
from collections.abc import Mapping
from typing import Any

from cluster.logs import serve_logger
from cluster.migration import (
    MIGRATION_STEP_TIMEOUT_S,
    Migration,
    MigrationOutcome,
    by_reference,
    error_of,
    in_background,
    release,
)
from cluster.state_store import SessionRecord
from workers.kv_transport import ParkedState

logger = serve_logger(__name__)

MAX_STAGES = 3
"""Copies made while the turn decodes on the source (Llumnix's default)."""
STOP_BELOW_BLOCKS = 2
"""A stage that copied fewer new blocks than this is the last before the stop."""


class LiveMoveState(str, enum.Enum):
    STAGING = "staging"
    STOPPING = "stopping"
    COMMITTING = "committing"
    HANDING_OVER = "handing_over"
    MOVED = "moved"
    REFUSED = "refused"
    """The source would not move the turn (none running, or its sampler's
    state cannot travel): nothing was copied."""
    ABORTED_SOURCE = "aborted_source"
    """Before the stop the turn ended on its own, could not move, or the
    source failed: it goes on (or ended) at the source."""
    ABORTED_DESTINATION = "aborted_destination"
    """The destination failed before the stop: the turn goes on at the source."""
    TAKEN_BACK = "taken_back"
    """The destination failed after the stop: the source continues the turn."""


class LiveMoveEvent(str, enum.Enum):
    STAGED = "staged"
    STOP = "stop"
    STOPPED = "stopped"
    COMMITTED = "committed"
    HANDED_OVER = "handed_over"
    REFUSED = "refused"
    SOURCE_FAILED = "source_failed"
    DESTINATION_FAILED = "destination_failed"


_S, _E = LiveMoveState, LiveMoveEvent
_TRANSITIONS: dict[tuple[LiveMoveState, LiveMoveEvent], LiveMoveState] = {
    (_S.STAGING, _E.REFUSED): _S.REFUSED,
    (_S.STAGING, _E.STAGED): _S.STAGING,
    (_S.STAGING, _E.STOP): _S.STOPPING,
    (_S.STAGING, _E.SOURCE_FAILED): _S.ABORTED_SOURCE,
    (_S.STAGING, _E.DESTINATION_FAILED): _S.ABORTED_DESTINATION,
    (_S.STOPPING, _E.STOPPED): _S.COMMITTING,
    (_S.STOPPING, _E.SOURCE_FAILED): _S.ABORTED_SOURCE,
    (_S.COMMITTING, _E.COMMITTED): _S.HANDING_OVER,
    (_S.COMMITTING, _E.DESTINATION_FAILED): _S.TAKEN_BACK,
    (_S.HANDING_OVER, _E.HANDED_OVER): _S.MOVED,
    (_S.HANDING_OVER, _E.SOURCE_FAILED): _S.ABORTED_SOURCE,
}

OUTCOMES = {
    _S.MOVED: MigrationOutcome.COMMITTED,
    _S.REFUSED: MigrationOutcome.REFUSED,
    _S.ABORTED_SOURCE: MigrationOutcome.ABORTED_SOURCE,
    _S.ABORTED_DESTINATION: MigrationOutcome.ABORTED_DESTINATION,
    _S.TAKEN_BACK: MigrationOutcome.ABORTED_DESTINATION,
}
"""The outcome a move reports in each final state (others: it never began)."""


class InvalidMove(RuntimeError):
    """An event that cannot happen in the move's state (a bug)."""


def advance(state: LiveMoveState, event: LiveMoveEvent) -> LiveMoveState:
    """The state after `event`; raises `InvalidMove` for one that cannot follow."""
    try:
        return _TRANSITIONS[state, event]
    except KeyError:
        raise InvalidMove(f"a live move in state {state.value} cannot take {event.value}") from None


async def move_running_turn(
    record: SessionRecord,
    destination: str,
    engines: Mapping[str, Any],
    *,
    reason: str,
    expected_source: str | None = None,
    timeout_s: float = MIGRATION_STEP_TIMEOUT_S,
) -> Migration:
    """Move the running turn of the session of `record` (GENERATING) to
    `destination`; see the module docstring. `engines` are the instances'
    deployment handles. With `expected_source`, a turn that runs anywhere
    else now is left where it is (refused): a policy planned the move on
    loads of a moment ago."""
    started = time.monotonic()
    session_id = record.session_id
    source = await _running_on(session_id, engines, timeout_s) or record.instance_id
    state: LiveMoveState | None = None
    stages, moved, stopped_s = 0, {"kv_tokens": 0, "kv_bytes": 0}, None

    def done(detail: str = "") -> Migration:
        outcome = OUTCOMES.get(state, MigrationOutcome.REFUSED) if state else None
        migration = Migration(
            session_id,
            source,
            destination,
            outcome or MigrationOutcome.REFUSED,
            detail,
            seconds=time.monotonic() - started,
            live=True,
            stages=stages,
            stopped_s=stopped_s,
            **moved,
        )
        migration.log(reason)
        return migration

    if destination not in engines:
        return done(f"instance_id {destination!r} is not an instance of this application")
    if source not in engines:
        return done(f"session {session_id!r} has no turn running on any instance now")
    if expected_source is not None and source != expected_source:
        return done(f"session {session_id!r} now runs on {source}, not {expected_source}")
    if destination == source:
        return done(f"session {session_id!r} is already on {destination}")
    src, dst = engines[source], engines[destination]
    key = f"{session_id}@{record.turn_id}#{uuid.uuid4().hex[:8]}"

    def drop_stages() -> None:
        in_background(dst.drop_incoming.remote(key), f"dropping the stages of {key}")

    state = LiveMoveState.STAGING
    first_block = 0
    while stages < MAX_STAGES:
        stage = by_reference(src).live_stage.remote(session_id, key, first_block, False)
        try:
            next_block = await asyncio.wait_for(
                by_reference(dst).stage_in.remote(key, stage), timeout_s
            )
        except Exception as exc:
            source_error = await error_of(stage, timeout_s)
            drop_stages()
            if source_error is not None:
                failed = LiveMoveEvent.SOURCE_FAILED if stages else LiveMoveEvent.REFUSED
                state = advance(state, failed)
                return done(_message(source_error))
            state = advance(state, LiveMoveEvent.DESTINATION_FAILED)
            return done(f"stage {stages + 1} failed on {destination}: {_message(exc)}")
        state = advance(state, LiveMoveEvent.STAGED)
        stages += 1
        copied, first_block = next_block - first_block, next_block
        if copied < STOP_BELOW_BLOCKS:
            break

    state = advance(state, LiveMoveEvent.STOP)
    stopping = time.monotonic()
    last = by_reference(src).live_stage.remote(session_id, key, first_block, True)
    parked = ParkedState(None, None, 0.0, 0, 0, record.turns + 1)
    try:
        committed = await asyncio.wait_for(
            by_reference(dst).commit_incoming.remote(key, last, parked, session_id), timeout_s
        )
    except Exception as exc:
        stop_error = await error_of(last, timeout_s)
        drop_stages()
        if stop_error is not None:
            state = advance(state, LiveMoveEvent.SOURCE_FAILED)
            return done(_message(stop_error))
        state = advance(state, LiveMoveEvent.STOPPED)
        state = advance(state, LiveMoveEvent.DESTINATION_FAILED)
        back = await _hand_over(src, session_id, source, timeout_s)
        return done(f"commit failed on {destination} ({_message(exc)}); {back}")
    state = advance(state, LiveMoveEvent.STOPPED)
    state = advance(state, LiveMoveEvent.COMMITTED)
    stages += 1
    moved = {
        "kv_tokens": committed["kv_tokens"],
        "kv_bytes": committed["kv_bytes"],
        "written_ahead_tokens": committed["written_tokens"],
    }
    try:
        await asyncio.wait_for(src.hand_over.remote(session_id, destination), timeout_s)
    except Exception as exc:
        # The turn's client left while it was stopped: nothing streams it.
        state = advance(state, LiveMoveEvent.SOURCE_FAILED)
        release(dst, session_id, "live move not handed over")
        return done(f"the hand-over failed: {_message(exc)}")
    stopped_s = time.monotonic() - stopping
    state = advance(state, LiveMoveEvent.HANDED_OVER)
    release(src, session_id, f"moved live to {destination}")
    return done()


async def _running_on(session_id: str, engines: Mapping[str, Any], timeout_s: float) -> str:
    """The instance running the session's turn ("" if none says so): a
    session's record names its instance only once a turn has ended there."""
    ids = sorted(engines)
    calls = [asyncio.wait_for(engines[i].runs_session.remote(session_id), timeout_s) for i in ids]
    answers = await asyncio.gather(*calls, return_exceptions=True)
    return next((i for i, answer in zip(ids, answers, strict=True) if answer is True), "")


async def _hand_over(src: Any, session_id: str, source: str, timeout_s: float) -> str:
    """The source continues the turn it stopped (a compensation); what
    happened, for the move's detail."""
    try:
        await asyncio.wait_for(src.hand_over.remote(session_id, source), timeout_s)
    except Exception as exc:
        return f"the source could not take it back ({_message(exc)}): it does after its lease"
    return "the source continues the turn"


def _message(exc: BaseException) -> str:
    """The engine's own message, out of Ray's wrapper."""
    cause = getattr(exc, "cause", None)
    return str(cause if isinstance(cause, BaseException) else exc)
