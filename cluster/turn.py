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
from workers.turns import SessionAction, TurnEnd, TurnOutput, TurnRequest

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
                        if self.first_token_s is None and output.outputs[0].token_ids:
                            self.first_token_s = time.monotonic()
                        if output.finished:
                            final = output
                            continue
                        yield output
                    elif isinstance(event, TurnEnd):
                        self.end, ended = event, True
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
                decision.instance_id,
                exc,
            )
            raise EngineUnavailable(
                f"engine instance {decision.instance_id} failed during the turn ({exc!r}); "
                "the session is as it was before this turn: retry it"
            ) from exc
        finally:
            self.engine_wait_s += time.monotonic() - waited
            if not ended:
                feed.abort(request_id)

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
        if self.session_id is not None:
            field["session_id"] = self.session_id
            field["session_state"] = "closed" if self.close else "paused"
            if self.plan is not None:
                field["history"] = self.plan.summary()
        return field


def _cause(exc: BaseException) -> BaseException:
    """The engine's own exception, out of Ray's wrapper (whose text is a
    traceback, not a message for a client)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _value(strategy) -> str | None:
    return None if strategy is None else strategy.value
