"""The HTTP ingress: vLLM's OpenAI API, with sessions.

`/v1/chat/completions`, `/v1/completions`, `/tokenize`, `/detokenize` and
`/v1/models` are vLLM's own serving code (`cluster.frontend`): every field
`vllm serve` honours is honoured here, with its errors. A field neither
vLLM nor mars-serve honours is a 400 naming it.

A request may name a session (header `X-Session-Id` or body `session_id`):
then the session's record keeps its whole context, and the turn is planned
from it (`cluster.history`): a client that re-sends the whole conversation,
as every OpenAI client does, has only the new part appended, and its turn
runs on the instance that holds the session's KV. Two turns of one session
never run at once: the second gets a 409 (`cluster.session_lifecycle`). A
turn whose engine fails gets a 503 with `Retry-After` (in-band when
streaming) and leaves the record as it was, so a retry goes on from there
on a healthy instance. Our own fields are under `mars` (tool hints,
`close`), and every response says under `mars` where the turn ran and what
it reused. A chat request that offers a tool of the serving config has its
calls run here, round after round, in one response (`cluster.server_tools`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.exception_handling.handlers.validation import (
    validation_exception_handler,
)
from vllm.entrypoints.serve.tokenize.protocol import (
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from vllm.exceptions import VLLMError

from cluster import sse
from cluster.drain import DRAIN, drain_instance
from cluster.engine_feed import EngineFeed
from cluster.errors import ApiError, unavailable
from cluster.frontend import EngineUnavailable, FrontendSettings, build_frontend
from cluster.live_migration import move_running_turn
from cluster.logs import serve_logger
from cluster.metrics import IngressMetrics, TurnTiming
from cluster.migration import MigrationOutcome, migrate_paused_session
from cluster.placement import InIngress, ViaScheduler
from cluster.protocol import MarsExtension, MigrateSessionRequest, unsupported_fields
from cluster.serve_env import freeze_startup_heap
from cluster.server_tools import ChatTurns, ServerTools
from cluster.session_lifecycle import SessionConflict, SessionEvent, SessionState
from cluster.state_store import SessionRecord, UnknownSession, make_state_store
from cluster.turn import Turn
from policies import InstanceLoad, NoInstanceAvailable
from workers.hints import SegmentHints
from workers.tools import registry_for

logger = serve_logger(__name__)

OPERATOR_MIGRATION = "operator"
"""The reason of a move asked for over HTTP (policies name their own)."""

_MIGRATION_STATUS = {
    MigrationOutcome.COMMITTED: 200,
    MigrationOutcome.REFUSED: 409,
    MigrationOutcome.ABORTED_CONFLICT: 409,
    MigrationOutcome.ABORTED_SOURCE: 503,
    MigrationOutcome.ABORTED_DESTINATION: 503,
}
"""The HTTP status of each outcome: a session that was not paused (or is
there already) conflicts; an engine that failed is a retryable 503."""

ENGINE_CALL_TIMEOUT_S = 10.0
"""Timeout of the ingress's unary calls to an engine (session info, end)."""

app = FastAPI(title="mars-serve")
# vLLM's handler for malformed bodies (400 naming the field, as `vllm serve`);
# it reads one option of vLLM's server arguments.
app.state.args = SimpleNamespace(log_error_stack=False)
app.exception_handler(RequestValidationError)(validation_exception_handler)


async def _vllm_error(_: Request, exc: Exception) -> JSONResponse:
    """vLLM's errors, and the ValueError/TypeError/OverflowError its serving
    code raises on a request it cannot take, in vLLM's shape and status, as
    `vllm serve` answers them (400 for those; `vllm serve` also shuts itself
    down on a dead engine: a cluster's engines die alone)."""
    error = create_error_response(exc)
    return JSONResponse(error.model_dump(), status_code=error.error.code)


for _kind in (VLLMError, ValueError, TypeError, OverflowError):
    app.exception_handler(_kind)(_vllm_error)


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


@dataclass(frozen=True)
class TurnServices:
    """What a `Turn` uses of the ingress."""

    feeds: dict[str, EngineFeed]
    placement: Any
    tokenizer: Any
    closing: list[int]
    max_model_len: int
    block_size: int


class Ingress:
    """The deployment class; `cluster.app` wraps it with `serve.ingress(app)`."""

    def __init__(
        self,
        frontend: dict[str, Any],
        tools: list[dict[str, Any]],
        engines: dict[str, Any],
        scheduler: Any,
        state_store: dict[str, Any],
        dispatch: dict[str, Any],
        *,
        engine_policy: str,
        metrics: bool,
        sole_replica: bool,
    ) -> None:
        settings = FrontendSettings(**frontend)
        self._frontend = build_frontend(settings)
        self._server_tools = ServerTools(
            registry_for(tools),
            frozenset(tool["name"] for tool in tools),
            next_choice="auto" if settings.tool_parser else "none",
            tokenizer=self._frontend.tokenizer,
            turns=ChatTurns(
                run=partial(self._run_turn, chat=True),
                settle=self._settle,
                relay=self._relay,
                end_session=self._end_own_session,
            ),
        )
        self._engines = engines
        self._scheduler = scheduler
        # A lone replica is the application's only decider: it places turns
        # itself, from the global scheduler's loads (one Ray call per turn
        # less); several replicas ask the global scheduler.
        placement = (
            InIngress(scheduler, dispatch, metrics=metrics)
            if sole_replica
            else ViaScheduler(scheduler)
        )
        self._services = TurnServices(
            {iid: EngineFeed(iid, handle) for iid, handle in engines.items()},
            placement,
            self._frontend.tokenizer,
            self._frontend.closing,
            settings.max_model_len,
            settings.block_size,
        )
        self._store = make_state_store(state_store.get("url"), state_store["session_ttl_s"])
        self.metrics = IngressMetrics(engine_policy) if metrics else None
        self._background: set[asyncio.Task[None]] = set()
        freeze_startup_heap()

    # ------------------------------------------------------------ endpoints
    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self) -> dict[str, Any]:
        loads = await asyncio.wait_for(self._scheduler.loads.remote(), ENGINE_CALL_TIMEOUT_S)
        healthy = [load["instance_id"] for load in loads if load["healthy"]]
        if not healthy:
            raise ApiError(503, "no engine instance is ready", kind="service_unavailable")
        draining = [load["instance_id"] for load in loads if not load.get("accepting", True)]
        return {"status": "ready", "instances": healthy, "draining": draining}

    @app.get("/v1/models")
    async def models(self):
        return (await self._frontend.models.show_available_models()).model_dump()

    @app.post("/v1/chat/completions")
    async def chat(self, body: ChatCompletionRequest, raw: Request):
        return await self._serve(body, raw, chat=True)

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, raw: Request):
        return await self._serve(body, raw, chat=False)

    @app.post("/tokenize")
    async def tokenize(self, body: TokenizeChatRequest | TokenizeCompletionRequest, raw: Request):
        return _plain(await self._frontend.tokenization.create_tokenize(body, raw))

    @app.post("/detokenize")
    async def detokenize(self, body: DetokenizeRequest, raw: Request):
        return _plain(await self._frontend.tokenization.create_detokenize(body, raw))

    @app.get("/v1/sessions/{session_id}")
    async def get_session(self, session_id: str) -> dict[str, Any]:
        record = await self._record(session_id)
        engine: dict[str, Any] | None = None
        try:
            call = self._engines[record.instance_id].session_info.remote(session_id)
            info = await asyncio.wait_for(call, ENGINE_CALL_TIMEOUT_S)
            engine = _engine_view(info)
        except KeyError:
            engine = None  # the engine holds nothing for it (restarted, or never ran it)
        except Exception as exc:
            engine = {"error": repr(exc)}
        return {
            "session_id": session_id,
            "instance_id": record.instance_id,
            "state": record.state.value,
            "tokens": record.tokens,
            "messages": len(record.messages),
            "turns": record.turns,
            "last_turn": record.last_turn,
            "strategy": engine.get("strategy") if engine else None,
            "engine": engine,
        }

    @app.post("/v1/sessions/{session_id}/migrate")
    async def migrate_session(self, session_id: str, body: MigrateSessionRequest) -> dict[str, Any]:
        """Move a session, KV and all, to another instance: a paused one
        (`cluster.migration`; its next turn runs there), or one whose turn
        is generating, while its client's stream goes on
        (`cluster.live_migration`)."""
        self._check_instance(body.instance_id, status=400)
        record = await self._record(session_id)
        if record.state is SessionState.GENERATING:
            migration = await move_running_turn(
                record, body.instance_id, self._engines, reason=OPERATOR_MIGRATION
            )
        else:
            migration = await migrate_paused_session(
                record, body.instance_id, self._store, self._engines, reason=OPERATOR_MIGRATION
            )
        if self.metrics is not None:
            self.metrics.observe_migration(migration, OPERATOR_MIGRATION)
        status = _MIGRATION_STATUS[migration.outcome]
        if migration.live and migration.outcome is MigrationOutcome.ABORTED_SOURCE:
            status = 409  # the turn ended before it could move: it is paused now
        if status == 409:
            raise ApiError(409, migration.reason, kind="conflict_error", param="session_id")
        if status == 503:
            raise unavailable(f"session {session_id!r} did not move: {migration.reason}")
        return {"migration": migration.as_json()}

    @app.get("/v1/instances")
    async def instances(self) -> dict[str, Any]:
        """Every engine instance, where it runs and its load; one that does
        not answer within `ENGINE_CALL_TIMEOUT_S` is listed with its error."""
        ids = sorted(self._engines)
        calls = [
            asyncio.wait_for(self._engines[i].describe.remote(), ENGINE_CALL_TIMEOUT_S) for i in ids
        ]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        listed = []
        for instance_id, answer in zip(ids, answers, strict=True):
            if isinstance(answer, BaseException):
                listed.append({"instance_id": instance_id, "healthy": False, "error": repr(answer)})
            else:
                listed.append({**answer, "healthy": True})
        return {"instances": listed}

    @app.post("/v1/instances/{instance_id}/drain")
    async def drain_instance(self, instance_id: str) -> dict[str, Any]:
        """One round of draining an instance: no new session goes there, and
        the sessions paused on it move to the others (`cluster.migration`).
        Repeat until `drained` (turns running now pause there first)."""
        self._check_instance(instance_id, status=404)
        try:
            drain = await drain_instance(
                instance_id,
                self._store,
                self._engines,
                self._instance_loads,
            )
        except NoInstanceAvailable as exc:
            raise ApiError(409, str(exc), kind="conflict_error", param="instance_id") from None
        if self.metrics is not None:
            for migration in drain.migrations:
                self.metrics.observe_migration(migration, DRAIN)
        return drain.as_json()

    @app.delete("/v1/instances/{instance_id}/drain")
    async def undrain_instance(self, instance_id: str) -> dict[str, Any]:
        """The instance takes new sessions again."""
        self._check_instance(instance_id, status=404)
        await asyncio.wait_for(self._engines[instance_id].undrain.remote(), ENGINE_CALL_TIMEOUT_S)
        return {"instance_id": instance_id, "accepting": True}

    def _check_instance(self, instance_id: str, *, status: int) -> None:
        """An instance id named by the client: one of this application's,
        or a `status` error naming the field and the known ids."""
        if instance_id not in self._engines:
            known = ", ".join(sorted(self._engines))
            raise ApiError(
                status,
                f"instance_id {instance_id!r} is not an instance of this application ({known})",
                kind="invalid_request_error" if status == 400 else "not_found_error",
                param="instance_id",
            )

    async def _instance_loads(self) -> list[InstanceLoad]:
        loads = await asyncio.wait_for(self._scheduler.loads.remote(), ENGINE_CALL_TIMEOUT_S)
        return [InstanceLoad(**load) for load in loads]

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(self, session_id: str) -> dict[str, Any]:
        record = await self._record(session_id)
        await asyncio.to_thread(self._store.delete_session, session_id)
        self._end_on_engine(record.instance_id, session_id)
        return {"session_id": session_id, "deleted": True}

    # --------------------------------------------------------------- turns
    async def _serve(self, body: Any, raw: Request, *, chat: bool):
        mars = _mars_extension(body, chat=chat)
        session_id = _session_id(raw, body)
        if chat and self._server_tools.offered(body):
            return await self._server_tools.serve(await raw.json(), body, session_id, mars)
        turn, result = await self._run_turn(body, session_id, mars, chat=chat)
        if isinstance(result, AsyncIterator):
            return StreamingResponse(self._relay(turn, result), media_type="text/event-stream")
        return await self._respond(turn, result)

    async def _run_turn(
        self, body: Any, session_id: str | None, mars: MarsExtension, *, chat: bool
    ) -> tuple[Turn, Any]:
        """One turn through vLLM's serving layer: (the turn, vLLM's result:
        a response, an error response, or a stream to relay)."""
        turn = await self._begin(body, session_id, mars, chat=chat)
        serving = self._frontend.chat if chat else self._frontend.completion
        body.request_id = turn.key
        body.session_id = session_id
        self._frontend.turns.add(turn.key, turn)
        try:
            if chat:
                result = await serving.create_chat_completion(body, None)
            else:
                result = await serving.create_completion(body, None)
        except EngineUnavailable as exc:
            self._frontend.turns.remove(turn.key)
            await self._roll_back(turn)
            raise unavailable(str(exc)) from None
        except BaseException:
            self._frontend.turns.remove(turn.key)
            await self._roll_back(turn)
            raise
        if not isinstance(result, AsyncIterator):
            self._frontend.turns.remove(turn.key)
        return turn, result

    def _end_own_session(self, session_id: str, turn: Turn | None) -> None:
        """End a session the ingress opened for one response: its record and
        its KV, in the background (the response does not wait for them)."""

        async def forget() -> None:
            with contextlib.suppress(UnknownSession):
                await asyncio.to_thread(self._store.delete_session, session_id)

        self._in_background(forget())
        if turn is not None and turn.instance_id is not None:
            self._end_on_engine(turn.instance_id, session_id)

    async def _begin(
        self, body: Any, session_id: str | None, mars: MarsExtension, *, chat: bool
    ) -> Turn:
        """Start the turn; for a session, move its record to GENERATING (a
        new session's record is created), or answer 409."""
        started = time.monotonic()
        key = uuid.uuid4().hex
        hints = SegmentHints(tool=mars.tool, api_s=mars.expected_api_s, final=mars.close)
        record = None
        if session_id is not None:
            _check_session_request(body, chat=chat)
            record = await self._start_session_turn(session_id, key)
        turn = Turn(key, session_id, record, chat, mars.close, hints, self._services, started)
        if session_id is not None:
            turn.phases_s["record_start"] = time.monotonic() - started
        return turn

    async def _start_session_turn(self, session_id: str, key: str) -> SessionRecord | None:
        """The record as this turn found it (None for a new session)."""
        try:
            try:
                record = await asyncio.to_thread(
                    self._store.transition, session_id, SessionEvent.TURN_STARTED, key
                )
            except UnknownSession:
                fresh = SessionRecord(session_id, instance_id="", turn_id=key)
                await asyncio.to_thread(self._store.start_turn, fresh)
                return None
        except SessionConflict as exc:
            logger.warning("turn refused session=%s request=%s: %s", session_id, key, exc)
            raise ApiError(409, str(exc), kind="conflict_error", param="session_id") from None
        return record

    async def _respond(self, turn: Turn, result: Any) -> Response:
        """A non-streamed response: an error (the record rolled back), or the
        completion (the record committed first: the session's next turn
        must find it)."""
        reply = await self._settle(turn, result)
        if isinstance(reply, Response):
            return reply
        response = JSONResponse(reply)
        response.headers["Server-Timing"] = _server_timing(turn)
        response.background = BackgroundTask(self._record_metrics, turn)
        return response

    async def _settle(self, turn: Turn, result: Any) -> dict[str, Any] | Response:
        """The turn's reply with our fields, its record committed; or vLLM's
        error response, its record rolled back."""
        if not hasattr(result, "choices"):  # vLLM's ErrorResponse
            await self._roll_back(turn)
            return JSONResponse(result.model_dump(), status_code=result.error.code)
        body = result.model_dump()
        if turn.end is None:  # no engine output: nothing to commit
            await self._roll_back(turn)
            raise unavailable("the engine returned no end of turn")
        assistant = body["choices"][0].get("message") if turn.chat else None
        await self._commit(turn, assistant)
        if turn.session_id is not None:
            body["session_id"] = turn.session_id
        body["mars"] = turn.mars_field()
        return body

    async def _relay(
        self,
        turn: Turn,
        chunks: AsyncIterator[str],
        amend: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> AsyncGenerator[str, None]:
        """vLLM's SSE stream, passed through; the turn's message is assembled
        from its deltas. The record is committed as soon as the engine has
        ended the turn, before the chunk with its finish reason goes out: a
        client that stops reading there (before `[DONE]`) still finds the
        turn in the record. A session's `mars` chunk (`amend`ed, if given)
        goes just before `[DONE]`."""
        message = sse.StreamedMessage()
        settled = committed = False
        try:
            async for chunk in chunks:
                if sse.is_done(chunk):
                    if not settled:  # no finish reason came after the turn's end
                        settled, committed = True, turn.end is not None and turn.failure is None
                        await self._settle_stream(turn, message, committed=committed)
                    if committed and turn.session_id is not None:
                        fields = {"id": f"mars-{turn.key}", "choices": [], **_extras(turn)}
                        yield sse.event(amend(fields) if amend else fields)
                    yield chunk
                    continue
                if turn.failure is not None and not settled:
                    # vLLM's in-band error event: the record goes back before
                    # the client, who may retry at once, hears of it.
                    settled = True
                    await self._roll_back(turn)
                payload = sse.parse(chunk)
                message.feed(payload)
                if not settled and turn.end is not None and sse.finishes(payload):
                    settled = committed = True
                    await self._settle_stream(turn, message, committed=True)
                yield chunk
        finally:
            self._frontend.turns.remove(turn.key)
            if not settled:  # the client left: the record stays as before the turn
                self._in_background(self._roll_back(turn))
        self._record_metrics(turn)

    async def _settle_stream(
        self, turn: Turn, message: sse.StreamedMessage, *, committed: bool
    ) -> None:
        """Commit a streamed turn with the message it delivered, or roll it back."""
        if committed:
            await self._commit(turn, message.message() if turn.chat else None)
        else:
            await self._roll_back(turn)

    async def _commit(self, turn: Turn, assistant: dict[str, Any] | None) -> None:
        if turn.session_id is None:
            return
        started = time.monotonic()
        try:
            if turn.close:
                await asyncio.to_thread(self._store.delete_session, turn.session_id)
                return
            await asyncio.to_thread(
                self._store.transition,
                turn.session_id,
                SessionEvent.TURN_ENDED,
                turn.key,
                turn.record_change(assistant),
            )
        except (UnknownSession, SessionConflict) as exc:
            # Deleted (or expired) while the turn ran: the answer still goes out.
            logger.warning(
                "turn not recorded session=%s request=%s: %r", turn.session_id, turn.key, exc
            )
        finally:
            turn.phases_s["record_commit"] = time.monotonic() - started

    async def _roll_back(self, turn: Turn) -> None:
        """The turn produced no response: the session's record goes back to
        PAUSED with the context it had (a new session's empty record goes)."""
        if turn.session_id is None:
            return
        try:
            record = await asyncio.to_thread(
                self._store.transition, turn.session_id, SessionEvent.TURN_FAILED, turn.key
            )
            if record.tokens == 0:
                await asyncio.to_thread(self._store.delete_session, turn.session_id)
            logger.warning(
                "turn left unfinished session=%s request=%s instance=%s: record kept at %d tokens",
                turn.session_id,
                turn.key,
                turn.instance_id,
                record.tokens,
            )
        except (UnknownSession, SessionConflict) as exc:
            logger.warning("turn roll-back skipped session=%s: %s", turn.session_id, exc)

    def _end_on_engine(self, instance_id: str, session_id: str) -> None:
        """Release an ended session's KV on its engine, in the background (an
        engine that does not answer ends it at its idle sweep)."""

        async def end() -> None:
            try:
                call = self._engines[instance_id].end_session.remote(session_id)
                await asyncio.wait_for(call, ENGINE_CALL_TIMEOUT_S)
            except Exception as exc:
                logger.warning("ending session=%s on %s failed: %r", session_id, instance_id, exc)

        if instance_id in self._engines:
            self._in_background(end())

    def _in_background(self, work) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _record_metrics(self, turn: Turn) -> None:
        """The turn's metrics and end-of-turn log line, off the response path."""
        tokens = len(turn.end.output_token_ids) if turn.end else 0
        timing = TurnTiming(turn.started_s, turn.first_token_s, time.monotonic(), tokens)
        if self.metrics is not None and turn.instance_id is not None:
            self.metrics.observe_turn(turn.instance_id, timing)
        logger.info(
            "turn end session=%s request=%s instance=%s finish=%s completion_tokens=%d "
            "cached_tokens=%s ttft_s=%s e2e_s=%.3f",
            turn.session_id,
            turn.key,
            turn.instance_id,
            turn.end.finish_reason if turn.end else "-",
            tokens,
            turn.end.kv.cached_tokens if turn.end else "-",
            "-" if timing.ttft_s is None else f"{timing.ttft_s:.3f}",
            timing.e2e_s,
        )

    async def _record(self, session_id: str) -> SessionRecord:
        try:
            return await asyncio.to_thread(self._store.get_session, session_id)
        except UnknownSession:
            raise ApiError(
                404, f"session {session_id!r} not found", kind="not_found_error", param="session_id"
            ) from None


def _mars_extension(body: Any, *, chat: bool) -> MarsExtension:
    """Our `mars` field, and a 400 for any field neither vLLM nor we honour."""
    extra = dict(body.model_extra or {})
    raw = extra.pop("mars", None)
    refused = unsupported_fields(body, extra, chat=chat)
    if refused:
        names = ", ".join(sorted(refused))
        raise ApiError(
            400,
            f"unsupported field(s): {names} (mars-serve honours vLLM's OpenAI fields and `mars`)",
            kind="invalid_request_error",
            param=sorted(refused)[0],
        )
    try:
        return MarsExtension.model_validate(raw or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(["mars", *(str(p) for p in first["loc"])])
        raise ApiError(
            400, f"{param}: {first['msg']}", kind="invalid_request_error", param=param
        ) from None


def _session_id(raw: Request, body: Any) -> str | None:
    header = raw.headers.get("x-session-id")
    if header and body.session_id and header != body.session_id:
        raise ApiError(
            400,
            f"X-Session-Id {header!r} and session_id {body.session_id!r} differ",
            kind="invalid_request_error",
            param="session_id",
        )
    named = header or body.session_id
    if named is not None and not 0 < len(named) <= 200:
        raise ApiError(
            400,
            "session_id must be 1 to 200 characters",
            kind="invalid_request_error",
            param="session_id",
        )
    return named


def _check_session_request(body: Any, *, chat: bool) -> None:
    """A session turn continues one conversation: fields that would make it
    several, or cut its context, are refused by name."""
    problems = []
    if (body.n or 1) != 1:
        problems.append(("n", f"n is {body.n}: a session turn continues one conversation"))
    if getattr(body, "use_beam_search", False):
        problems.append(("use_beam_search", "beam search is not served in sessions"))
    if body.truncate_prompt_tokens is not None:
        problems.append(("truncate_prompt_tokens", "a session's context is never truncated"))
    if chat and (body.continue_final_message or not body.add_generation_prompt):
        problems.append(
            ("add_generation_prompt", "a session turn ends with the assistant's new message")
        )
    if not chat and not isinstance(body.prompt, str) and _is_batch(body.prompt):
        problems.append(("prompt", "a session turn takes one prompt, not a batch"))
    if problems:
        param, message = problems[0]
        raise ApiError(400, f"{param}: {message}", kind="invalid_request_error", param=param)


def _is_batch(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)


def _extras(turn: Turn) -> dict[str, Any]:
    extras: dict[str, Any] = {"mars": turn.mars_field()}
    if turn.session_id is not None:
        extras["session_id"] = turn.session_id
    return extras


def _engine_view(info: Any) -> dict[str, Any]:
    return {
        "phase": info.phase.value,
        "strategy": info.strategy.value if info.strategy else None,
        "kv_tokens": info.kv_tokens,
        "turns": info.turns,
        "recomputed_tokens": info.recomputed_tokens,
        "swapped_out_tokens": info.swapped_out_tokens,
        "swapped_in_tokens": info.swapped_in_tokens,
        "timeline": [
            {"t": e.t, "event": e.event, "strategy": e.strategy.value if e.strategy else None}
            for e in info.timeline
        ],
    }


def _plain(result: Any) -> JSONResponse:
    if hasattr(result, "error"):
        return JSONResponse(result.model_dump(), status_code=result.error.code)
    return JSONResponse(result.model_dump())


def _server_timing(turn: Turn) -> str:
    """A W3C `Server-Timing` header (milliseconds): the time in this ingress,
    the part of it spent awaiting the engine's events, and the engine's
    own time on the turn."""
    ingress_s = time.monotonic() - turn.started_s
    engine_s = turn.end.engine_s if turn.end else 0.0
    parts = {"ingress": ingress_s, "engine_call": turn.engine_wait_s, "engine": engine_s}
    return ", ".join(f"{name};dur={seconds * 1000:.3f}" for name, seconds in parts.items())
