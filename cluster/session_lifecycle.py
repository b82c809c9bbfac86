"""The life of a session as the cluster records it: one enum, one transition
table, one function that says where an event leads.

A session exists from its first turn to its end (`DELETE`, `mars.close`, or
expiry); in between it is GENERATING (a turn runs) or PAUSED (waiting for
the client's next turn, typically a tool's result). Only the turn that
started GENERATING may end it: every end names its turn. The stores apply
`next_state` inside their compare-and-set, so two turns of one session can
never both start (`cluster.state_store`).

The engine's own view of a session (queued, running, paused with a KV
strategy) is `workers.lifecycle`; this one is what survives an engine.
"""

from __future__ import annotations

import enum


class SessionState(str, enum.Enum):
    GENERATING = "generating"
    """A turn of the session is running."""
    PAUSED = "paused"
    """Between turns: waiting for the client (a tool result, a user's reply)."""


class SessionEvent(str, enum.Enum):
    TURN_STARTED = "turn_started"
    TURN_ENDED = "turn_ended"
    """The turn produced its response; the record holds its tokens."""
    TURN_FAILED = "turn_failed"
    """The turn ended without a response (engine lost, client gone): the
    record keeps the context it had before the turn."""
    MIGRATED = "migrated"
    """The paused session's KV moved to another instance (`cluster.migration`):
    the record names the new one. Only a paused session moves, and only if
    no turn started since the move began (the event names the last turn)."""


_TRANSITIONS: dict[tuple[SessionState | None, SessionEvent], SessionState] = {
    (None, SessionEvent.TURN_STARTED): SessionState.GENERATING,
    (SessionState.PAUSED, SessionEvent.TURN_STARTED): SessionState.GENERATING,
    (SessionState.GENERATING, SessionEvent.TURN_ENDED): SessionState.PAUSED,
    (SessionState.GENERATING, SessionEvent.TURN_FAILED): SessionState.PAUSED,
    (SessionState.PAUSED, SessionEvent.MIGRATED): SessionState.PAUSED,
}


class SessionConflict(Exception):
    """The event does not apply to the session as it is: a turn on a session
    that is already generating, or the end of a turn that is not the
    session's current one. The HTTP layer answers 409."""

    def __init__(self, session_id: str, state: SessionState | None, event: SessionEvent):
        self.session_id, self.state, self.event = session_id, state, event
        if event is SessionEvent.TURN_STARTED and state is SessionState.GENERATING:
            message = f"session {session_id!r} is generating; wait for its turn to end"
        elif event is SessionEvent.TURN_STARTED:
            message = f"session {session_id!r} was started by another request meanwhile"
        elif event is SessionEvent.MIGRATED:
            message = f"session {session_id!r} had a turn meanwhile; it moves only while paused"
        else:
            message = f"session {session_id!r}: {event.value} does not match its current turn"
        super().__init__(message)


def next_state(session_id: str, current: SessionState | None, event: SessionEvent) -> SessionState:
    """Where `event` takes a session in state `current` (None: no record);
    raises `SessionConflict` for a move the table does not allow."""
    try:
        return _TRANSITIONS[(current, event)]
    except KeyError:
        raise SessionConflict(session_id, current, event) from None
