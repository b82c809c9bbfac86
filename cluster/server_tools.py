"""Tools the server runs: the rounds of one chat request that offers a tool
named in the serving config's `tools`.

A round is one session turn (`cluster.turn`): it ends as any session turn
does, its KV parked on its engine (MARS decides preserve, discard or swap
while the tool runs). When the model asks only for server-side calls, the
ingress runs them, appends the model's message and the results to the
conversation, and the next round runs, until the model answers or asks for
a call the client runs, at most `SERVER_TOOL_ROUNDS` rounds of calls. A
request without a session id runs in a session of its own, ended
afterwards. The non-streamed and the streamed response share this loop
(`_Rounds.rounds`); they differ in what the client gets of each round:

- non-streamed: the last round's response, with every call under
  `mars.server_tool_calls`;
- streamed: one SSE response across all rounds (`RoundView`): each round's
  content deltas as they come; of a round of server-side calls, neither its
  tool-call deltas nor its finish and usage chunks, but, once each call has
  run, a chunk whose `mars.server_tool_call` is the call; the last round
  streams as any stream does, its `mars` chunk with `server_tool_calls`,
  then one `[DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from cluster import sse
from cluster.errors import in_band
from cluster.logs import serve_logger
from cluster.protocol import MarsExtension
from cluster.round_view import RoundView, runs_all
from cluster.turn import Turn
from workers.tools import ToolCall, ToolRegistry

logger = serve_logger(__name__)

SERVER_TOOL_ROUNDS = 8
"""The most rounds of server-side tool calls one response runs."""
OWN_SESSION_FIELDS = ("session_id", "session_state", "history")
"""The `mars` fields a response run in a session of its own leaves out."""


@dataclass(frozen=True)
class ChatTurns:
    """What the rounds use of the ingress: one chat turn of a session, run,
    then settled (non-streamed) or relayed (streamed)."""

    run: Callable[[Any, str, MarsExtension], Awaitable[tuple[Turn, Any]]]
    """Start a turn through vLLM's serving layer: (the turn, vLLM's result:
    a response, an error response, or a stream)."""
    settle: Callable[[Turn, Any], Awaitable[dict[str, Any] | Response]]
    """A result that is not a stream: the reply, the record committed; or
    vLLM's error response, the record rolled back."""
    relay: Callable[[Turn, AsyncIterator[str], Callable[[dict], dict]], AsyncGenerator[str, None]]
    """A stream, relayed: committed once the turn ended, rolled back when it
    failed or its client left; the last argument amends the `mars` chunk."""
    end_session: Callable[[str, Turn | None], None]
    """End a session of the response's own (record and KV), in the background."""


@dataclass
class Round:
    """One round's turn, for the response to settle or relay. That sets
    `asked` to the model's message when the round is one of server-side
    calls: the loop runs them and goes on; left None, the response is over."""

    number: int
    turn: Turn
    result: Any
    may_call: bool
    """Whether the round's server-side calls may still run (rounds left)."""
    asked: dict[str, Any] | None = None


class ServerTools:
    """The serving config's tools, run inside the responses that offer them."""

    def __init__(
        self,
        registry: ToolRegistry,
        names: frozenset[str],
        *,
        next_choice: str,
        tokenizer: Any,
        turns: ChatTurns,
    ) -> None:
        self.registry, self.names, self.tokenizer, self.turns = registry, names, tokenizer, turns
        self.next_choice = next_choice
        """The tool choice after a server-side call (a required or named
        choice asked for the call it got): `auto`, or `none` without a tool
        parser."""

    def offered(self, body: Any) -> bool:
        offered = {tool.function.name for tool in body.tools or () if tool.type == "function"}
        return bool(offered & self.names)

    async def serve(
        self, data: dict[str, Any], body: Any, session_id: str | None, mars: MarsExtension
    ) -> Response:
        """The response to a chat request that offers a server-side tool;
        `data` is its JSON body (the next round's body is built from it)."""
        rounds = _Rounds(self, data, body, session_id, mars)
        return await (rounds.stream() if body.stream else rounds.respond())

    async def call(self, call: dict[str, Any]) -> dict[str, Any]:
        """Run one server-side call (a one-argument call gets its argument's
        value: a calculator's `expression`); its duration is waited here.
        Returns what `mars.server_tool_calls` lists of it."""
        function = call["function"]
        arguments = function.get("arguments") or ""
        with contextlib.suppress(ValueError, TypeError):
            parsed = json.loads(arguments)
            if isinstance(parsed, dict) and len(parsed) == 1:
                (arguments,) = (str(v) for v in parsed.values())
        started = time.monotonic()
        result = self.registry.run(ToolCall(function["name"], arguments=arguments))
        await asyncio.sleep(result.duration_s)
        text = result.text
        if text is None:
            text = self.tokenizer.decode(result.token_ids or [])
        logger.info(
            "server tool call name=%s duration_s=%.3f result_chars=%d",
            function["name"],
            time.monotonic() - started,
            len(text),
        )
        return {
            "id": call.get("id"),
            "name": function["name"],
            "arguments": function.get("arguments"),
            "result": text,
            "duration_s": round(time.monotonic() - started, 4),
        }


class _Rounds:
    """One request's rounds, its calls and its session."""

    def __init__(
        self,
        tools: ServerTools,
        data: dict[str, Any],
        body: Any,
        session_id: str | None,
        mars: MarsExtension,
    ) -> None:
        self.tools, self.turns = tools, tools.turns
        self.data, self.body, self.mars = data, body, mars
        self.own = session_id is None
        self.session_id = session_id or f"mars-tools-{uuid.uuid4().hex}"
        self.calls: list[dict[str, Any]] = []

    async def rounds(self) -> AsyncGenerator[Round | dict[str, Any], None]:
        """The loop both responses share: each round (`Round`, settled or
        relayed by the response), then each server-side call it asked for,
        as it ran. Closing it ends a session of the response's own."""
        turn: Turn | None = None
        try:
            for number in range(SERVER_TOOL_ROUNDS + 1):
                turn, result = await self.turns.run(self.body, self.session_id, self.mars)
                step = Round(number, turn, result, may_call=number < SERVER_TOOL_ROUNDS)
                yield step
                if step.asked is None:
                    return
                results = []
                for call in step.asked["tool_calls"]:
                    results.append(await self.tools.call(call))
                    self.calls.append(results[-1])
                    yield results[-1]
                self.data = _with_tool_results(
                    self.data, step.asked, results, self.tools.next_choice
                )
                self.body = type(self.body).model_validate(self.data)
        finally:
            if self.own:
                self.turns.end_session(self.session_id, turn)

    def finished(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The last round's reply, or its stream's `mars` chunk, with the
        calls; a session of the response's own is not the client's."""
        payload["mars"]["server_tool_calls"] = self.calls
        if self.own:
            payload.pop("session_id", None)
            for key in OWN_SESSION_FIELDS:
                payload["mars"].pop(key, None)
        return payload

    # ------------------------------------------------------- non-streamed
    async def respond(self) -> Response:
        """The last round's response (or the first error response)."""
        last: dict[str, Any] = {}
        async with contextlib.aclosing(self.rounds()) as rounds:
            async for step in rounds:
                if not isinstance(step, Round):
                    continue
                reply = await self.turns.settle(step.turn, step.result)
                if isinstance(reply, Response):
                    return reply
                last = reply
                message = reply["choices"][0]["message"]
                names = [call["function"]["name"] for call in message.get("tool_calls") or ()]
                if runs_all(names, self.tools.names, may_call=step.may_call):
                    step.asked = message
        return JSONResponse(self.finished(last))

    # ----------------------------------------------------------- streamed
    async def stream(self) -> Response:
        """One SSE response across the rounds. The first round runs before
        it: a request refused there gets its status (400, 409, 503) as a
        plain stream does; a later round's failure is an in-band error."""
        rounds = self.rounds()
        first = await anext(rounds)
        assert isinstance(first, Round), "the loop yields a round first"
        if not isinstance(first.result, AsyncIterator):  # vLLM's error response
            refused = await self.turns.settle(first.turn, first.result)
            await rounds.aclose()
            assert isinstance(refused, Response), "an error settles as a response"
            return refused
        return StreamingResponse(self._events(first, rounds), media_type="text/event-stream")

    async def _events(
        self, first: Round, rounds: AsyncGenerator[Round | dict[str, Any], None]
    ) -> AsyncIterator[str]:
        async with contextlib.aclosing(rounds):
            step: Round | dict[str, Any] | None = first
            last = first
            while step is not None:
                if isinstance(step, Round):
                    last = step
                    async for chunk in self._relay(step):
                        yield chunk
                else:
                    yield sse.event(_progress(last.turn, step))
                try:
                    step = await anext(rounds, None)
                except Exception as exc:  # the next round was refused before it streamed
                    logger.warning("server tool round refused session=%s: %r", self.session_id, exc)
                    yield sse.event(in_band(exc))
                    yield sse.DONE
                    return

    async def _relay(self, step: Round) -> AsyncIterator[str]:
        """What the client gets of one round (`RoundView`)."""
        turn = step.turn
        if not isinstance(step.result, AsyncIterator):  # vLLM refused the round's request
            await self.turns.settle(turn, step.result)  # the record rolled back
            yield sse.event(step.result.model_dump())
            yield sse.DONE
            return
        view = RoundView(self.tools.names, may_call=step.may_call, first=step.number == 0)
        relayed = self.turns.relay(turn, step.result, self.finished)
        async with contextlib.aclosing(relayed) as chunks:
            async for chunk in chunks:
                ended = turn.end is not None and turn.failure is None
                for out in view.take(chunk, ended=ended):
                    yield out
        if view.between:
            step.asked = view.message.message()


def _progress(turn: Turn, call: dict[str, Any]) -> dict[str, Any]:
    """The chunk that tells a streaming client a server-side call ran."""
    return {
        "id": f"chatcmpl-{turn.key}",
        "object": "chat.completion.chunk",
        "choices": [],
        "mars": {"server_tool_call": call},
    }


def _with_tool_results(
    data: dict[str, Any], message: dict[str, Any], results: list[dict], choice: str
) -> dict[str, Any]:
    """The body of the next round, from the client's own body (vLLM's model
    derives a grammar from `tool_choice` when it validates, so a validated
    request is not copied): the conversation with the model's calls and
    their results, and the tool choice `choice`."""
    call = {
        "role": "assistant",
        "content": message.get("content"),
        "tool_calls": message["tool_calls"],
    }
    answers = [{"role": "tool", "tool_call_id": r["id"], "content": r["result"]} for r in results]
    data = {key: value for key, value in data.items() if key != "mars"}
    return {**data, "messages": [*data["messages"], call, *answers], "tool_choice": choice}
