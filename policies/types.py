"""Immutable snapshots that policies read, and the decisions they return.

Policies never see an engine object: the engine scheduler, the global
scheduler and the simulator all build these snapshots from their own state,
so one policy serves all three.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Strategy(str, enum.Enum):
    """What happens to a paused request's KV cache while its API call runs."""

    PRESERVE = "preserve"
    DISCARD = "discard"
    SWAP = "swap"


@dataclass(frozen=True)
class RequestView:
    """What a policy may know about one request at one scheduler iteration.

    Token counts are in tokens; durations in seconds. Predicted fields come
    from `policies.predictors` (or client hints, or an oracle in benchmarks).
    """

    request_id: str
    arrival_s: float
    """When the request first reached the engine (monotonic seconds)."""
    context_tokens: int
    """Tokens whose KV the request holds or will hold once (re)computed."""
    predicted_decode_tokens: int
    """Tokens still to generate before the next API call (or before the end)."""
    predicted_api_s: float | None
    """Duration of the next API call; None when no further call is expected."""
    predicted_api_return_tokens: int = 0
    """Tokens the next API call appends to the context."""
    waited_iterations: int = 0
    """Scheduler iterations spent waiting since the request last ran."""
    has_run: bool = False
    """Whether the request has been scheduled at least once."""
    resumed_strategy: Strategy | None = None
    """Set when the request is back from an API call that left its KV in this
    state (DISCARD: needs recompute, SWAP: needs swap-in); None otherwise."""
    queued_since_s: float = 0.0
    """When the request last entered the waiting queue (tail order for `vllm`)."""


@dataclass(frozen=True)
class BatchView:
    """The engine's running batch, as the strategy choice needs it."""

    running_context_tokens: int
    """Sum of context tokens of the requests currently running."""
    free_host_tokens: int
    """Tokens of KV that the host swap space can still take."""
