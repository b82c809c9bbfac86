"""The life of one augmented request inside the engine, as MARS sees it.

One enum, one transition table, one function that changes the phase; every
change lands in the request's timeline, which callers read back.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from policies import Strategy


class Phase(str, enum.Enum):
    QUEUED = "queued"
    """Waiting for admission (new, preempted, or back from an API call)."""
    RUNNING = "running"
    PAUSED = "paused"
    """Waiting for an API call's result; `RequestRecord.strategy` says where its KV is."""
    FINISHED = "finished"


_ALLOWED: dict[Phase, frozenset[Phase]] = {
    Phase.QUEUED: frozenset({Phase.RUNNING, Phase.PAUSED, Phase.FINISHED}),
    Phase.RUNNING: frozenset({Phase.QUEUED, Phase.PAUSED, Phase.FINISHED}),
    Phase.PAUSED: frozenset({Phase.QUEUED, Phase.FINISHED}),
    Phase.FINISHED: frozenset(),
}


@dataclass(frozen=True)
class TimelineEvent:
    t: float
    """Monotonic seconds (`time.monotonic()` in the engine process)."""
    event: str
    """queued, scheduled, paused, demoted, resumed, preempted, finished."""
    strategy: Strategy | None = None
    detail: str = ""


@dataclass
class RequestRecord:
    """MARS bookkeeping for one engine request (a whole augmented session)."""

    request_id: str
    first_arrival_s: float
    phase: Phase = Phase.QUEUED
    strategy: Strategy = Strategy.PRESERVE
    """Where the KV is while PAUSED, and how it comes back after resume."""
    queued_since_s: float = 0.0
    has_run: bool = False
    waited_iterations: int = 0
    frontier_tokens: int = 0
    """Context tokens whose KV existed when the request was released (discard/swap)."""
    restore_pending: bool = False
    """Released KV not yet rebuilt (recompute or swap-in still to come)."""
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
                f"request {self.request_id}: illegal transition {self.phase.value} -> "
                f"{phase.value} ({event})"
            )
        self.phase = phase
        self.touch()
        self.note(t, event, strategy=strategy)

    def note(self, t: float, event: str, *, strategy: Strategy | None = None, detail: str = ""):
        self.timeline.append(TimelineEvent(t, event, strategy, detail))
