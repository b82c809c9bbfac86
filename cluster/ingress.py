"""The HTTP ingress: OpenAI-compatible endpoints with session extensions.

A request names a session (header `X-Session-Id` or body `session_id`) to
keep its context on the engine between turns: the turn ends (at
`max_tokens`, a stop token, or a tool-call token) with the session paused on
its instance, and the next request of the session sends only the new
messages (typically the tool's result). Without a session id, a request is a
one-turn session: it never enters the state store, and the engine closes it
when its chunk ends. `mars.plan` runs a whole new
session with server-side tools. Once a session has ended (`mars.close`,
`DELETE`), its id is free: the next request under it starts a new session.
Engines keep an ended session's record a while, so each incarnation of a
session id has its own engine id (`SessionRecord.engine_session_id`).

Each turn is logged at start and end (and on failure) with its session and
Serve request id, and its latency is recorded here (`cluster.metrics` says
why here) when metrics are on.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask

from cluster.logs import request_id, serve_logger
from cluster.metrics import IngressMetrics, TurnTiming
from cluster.placement import InIngress, ViaScheduler
from cluster.protocol import ChatCompletionRequest, CompletionRequest, _Common
from cluster.serve_env import freeze_startup_heap
from cluster.state_store import (
    SessionRecord,
    SessionState,
    UnknownSession,
    make_state_store,
    new_engine_session_id,
)
from policies import DispatchDecision, NoInstanceAvailable
from workers.engine import SessionEnded

logger = serve_logger(__name__)

ABANDONED_TURN_TIMEOUT_S = 600.0
"""How long a turn whose client left may go on generating before its record
is left as it is (and an error logged)."""
ABANDONED_TURN_POLL_S = 0.1

app = FastAPI(title="mars-serve")


class ApiError(Exception):
    """An OpenAI-shaped error response."""

    def __init__(self, status: int, message: str, *, kind: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": None}
        return JSONResponse({"error": body}, status_code=self.status)


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


@app.exception_handler(RequestValidationError)
async def _invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
    return _validation_error(exc.errors()).response()


def _validation_error(errors: Any) -> ApiError:
    first = errors[0]
    loc = [str(p) for p in first["loc"] if p != "body"]
    param = ".".join(loc) or None
    message = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: "
        f"{e['msg'].removeprefix('Value error, ')}"
        for e in errors
    )
    return ApiError(400, message, kind="invalid_request_error", param=param)


class Ingress:
    """The deployment class; `cluster.app` wraps it with `serve.ingress(app)`."""

    def __init__(
        self,
        model_name: str,
        model_path: str,
        engines: dict[str, Any],
        scheduler: Any,
        state_store: dict[str, Any],
        dispatch: dict[str, Any],
        *,
        engine_policy: str,
        metrics: bool,
        sole_replica: bool,
    ) -> None:
        from transformers import AutoTokenizer

        self._model_name = model_name
        self._tokenizer = AutoTokenizer.from_pretrained(model_path)
        self._engines = engines
        self._scheduler = scheduler
        # A lone replica is the application's only decider: it places new
        # sessions itself, from the global scheduler's loads (one Ray call per
        # session less); several replicas ask the global scheduler.
        self._placement = (
            InIngress(scheduler, dispatch, metrics=metrics)
            if sole_replica
            else ViaScheduler(scheduler)
        )
        self._store = make_state_store(state_store.get("url"), state_store["session_ttl_s"])
        self.metrics = IngressMetrics(engine_policy) if metrics else None
        self._settling: set[asyncio.Task[None]] = set()
        freeze_startup_heap()

    # ------------------------------------------------------------ endpoints
    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self) -> dict[str, Any]:
        loads = await self._scheduler.loads.remote()
        healthy = [load["instance_id"] for load in loads if load["healthy"]]
        if not healthy:
            raise ApiError(503, "no engine instance is ready", kind="service_unavailable")
        return {"status": "ready", "instances": healthy}

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        card = {"id": self._model_name, "object": "model", "owned_by": "mars-serve"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        started_s = time.monotonic()
        body = await self._parse(request, ChatCompletionRequest)
        return await self._serve(request, body, started_s, chat=True)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        started_s = time.monotonic()
        body = await self._parse(request, CompletionRequest)
        return await self._serve(request, body, started_s, chat=False)

    @app.get("/v1/sessions/{session_id}")
    async def get_session(self, session_id: str) -> dict[str, Any]:
        record = await self._record(session_id)
        engine = self._engines[record.instance_id]
        info = await engine.session_info.remote(record.engine_session_id)
        return {
            "session_id": session_id,
            "instance_id": record.instance_id,
            "engine_session_id": record.engine_session_id,
            "state": record.state.value,
            "tokens": record.tokens,
            "strategy": info["strategy"],
            "engine": info,
        }

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(self, session_id: str) -> dict[str, Any]:
        record = await self._record(session_id)
        await self._engines[record.instance_id].close.remote(record.engine_session_id)
        await asyncio.to_thread(self._store.delete_session, session_id)
        return {"session_id": session_id, "deleted": True}

    # ------------------------------------------------------------- helpers
    async def _parse(self, request: Request, model: type[_Common]) -> _Common:
        try:
            data = await request.json()
        except json.JSONDecodeError as exc:
            raise ApiError(400, f"body is not JSON: {exc}", kind="invalid_request_error") from None
        try:
            body = model.model_validate(data)
        except ValidationError as exc:
            raise _validation_error(exc.errors()) from None
        if body.model != self._model_name:
            raise ApiError(
                404,
                f"model {body.model!r} does not exist; this server serves {self._model_name!r}",
                kind="invalid_request_error",
                param="model",
            )
        return body

    async def _record(self, session_id: str) -> SessionRecord:
        try:
            return await asyncio.to_thread(self._store.get_session, session_id)
        except UnknownSession:
            raise ApiError(
                404, f"session {session_id!r} not found", kind="not_found_error", param="session_id"
            ) from None

    def _session_id(self, request: Request, body: _Common) -> tuple[str, bool]:
        header = request.headers.get("x-session-id")
        if header and body.session_id and header != body.session_id:
            raise ApiError(
                400,
                f"X-Session-Id {header!r} and session_id {body.session_id!r} differ",
                kind="invalid_request_error",
                param="session_id",
            )
        named = header or body.session_id
        return (named, False) if named else (f"anon-{uuid.uuid4().hex}", True)

    def _tokens(self, body: _Common, *, chat: bool, continuing: bool) -> list[int]:
        if not chat:  # the Rust tokenizer itself: the same ids, a third of the time
            encoding = self._tokenizer.backend_tokenizer.encode(
                body.prompt, add_special_tokens=not continuing
            )
            return encoding.ids
        messages = [m.model_dump() for m in body.messages]
        ids = self._tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        if hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        if continuing and ids and ids[0] == self._tokenizer.bos_token_id:
            ids = ids[1:]  # the session already holds its start
        return list(ids)

    async def _serve(self, request: Request, body: _Common, started_s: float, *, chat: bool):
        """Serve one turn; `started_s` is when the request reached the ingress
        (monotonic), where its latency is measured from."""
        session_id, ephemeral = self._session_id(request, body)
        try:
            return await self._start_turn(body, session_id, ephemeral, started_s, chat=chat)
        except SessionEnded as exc:
            logger.warning(
                "turn rejected session=%s request=%s status=409: %s", session_id, request_id(), exc
            )
            kind = "invalid_request_error"
            raise ApiError(409, str(exc), kind=kind, param="session_id") from None
        except ApiError as exc:
            logger.warning(
                "turn rejected session=%s request=%s status=%d: %s",
                session_id,
                request_id(),
                exc.status,
                exc.message,
            )
            raise
        except Exception:
            logger.exception("turn failed session=%s request=%s", session_id, request_id())
            raise

    async def _start_turn(
        self, body: _Common, session_id: str, ephemeral: bool, started_s: float, *, chat: bool
    ):
        """Place the turn and start it on its engine; the response (or its
        stream) ends the turn."""
        existing = None if ephemeral else await self._session_to_continue(session_id, body)
        token_ids = self._tokens(body, chat=chat, continuing=existing is not None)
        if existing is not None:
            # The session's KV (preserved, swapped or to recompute) lives on its
            # instance: every later turn goes there, whatever the placement policy.
            instance_id, placed = existing.instance_id, "session"
            engine_session_id = existing.engine_session_id
        else:
            decision = await self._place(session_id, len(token_ids))
            instance_id, placed = decision.instance_id, decision.reason
            engine_session_id = session_id if ephemeral else new_engine_session_id(session_id)
        engine = self._engines[instance_id]
        turn_start = partial(
            _log_turn_start, session_id, request_id(), instance_id, placed, len(token_ids), body
        )
        if body.mars.plan is not None:
            turn_start()
            return await self._run_plan(
                engine, session_id, engine_session_id, token_ids, body, chat=chat
            )
        if not ephemeral:
            await self._mark_generating(existing, session_id, instance_id, engine_session_id)
        turn = _Turn(
            self,
            body,
            session_id,
            instance_id,
            ephemeral,
            chat,
            len(token_ids),
            started_s,
            engine_session_id=engine_session_id,
        )
        hints = {"tool": body.mars.tool, "api_s": body.mars.expected_api_s}
        events = engine.options(stream=True).generate.remote(
            engine_session_id,
            token_ids,
            body.token_limit,
            {k: v for k, v in hints.items() if v is not None},
            [*body.stop_token_ids, *body.mars.tool_call_token_ids],
            close=turn.closes_session,
        )
        # Logged once the call to the engine is on its way (Serve sends it from
        # a task this coroutine has just queued): the line is written while
        # the engine works, not before the request leaves.
        asyncio.get_running_loop().call_soon(turn_start)
        if body.stream:
            return StreamingResponse(turn.sse(events), media_type="text/event-stream")
        return await turn.complete(events)

    async def _session_to_continue(self, session_id: str, body: _Common) -> SessionRecord | None:
        """The paused session this turn continues, or None for a new session;
        a 409 if the session is mid-turn, or if a `mars.plan` (a whole new
        session) names it."""
        try:
            existing = await asyncio.to_thread(self._store.get_session, session_id)
        except UnknownSession:
            return None
        if existing.state is not SessionState.PAUSED:
            raise ApiError(
                409,
                f"session {session_id!r} is {existing.state.value}; wait for its turn to end",
                kind="invalid_request_error",
                param="session_id",
            )
        if body.mars.plan is not None:
            raise ApiError(
                409,
                f"session {session_id!r} exists; mars.plan runs a whole new session",
                kind="invalid_request_error",
                param="mars.plan",
            )
        return existing

    async def _place(self, session_id: str, prompt_tokens: int) -> DispatchDecision:
        try:
            return await self._placement.place(session_id, prompt_tokens)
        except NoInstanceAvailable as exc:
            raise ApiError(503, str(exc), kind="service_unavailable") from None

    async def _mark_generating(
        self,
        existing: SessionRecord | None,
        session_id: str,
        instance_id: str,
        engine_session_id: str,
    ) -> None:
        if existing is None:
            record = SessionRecord(session_id, instance_id, engine_session_id)
            await asyncio.to_thread(self._store.create_session, record)
        else:
            await asyncio.to_thread(
                self._store.update_session,
                session_id,
                lambda r: replace(r, state=SessionState.GENERATING),
            )

    async def _end_turn(self, turn: _Turn, end: dict[str, Any]) -> None:
        """Record the turn's end in the store (the engine has already closed a
        last turn's session: `generate(close=True)`)."""
        if turn.ephemeral:
            return
        if turn.body.mars.close:
            await asyncio.to_thread(self._store.delete_session, turn.session_id)
            return
        tokens = turn.prompt_tokens + max(0, len(end["token_ids"]) - 1)
        await asyncio.to_thread(
            self._store.update_session,
            turn.session_id,
            lambda r: replace(r, state=SessionState.PAUSED, tokens=r.tokens + tokens),
        )

    async def _run_plan(
        self,
        engine,
        session_id: str,
        engine_session_id: str,
        token_ids,
        body: _Common,
        *,
        chat: bool,
    ):
        plan = [
            {
                "generate_tokens": s.generate_tokens,
                "call": {"tool": s.call.tool, "arguments": s.call.arguments} if s.call else None,
            }
            for s in body.mars.plan
        ]
        result = await engine.run_plan.remote(engine_session_id, token_ids, plan)
        text = "".join(self._tokenizer.decode(o) for o in result["outputs"])
        usage = {
            "prompt_tokens": len(token_ids),
            "completion_tokens": sum(len(o) for o in result["outputs"]),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        mars = {"ttft_s": result["ttft_s"], "e2e_s": result["e2e_s"], "segments": len(plan)}
        logger.info(
            "plan end session=%s request=%s segments=%d completion_tokens=%d e2e_s=%.3f",
            session_id,
            request_id(),
            len(plan),
            usage["completion_tokens"],
            result["e2e_s"],
        )
        return _response(body, session_id, text, "stop", usage, chat=chat, mars=mars)

    def settle_abandoned(self, turn: _Turn) -> None:
        """The turn ended without its end event (the client left mid-stream,
        or the engine call failed): bring the session's record to where the
        engine leaves it, in the background, so that the session's next turn
        is not refused as still generating and a session that never opened
        leaves no record. A one-turn session needs nothing: the engine
        closes it when its chunk ends."""
        if turn.ephemeral:
            return
        task = asyncio.get_running_loop().create_task(self._settle(turn))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(self, turn: _Turn) -> None:
        """Record the abandoned turn's session as the engine has it once the
        chunk has ended: paused with its context, or gone (closed, or never
        opened because the engine had not started the chunk)."""
        try:
            info = await self._session_after_chunk(turn)
            if info["state"] == SessionState.FINISHED.value:
                await asyncio.to_thread(self._store.delete_session, turn.session_id)
            else:
                await asyncio.to_thread(
                    self._store.update_session,
                    turn.session_id,
                    lambda r: replace(r, state=SessionState.PAUSED, tokens=info["context_tokens"]),
                )
            logger.warning(
                "turn left unfinished (client gone or engine call failed) session=%s request=%s "
                "instance=%s: session %s on the engine, recorded",
                turn.session_id,
                turn.request_id,
                turn.instance_id,
                info["state"],
            )
        except Exception:
            logger.exception(
                "turn left unfinished session=%s request=%s: could not settle its record",
                turn.session_id,
                turn.request_id,
            )

    async def _session_after_chunk(self, turn: _Turn) -> dict[str, Any]:
        """The engine's view of the turn's session once its chunk is no longer
        generating (polled). A session unknown to the engine (its `KeyError`,
        which Serve re-raises as such) reads as finished: the first chunk
        never started, or the session was closed. Any other failure (the
        replica restarting, say) is retried until the deadline: the record is
        never dropped on a guess."""
        engine = self._engines[turn.instance_id]
        deadline = time.monotonic() + ABANDONED_TURN_TIMEOUT_S
        while True:
            try:
                info = await engine.session_info.remote(turn.engine_session_id)
            except KeyError:
                return {"state": SessionState.FINISHED.value, "context_tokens": 0}
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise
                logger.warning(
                    "abandoned turn session=%s request=%s: asking instance %s failed (%r); "
                    "retrying",
                    turn.session_id,
                    turn.request_id,
                    turn.instance_id,
                    exc,
                )
            else:
                if info["state"] != SessionState.GENERATING.value:
                    return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"still generating after {ABANDONED_TURN_TIMEOUT_S:g} s")
            await asyncio.sleep(ABANDONED_TURN_POLL_S)

    def decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids)


class _Turn:
    """One request's turn: relays engine events as an OpenAI response, and
    times it (`cluster.metrics.TurnTiming`)."""

    def __init__(
        self,
        ingress,
        body,
        session_id,
        instance_id,
        ephemeral,
        chat,
        prompt_tokens,
        started_s,
        *,
        engine_session_id: str,
    ):
        self.ingress, self.body, self.session_id = ingress, body, session_id
        self.engine_session_id = engine_session_id
        """The engine's id for this incarnation of the session (`SessionRecord`)."""
        self.instance_id, self.ephemeral, self.chat = instance_id, ephemeral, chat
        self.prompt_tokens = prompt_tokens
        self.created = int(time.time())
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.request_id = request_id()
        self.started_s = started_s
        self.first_token_s: float | None = None
        self.engine_wait_s = 0.0
        """Seconds spent awaiting the engine's events (the `Server-Timing` split)."""

    @property
    def closes_session(self) -> bool:
        """The session's last turn: one-turn (no session id) or `mars.close`."""
        return self.ephemeral or self.body.mars.close

    def _tokens_arrived(self) -> None:
        if self.first_token_s is None:
            self.first_token_s = time.monotonic()

    async def _finish(self, end: dict[str, Any]) -> TurnTiming:
        """The turn is over: pause or close the session in the store before
        the client hears of it (its next turn must find the session paused),
        and take the turn's timing."""
        await self.ingress._end_turn(self, end)
        return TurnTiming(
            self.started_s, self.first_token_s, time.monotonic(), len(end["token_ids"])
        )

    async def _record(self, end: dict[str, Any], timing: TurnTiming) -> None:
        """The turn's metrics and end-of-turn log line, once the response is
        out: off the request's latency path."""
        if self.ingress.metrics is not None:
            self.ingress.metrics.observe_turn(self.instance_id, timing)
        logger.info(
            "turn end session=%s request=%s response=%s instance=%s finish=%s "
            "completion_tokens=%d ttft_s=%s e2e_s=%.3f",
            self.session_id,
            self.request_id,
            self.id,
            self.instance_id,
            self._finish_reason(end),
            timing.output_tokens,
            "-" if timing.ttft_s is None else f"{timing.ttft_s:.3f}",
            timing.e2e_s,
        )

    def _finish_reason(self, end: dict[str, Any]) -> str:
        last = end["token_ids"][-1:] or [None]
        if end["end"] == "stop" and last[0] in self.body.mars.tool_call_token_ids:
            return "tool_calls"
        return end["end"]

    def _usage(self, end: dict[str, Any]) -> dict[str, int]:
        completion = len(end["token_ids"])
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    async def complete(self, events) -> JSONResponse:
        end = None
        waiting_since = time.monotonic()
        try:
            async for event in events:
                if "tokens" in event:
                    self._tokens_arrived()
                elif "end" in event:
                    end = event
            self.engine_wait_s = time.monotonic() - waiting_since
            timing = await self._finish(end)
        except Exception:
            self.ingress.settle_abandoned(self)  # the record as the engine leaves it
            raise
        text = self.ingress.decode(end["token_ids"])
        response = _response(
            self.body,
            self.session_id,
            text,
            self._finish_reason(end),
            self._usage(end),
            chat=self.chat,
            mars={
                "instance_id": self.instance_id,
                "session_state": "closed" if self.closes_session else "paused",
                "engine_s": end["engine_s"],
            },
            response_id=self.id,
        )
        response.headers["Server-Timing"] = self._server_timing(end["engine_s"])
        response.background = BackgroundTask(self._record, end, timing)
        return response

    def _server_timing(self, engine_s: float) -> str:
        """A W3C `Server-Timing` header (milliseconds): the time in this
        ingress (``ingress``, from the handler's start to the response), the
        part of it spent awaiting the engine's events (``engine_call``, the
        Ray call included) and the engine replica's own time (``engine``).
        Clients and the overhead probe read where a request's time went."""
        ingress_s = time.monotonic() - self.started_s
        parts = {"ingress": ingress_s, "engine_call": self.engine_wait_s, "engine": engine_s}
        return ", ".join(f"{name};dur={seconds * 1000:.3f}" for name, seconds in parts.items())

    async def sse(self, events) -> AsyncIterator[str]:
        ended: tuple[dict[str, Any], TurnTiming] | None = None
        try:
            async for event in events:
                if "tokens" in event:
                    self._tokens_arrived()
                    yield _sse(self._chunk(self.ingress.decode(event["tokens"]), None))
                elif "end" in event:
                    ended = event, await self._finish(event)
                    yield _sse(self._chunk("", self._finish_reason(event)))
        except Exception as exc:  # the stream has started: report in-band
            logger.exception(
                "turn failed session=%s request=%s instance=%s: stream broke",
                self.session_id,
                self.request_id,
                self.instance_id,
            )
            yield _sse({"error": {"message": str(exc), "type": "server_error"}})
        finally:  # a failure, or the client went away (the stream was closed)
            if ended is None:
                self.ingress.settle_abandoned(self)
        yield "data: [DONE]\n\n"
        if ended is not None:  # the client has its last chunk: record off its path
            await self._record(*ended)

    def _chunk(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish_reason}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason}
            kind = "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.body.model,
            "choices": [choice],
            "session_id": self.session_id,
        }


def _log_turn_start(
    session_id: str,
    request: str,
    instance_id: str,
    placed: str,
    prompt_tokens: int,
    body: _Common,
) -> None:
    logger.info(
        "turn start session=%s request=%s instance=%s placed=%r prompt_tokens=%d stream=%s plan=%s",
        session_id,
        request,
        instance_id,
        placed,
        prompt_tokens,
        body.stream,
        body.mars.plan is not None,
    )


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _response(
    body: _Common,
    session_id: str,
    text: str,
    finish_reason: str,
    usage: dict[str, int],
    *,
    chat: bool,
    mars: dict[str, Any],
    response_id: str | None = None,
) -> JSONResponse:
    if chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason,
        }
        kind, prefix = "chat.completion", "chatcmpl"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        kind, prefix = "text_completion", "cmpl"
    return JSONResponse(
        {
            "id": response_id or f"{prefix}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": body.model,
            "choices": [choice],
            "usage": usage,
            "session_id": session_id,
            "mars": mars,
        }
    )
