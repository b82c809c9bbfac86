"""The one request type and the typed events that cross the engine boundary.

A *turn* is one ordinary vLLM request: its prompt is the session's whole
context (the record's tokens plus what the client added), and its sampling
parameters are vLLM's own `SamplingParams`, so every OpenAI field that vLLM
implements (stop strings, grammars, logprobs, seeds, penalties, n) works on
first and resumed turns alike. Between turns, the engine keeps the session's
KV as the last turn's blocks (see `workers.scheduler`); the next turn finds
them through vLLM's prefix cache or the connector's host copy, and recomputes
whatever is gone. The KV is a cache of the record, never the truth.

The same types travel from the HTTP ingress to the engine replica (pickled
by Ray) and from the replica's asyncio side to the engine thread.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from policies import Strategy
from workers.hints import EXTRA_ARGS_KEY, SegmentHints

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.outputs import RequestOutput


class SessionAction(str, enum.Enum):
    """What the engine does with a turn's KV when the turn ends."""

    NONE = "none"
    """No session: the blocks go back to the prefix cache (stock vLLM)."""
    KEEP = "keep"
    """The session goes on: its KV is kept for the next turn, under the
    strategy MARS picks while the session waits (preserve, discard, swap)."""
    END = "end"
    """The session's last turn: its KV is released when the turn ends."""


@dataclass(frozen=True)
class TurnRequest:
    """One turn, from whoever serves it to the engine.

    `sampling` is vLLM's own `SamplingParams` (built by vLLM's OpenAI
    protocol models); the engine adds the MARS fields to its `extra_args`.
    """

    request_id: str
    prompt_token_ids: Sequence[int]
    sampling: SamplingParams
    session_id: str | None = None
    action: SessionAction = SessionAction.NONE
    hints: SegmentHints = field(default_factory=SegmentHints)

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("request_id must be a non-empty string")
        if not self.prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        if (self.session_id is None) != (self.action is SessionAction.NONE):
            raise ValueError(
                f"session_id {self.session_id!r} and action {self.action.value!r} disagree: a "
                "session turn needs both a session_id and action keep or end, a request "
                "outside sessions neither"
            )
        if self.session_id is not None and self.sampling.n != 1:
            raise ValueError(
                f"n is {self.sampling.n}: a session turn continues one conversation, so it "
                "takes n=1"
            )


@dataclass(frozen=True)
class TurnOutput:
    """vLLM's own output of the turn: deltas or the final output, as the
    turn's `sampling.output_kind` asked."""

    output: RequestOutput

    def without_prompt(self) -> TurnOutput:
        """This output without its prompt's token ids (vLLM puts the whole
        prompt in every output), for the trip back to the caller, which
        sent the prompt and puts it back (`with_prompt`)."""
        output = copy.copy(self.output)
        output.prompt_token_ids = None
        return TurnOutput(output)

    def with_prompt(self, prompt_token_ids: list[int]) -> TurnOutput:
        """The output as the engine made it, its prompt put back."""
        self.output.prompt_token_ids = prompt_token_ids
        return self


@dataclass(frozen=True)
class KvReuse:
    """What the turn found of its session's KV on this engine, read from the
    engine itself: vLLM's count of tokens it did not compute (local prefix
    cache hits and connector loads) and the connector's loads."""

    resumed_from: Strategy | None
    """How the session's KV had been kept since its last turn on this
    engine; None when this engine held none for it (a first turn, an engine
    that restarted, a session placed here afresh)."""
    cached_tokens: int
    """Prompt tokens whose KV the turn reused instead of computing."""
    loaded_tokens: int
    """Of those, tokens the connector copied back from host (swap)."""
    recomputed_tokens: int
    """Tokens of the session's previous context that had to be computed again."""


@dataclass(frozen=True)
class TurnEnd:
    """The turn is over; sent after its final `TurnOutput`."""

    request_id: str
    finish_reason: str | None
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    """Every token the turn generated, as the engine sampled them (a stop
    string's token included): what the session's record appends."""
    kv: KvReuse
    engine_s: float
    """The engine's own time on the turn, from its arrival to its end."""


@dataclass(frozen=True)
class TurnMoved:
    """The turn stopped on this engine for a live move; sent instead of its
    `TurnEnd`, after its last output. It goes on from `token_ids` (its
    prompt and every token it generated here) on `destination`."""

    request_id: str
    destination: str
    token_ids: tuple[int, ...]


TurnEvent = TurnOutput | TurnEnd | TurnMoved


def live_move_refusal(turn: TurnRequest) -> str:
    """Why `turn` cannot move to another engine while it runs (empty when it
    can). Its continuation there is a new vLLM request from the tokens so
    far, so whatever state the sampler keeps beyond them would be lost."""
    from vllm.sampling_params import RequestOutputKind

    sampling = turn.sampling
    reasons = []
    if turn.session_id is None:
        reasons.append("it is not a session's turn (a moved KV is parked under its session)")
    if sampling.output_kind is not RequestOutputKind.DELTA:
        reasons.append("it is not streamed (a non-streamed turn moves once it pauses)")
    if sampling.n != 1:
        reasons.append(f"it samples n={sampling.n} choices")
    if sampling.stop:
        reasons.append("its stop strings' held-back text does not travel")
    if sampling.seed is not None and sampling.temperature > 0:
        reasons.append("its seeded sampler's generator state does not travel")
    if sampling.presence_penalty or sampling.frequency_penalty:
        reasons.append("its presence and frequency penalties count its output so far")
    if sampling.structured_outputs is not None:
        reasons.append("its grammar's state does not travel")
    if sampling.prompt_logprobs is not None:
        reasons.append("it asked for prompt logprobs")
    if sampling.bad_words:
        reasons.append("its bad-words matching spans the output so far")
    return "; ".join(reasons)


def mars_extra_args(turn: TurnRequest) -> dict[str, Any]:
    """The MARS fields the scheduler reads from a turn's `extra_args`."""
    fields: dict[str, Any] = dict(turn.hints.to_extra_args()[EXTRA_ARGS_KEY])
    if turn.session_id is not None:
        fields["session"] = turn.session_id
        fields["action"] = turn.action.value
    return {EXTRA_ARGS_KEY: fields}


@dataclass(frozen=True)
class TurnTags:
    """The MARS fields of one vLLM request, as the scheduler reads them."""

    session_id: str | None
    action: SessionAction
    hints: SegmentHints

    @classmethod
    def of(cls, extra_args: dict[str, Any] | None) -> TurnTags:
        fields = dict((extra_args or {}).get(EXTRA_ARGS_KEY) or {})
        session = fields.pop("session", None)
        action = SessionAction(fields.pop("action", SessionAction.NONE.value))
        return cls(session, action, SegmentHints(**fields))
