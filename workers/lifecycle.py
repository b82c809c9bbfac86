"""The life of one session (or one request outside sessions) inside the
engine, as MARS sees it: its turns queue, run and pause between them.

One enum, one transition table, one function that changes the phase; every
change lands in the request's timeline, which callers read back.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from policies import Strategy
from workers.turns import KvReuse


class Phase(str, enum.Enum):
    QUEUED = "queued"
    """Waiting for admission (new, preempted, or back from an API call)."""
    RUNNING = "running"
    PAUSED = "paused"
    """Waiting for an API call's result; `RequestRecord.strategy` says where its KV is."""
    FINISHED = "finished"


_ALLOWED: dict[Phase, frozenset[Phase]] = {
    Phase.QUEUED: frozenset({Phase.RUNNING, Phase.PAUSED, Phase.FINISHED}),
    # QUEUED -> PAUSED: a resumed turn aborted before it ran (its KV stays parked).
    Phase.RUNNING: frozenset({Phase.QUEUED, Phase.PAUSED, Phase.FINISHED}),
    Phase.PAUSED: frozenset({Phase.QUEUED, Phase.FINISHED}),
    Phase.FINISHED: frozenset(),
}


@dataclass(frozen=True)
class TimelineEvent:
    t: float
    """Monotonic seconds (`time.monotonic()` in the engine process)."""
    event: str
    """queued, scheduled, paused, demoted, resumed, preempted, finished, ..."""
    strategy: Strategy | None = None
    detail: str = ""


@dataclass
class RequestRecord:
    """MARS bookkeeping for one session, across its turns (or for one request
    outside sessions)."""

    key: str
    """The session id, or the request id of a request outside sessions."""
    first_arrival_s: float
    phase: Phase = Phase.QUEUED
    turn_request_id: str = ""
    """The engine request of the session's current (or last) turn."""
    strategy: Strategy = Strategy.PRESERVE
    """Where the KV is while PAUSED."""
    resumed_from: Strategy | None = None
    """How the session's KV was kept when its current turn arrived; None
    when the engine held none for it."""
    previous_context_tokens: int = 0
    """Tokens whose KV the session had kept when its current turn arrived."""
    reuse: KvReuse | None = None
    """What the current turn reused of that KV, read at its first schedule."""
    queued_since_s: float = 0.0
    has_run: bool = False
    waited_iterations: int = 0
    restore_pending: bool = False
    """The current turn comes back to released KV (recompute or swap-in to come)."""
    paused_at_s: float = 0.0
    segment_index: int = 0
    tool: str | None = None
    predicted_api_s: float | None = None
    predicted_decode_tokens: int = 0
    predicted_return_tokens: int = 0
    recomputed_tokens: int = 0
    swapped_out_tokens: int = 0
    swapped_in_tokens: int = 0
    timeline: list[TimelineEvent] = field(default_factory=list)
    view_row: bytes | None = None
    """The request's packed policy view while it waits, priced under the
    engine's cost model (see `policies.PricedRows.row`); dropped by `touch`
    whenever something the view shows, or the cost model, changes."""

    def touch(self) -> None:
        self.view_row = None

    def move(self, phase: Phase, t: float, event: str, *, strategy: Strategy | None = None) -> None:
        """The one place a phase changes; raises on a transition the table forbids."""
        if phase is not self.phase and phase not in _ALLOWED[self.phase]:
            raise RuntimeError(
                f"session {self.key}: illegal transition {self.phase.value} -> "
                f"{phase.value} ({event})"
            )
        self.phase = phase
        self.touch()
        self.note(t, event, strategy=strategy)

    def note(self, t: float, event: str, *, strategy: Strategy | None = None, detail: str = ""):
        self.timeline.append(TimelineEvent(t, event, strategy, detail))
