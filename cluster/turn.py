"""One turn through the ingress: its prompt planned from the session's
record, its placement, its engine call, and what it leaves for the record.

vLLM's serving layer drives a `Turn` (through `cluster.frontend`): it asks
`plan_prompt` for the prompt once the request is rendered, then iterates
`run`, which places the turn and streams vLLM's `RequestOutput`s from the
engine instance. The ingress then commits the turn to the session's record
(`outcome`), or rolls the record back when the turn failed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.exceptions import VLLMClientError

from cluster.engine_feed import FeedBroken
from cluster.frontend import EngineUnavailable
from cluster.history import (
    PromptPlan,
    RenderPrefix,
    message_digest,
    plan_chat_prompt,
    plan_text_prompt,
    plan_token_prompt,
)
from cluster.logs import serve_logger
from cluster.state_store import MessageMark, SessionRecord
from policies import DispatchDecision, NoInstanceAvailable, block_hashes
from workers.hints import SegmentHints
from workers.turns import SessionAction, TurnEnd, TurnMoved, TurnOutput, TurnRequest

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.outputs import RequestOutput

logger = serve_logger(__name__)

TURN_PHASES = ("record_start", "until_engine_call", "engine_call_ack", "record_commit")
"""The steps of a turn that the ingress times (`Turn.phases_s`): the
session record's move to GENERATING, from the turn's start to its engine
call (vLLM's request handling, prompt planning, placement), the engine
call's round trip (the instance has added the turn), and the record's
commit once the engine has ended the turn."""

TURN_EVENT_TIMEOUT_S = 600.0
"""The longest a turn waits for its engine's next event (its first token
included: a turn may queue behind others). A replica that dies is reported
by Ray at once; this bounds a hung one."""


@dataclass
class LiveMove:
    """One live move of a turn, as its stream saw it."""

    source: str
    destination: str
    after_tokens: int
    """Tokens the turn had generated when it stopped on the source."""
    source_last_token_s: float | None
    first_token_s: float | None = None

    @property
    def downtime_s(self) -> float | None:
        """The gap in the client's stream: the source's last token out to
        the continuation's first."""
        if self.first_token_s is None or self.source_last_token_s is None:
            return None
        return self.first_token_s - self.source_last_token_s

    def as_json(self) -> dict[str, Any]:
        downtime = self.downtime_s
        return {
            "from": self.source,
            "to": self.destination,
            "after_tokens": self.after_tokens,
            "downtime_ms": None if downtime is None else 1000 * downtime,
        }


@dataclass
class Turn:
    """See the module docstring. `record` is the session's record as the
    turn started it (GENERATING under `key`), None outside sessions."""

    key: str
    session_id: str | None
    record: SessionRecord | None
    chat: bool
    close: bool
    hints: SegmentHints
    services: Any
    """The ingress's `TurnServices`: engine feeds, placement, front end."""
    started_s: float = field(default_factory=time.monotonic)
    plan: PromptPlan | None = None
    instance_id: str | None = None
    placed: str = ""
    first_token_s: float | None = None
    end: TurnEnd | None = None
    failure: BaseException | None = None
    engine_wait_s: float = 0.0
    phases_s: dict[str, float] = field(default_factory=dict)
    """Seconds of this turn's steps in the ingress (`TURN_PHASES`), as far as
    it got: where the serving stack's share of a turn goes."""
    request: TurnRequest | None = None
    """The turn's engine request, once placed."""
    running: TurnRequest | None = None
    """The engine request being read: `request`, or a live move's continuation."""
    moves: list[LiveMove] = field(default_factory=list)
    last_token_s: float | None = None

    @property
    def action(self) -> SessionAction:
        if self.session_id is None:
            return SessionAction.NONE
        return SessionAction.END if self.close else SessionAction.KEEP

    # ------------------------------------------------------------- prompt
    async def plan_prompt(
        self, rendered: list[int], render_prefix: RenderPrefix | None, request: Any
    ) -> list[int]:
        """The prompt to run: vLLM's rendering, or outside a fresh session
        the one planned from the record (`cluster.history`)."""
        record = self.record
        if record is None:
            self.plan = PromptPlan(rendered, 0, 0, None, ())
            if self.chat and self.session_id is not None:
                digests = [message_digest(m) for m in request.messages]
                self.plan = await plan_chat_prompt((), (), digests, rendered, render_prefix, ())
            return rendered
        if self.chat:
            digests = [message_digest(m) for m in request.messages]
            self.plan = await plan_chat_prompt(
                record.token_ids,
                record.messages,
                digests,
                rendered,
                render_prefix,
                self.services.closing,
            )
        elif isinstance(request.prompt, str):
            tokenizer = self.services.tokenizer
            self.plan = plan_text_prompt(
                record.token_ids,
                tokenizer.decode(list(record.token_ids)),
                request.prompt,
                rendered,
                lambda text: tokenizer.encode(text, add_special_tokens=False),
            )
        else:
            self.plan = plan_token_prompt(record.token_ids, rendered)
        return self._checked(self.plan.token_ids, request)

    def _checked(self, tokens: list[int], request: Any) -> list[int]:
        from vllm.exceptions import VLLMValidationError

        limit = self.services.max_model_len
        wanted = getattr(request, "max_completion_tokens", None) or request.max_tokens or 1
        if len(tokens) + wanted > limit:
            raise VLLMValidationError(
                f"the session's context ({len(tokens)} tokens) and max_tokens ({wanted}) "
                f"exceed the model's maximum context length of {limit} tokens",
                parameter="messages" if self.chat else "prompt",
                value=len(tokens),
            )
        return tokens

    # ---------------------------------------------------------------- run
    async def run(
        self, prompt_token_ids: list[int], sampling: SamplingParams, request_id: str
    ) -> AsyncGenerator[RequestOutput, None]:
        """Place the turn and stream its outputs from its engine instance;
        the final output goes on once the turn's `TurnEnd` (sent right
        after it) is read, so that whoever sees the finish reason can
        commit the turn to the session's record."""
        decision = await self._place(prompt_token_ids)
        self.instance_id, self.placed = decision.instance_id, decision.reason
        turn = TurnRequest(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            sampling=sampling,
            session_id=self.session_id,
            action=self.action,
            hints=self.hints,
        )
        feed = self.services.feeds[decision.instance_id]
        logger.info(
            "turn start session=%s request=%s instance=%s placed=%r prompt_tokens=%d "
            "from_record=%d",
            self.session_id,
            request_id,
            decision.instance_id,
            decision.reason,
            len(prompt_token_ids),
            self.plan.from_record if self.plan else 0,
        )
        waited = time.monotonic()
        began = self.started_s + self.phases_s.get("record_start", 0.0)
        self.phases_s["until_engine_call"] = waited - began
        final: RequestOutput | None = None
        ended = False
        self.request = self.running = turn
        try:
            events = await feed.start(turn)
            self.phases_s["engine_call_ack"] = time.monotonic() - waited
            while not ended:
                # A timer per wait for the engine, never around a `yield`.
                async with asyncio.timeout(TURN_EVENT_TIMEOUT_S):
                    batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                for event in batch:
                    if isinstance(event, FeedBroken):
                        raise event.error
                    if isinstance(event, TurnOutput):
                        output = event.with_prompt(prompt_token_ids).output
                        output.request_id = request_id  # a continuation's too
                        if output.outputs[0].token_ids:
                            self._token_out()
                        if output.finished:
                            final = output
                            continue
                        yield output
                    elif isinstance(event, TurnMoved):
                        # The last event of the request it ends: go on elsewhere.
                        feed, events = await self._continue(event)
                        break
                    elif isinstance(event, TurnEnd):
                        self.end, ended = self._whole(event), True
                        if final is not None:
                            yield final
        except (ValueError, TypeError, VLLMClientError) as exc:  # the engine refused the input
            raise _cause(exc) from None
        except Exception as exc:
            self.failure = exc
            logger.error(
                "turn failed session=%s request=%s instance=%s: %r",
                self.session_id,
                request_id,
                self.instance_id,
                exc,
            )
            raise EngineUnavailable(
                f"engine instance {self.instance_id} failed during the turn ({exc!r}); "
                "the session is as it was before this turn: retry it"
            ) from exc
        finally:
            self.engine_wait_s += time.monotonic() - waited
            if not ended:
                feed.abort(self.running.request_id)

    # --------------------------------------------------------- live moves
    def _token_out(self) -> None:
        now = time.monotonic()
        if self.first_token_s is None:
            self.first_token_s = now
        move = self.moves[-1] if self.moves else None
        if move is not None and move.first_token_s is None:
            move.first_token_s = now
            logger.info(
                "turn moved session=%s request=%s from=%s to=%s after_tokens=%d downtime_ms=%s",
                self.session_id,
                self.running.request_id,
                move.source,
                move.destination,
                move.after_tokens,
                _ms(move.downtime_s),
            )
        self.last_token_s = now

    async def _continue(self, moved: TurnMoved) -> tuple[Any, asyncio.Queue[Any]]:
        """Start the turn's continuation where its engine handed it over
        (`cluster.live_migration`): on the destination, or if that fails on
        the instance it stopped on (which recomputes what it let go)."""
        rest = continuation(self.request, list(moved.token_ids), len(self.moves) + 1)
        source = self.instance_id
        failure: BaseException | None = None
        for instance in dict.fromkeys((moved.destination, source)):
            try:
                feed = self.services.feeds[instance]
                events = await feed.start(rest)
            except Exception as exc:
                logger.warning(
                    "turn continuation session=%s request=%s on %s failed: %r",
                    self.session_id,
                    rest.request_id,
                    instance,
                    exc,
                )
                failure = exc
                continue
            after = len(moved.token_ids) - len(self.request.prompt_token_ids)
            self.moves.append(LiveMove(source, instance, after, self.last_token_s))
            self.running, self.instance_id = rest, instance
            return feed, events
        raise ConnectionError(f"the turn's continuation started nowhere: {failure!r}")

    def _whole(self, end: TurnEnd) -> TurnEnd:
        """The turn's end: after a move its continuation's, with the tokens
        generated before the move in front (the record appends them all)."""
        if self.running is self.request:
            return end
        before = self.running.prompt_token_ids[len(self.request.prompt_token_ids) :]
        return TurnEnd(
            request_id=self.request.request_id,
            finish_reason=end.finish_reason,
            prompt_token_ids=tuple(self.request.prompt_token_ids),
            output_token_ids=(*before, *end.output_token_ids),
            kv=end.kv,
            engine_s=time.monotonic() - self.started_s,
        )

    async def _place(self, prompt_token_ids: Sequence[int]) -> DispatchDecision:
        affinity = self.record.instance_id if self.record is not None else None
        hashes = block_hashes(prompt_token_ids, self.services.block_size)
        try:
            return await self.services.placement.place(
                self.session_id, len(prompt_token_ids), affinity, hashes
            )
        except NoInstanceAvailable as exc:
            raise EngineUnavailable(str(exc)) from exc
        except TimeoutError as exc:
            raise EngineUnavailable("placement timed out") from exc

    # ------------------------------------------------------------ outcome
    def record_change(self, assistant: dict[str, Any] | None):
        """The record's change once the turn produced `assistant` (the
        response's message, chat): its tokens, messages and reuse."""
        end, plan = self.end, self.plan
        tokens = (*plan.token_ids, *end.output_token_ids)
        marks: tuple[MessageMark, ...] = ()
        if self.chat and assistant is not None:
            marks = (*plan.messages, MessageMark(message_digest(assistant), len(tokens), True))
        last_turn = {**vars(end.kv), "resumed_from": _value(end.kv.resumed_from)}

        def change(record: SessionRecord) -> SessionRecord:
            from dataclasses import replace

            return replace(
                record,
                instance_id=self.instance_id,
                token_ids=tokens,
                messages=marks,
                turns=record.turns + 1,
                last_turn=last_turn,
            )

        return change

    def mars_field(self) -> dict[str, Any]:
        """The response's `mars` object: where the turn ran and what it found."""
        field: dict[str, Any] = {"instance_id": self.instance_id, "placed": self.placed}
        if self.end is not None:
            kv = {**vars(self.end.kv), "resumed_from": _value(self.end.kv.resumed_from)}
            had_context = self.record is not None and self.record.tokens > 0
            kv["rebuilt_from_record"] = had_context and self.end.kv.resumed_from is None
            field["kv"] = kv
            field["engine_s"] = self.end.engine_s
            field["phases_ms"] = {name: 1000 * s for name, s in self.phases_s.items()}
        if self.moves:
            field["moves"] = [move.as_json() for move in self.moves]
        if self.session_id is not None:
            field["session_id"] = self.session_id
            field["session_state"] = "closed" if self.close else "paused"
            if self.plan is not None:
                field["history"] = self.plan.summary()
        return field


def continuation(request: TurnRequest, token_ids: list[int], moves: int) -> TurnRequest:
    """The engine request that continues `request` from `token_ids` (its
    prompt and the tokens generated so far) after its `moves`-th live move.
    An engine stops a turn only while it runs, so before its last token."""
    generated = len(token_ids) - len(request.prompt_token_ids)
    sampling = request.sampling.clone()
    remaining = (sampling.max_tokens or 0) - generated
    if generated < 0 or remaining < 1:
        raise ValueError(
            f"request {request.request_id} stopped after {generated} of "
            f"{sampling.max_tokens} tokens: nothing to continue"
        )
    sampling.max_tokens = remaining
    sampling.min_tokens = max(0, sampling.min_tokens - generated)
    return TurnRequest(
        request_id=f"{request.request_id}-moved-{moves}",
        prompt_token_ids=token_ids,
        sampling=sampling,
        session_id=request.session_id,
        action=request.action,
        hints=request.hints,
    )


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.0f}"


def _cause(exc: BaseException) -> BaseException:
    """The engine's own exception, out of Ray's wrapper (whose text is a
    traceback, not a message for a client)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _value(strategy) -> str | None:
    return None if strategy is None else strategy.value
