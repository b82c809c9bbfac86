"""`AsyncMarsEngine`: a `MarsEngine` on its own thread, for asyncio servers.

vLLM's in-process engine is driven by one thread, which owns every vLLM
object; callers on the event loop send it commands and receive each
session's tokens through an asyncio queue. The HTTP layer (and a Ray Serve
replica) sits on top of this class and never touches the engine directly.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from workers.engine import AugmentedRequest, EngineConfig, MarsEngine, Session, SessionState
from workers.hints import SegmentHints
from workers.tools import ToolRegistry

logger = logging.getLogger(__name__)
_T = TypeVar("_T")


@dataclass(frozen=True)
class TokenDelta:
    token_ids: list[int]


@dataclass(frozen=True)
class ChunkEnd:
    """The chunk (one generate-until-pause segment) is over."""

    finish_reason: str
    state: SessionState
    token_ids: list[int]
    """All tokens of the chunk."""


@dataclass(frozen=True)
class EngineFailed:
    reason: str


Event = TokenDelta | ChunkEnd | EngineFailed


class AsyncMarsEngine:
    """See the module docstring. Each caller's events reach it on the event
    loop it awaited from."""

    def __init__(self, config: EngineConfig, tools: ToolRegistry | None = None) -> None:
        self._commands: queue.SimpleQueue[Callable[[MarsEngine], None]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Event]]] = {}
        self._stopping = threading.Event()
        self._failure: BaseException | None = None
        self._ready: Future[None] = Future()
        self._thread = threading.Thread(
            target=self._drive, args=(config, tools), name="mars-engine", daemon=True
        )
        self._thread.start()

    async def ready(self) -> None:
        """Wait until the engine has started (raises what start-up raised)."""
        await asyncio.wrap_future(self._ready)

    def wait_started(self, timeout_s: float | None = None) -> None:
        """Block until the engine has started (for constructors that may block)."""
        self._ready.result(timeout=timeout_s)

    # ------------------------------------------------------------- commands
    async def call(self, fn: Callable[[MarsEngine], _T]) -> _T:
        """Run `fn(engine)` on the engine thread and return its result."""
        if self._failure is not None or not self._thread.is_alive():
            raise RuntimeError(f"the MARS engine has stopped ({self._failure!r})")
        future: Future[_T] = Future()

        def command(engine: MarsEngine) -> None:
            # A caller that gave up (its request cancelled, a timeout) has
            # cancelled the future: skip the command. Setting a result on a
            # cancelled future raises, which would stop the engine thread
            # and fail every session on it. Once running, it cannot be cancelled.
            if not future.set_running_or_notify_cancel():
                return
            try:
                result = fn(engine)
            except BaseException as exc:  # handed to the caller, never lost
                future.set_exception(exc)
            else:
                future.set_result(result)

        self._commands.put(command)
        return await asyncio.wrap_future(future)

    async def generate(
        self,
        session_id: str,
        token_ids: Sequence[int],
        max_tokens: int,
        *,
        hints: SegmentHints | None = None,
        stop_token_ids: Sequence[int] = (),
        close: bool = False,
    ) -> AsyncIterator[Event]:
        """Run one chunk of a client-driven session, opening the session if it
        is new and resuming it if it is paused; yields token deltas, then the
        `ChunkEnd`.

        With `close`, the chunk is the session's last: the engine closes the
        session (frees its KV) itself as soon as the chunk ends, without the
        caller waiting for it or sending a separate `close` (a one-turn
        request then costs one call, not two), and even if the caller has
        left (a cancelled request, a client gone) before the chunk ended.
        """
        stream: asyncio.Queue[Event] = asyncio.Queue()
        if session_id in self._streams:
            raise ValueError(f"session {session_id!r} already has a chunk running")
        self._streams[session_id] = (asyncio.get_running_loop(), stream)

        def start(engine: MarsEngine) -> None:
            args = (session_id, token_ids, max_tokens, hints, stop_token_ids)
            if session_id in engine.sessions:
                engine.continue_session(*args, last_chunk=close)
            else:
                engine.open_session(*args, last_chunk=close)

        try:
            await self.call(start)
            while True:
                event = await stream.get()
                if isinstance(event, EngineFailed):
                    raise RuntimeError(f"the MARS engine failed: {event.reason}")
                yield event
                if isinstance(event, ChunkEnd):
                    return
        finally:
            self._streams.pop(session_id, None)

    async def run_plan(self, request: AugmentedRequest) -> Session:
        """Run a session whose tools execute server-side; return it when finished."""
        stream: asyncio.Queue[Event] = asyncio.Queue()
        if request.request_id in self._streams:
            raise ValueError(f"session {request.request_id!r} already has a chunk running")
        self._streams[request.request_id] = (asyncio.get_running_loop(), stream)
        try:
            session = await self.call(lambda engine: engine.submit(request))
            while session.state is not SessionState.FINISHED:
                event = await stream.get()
                if isinstance(event, EngineFailed):
                    raise RuntimeError(f"the MARS engine failed: {event.reason}")
                if isinstance(event, ChunkEnd) and event.state is SessionState.FINISHED:
                    break
            return session
        finally:
            self._streams.pop(request.request_id, None)

    async def close(self, session_id: str) -> None:
        await self.call(lambda engine: engine.close_session(session_id))

    @property
    def alive(self) -> bool:
        """False once the engine thread has stopped (start-up failure, crash, shutdown)."""
        return self._thread.is_alive()

    def shutdown(self) -> None:
        self._stopping.set()
        self._commands.put(_wake_up)  # an idle engine thread blocks on the queue
        self._thread.join(timeout=30)

    # --------------------------------------------------------- engine thread
    def _drive(self, config: EngineConfig, tools: ToolRegistry | None) -> None:
        try:
            engine = MarsEngine(config, tools)
        except BaseException as exc:
            self._ready.set_exception(exc)
            return
        engine.listeners.append(self._forward)
        self._ready.set_result(None)
        try:
            while not self._stopping.is_set():
                self._run_commands(engine, block=not engine.has_work())
                if engine.has_work():
                    engine.step()
        except BaseException as exc:
            logger.exception("MARS engine thread failed; failing every open stream")
            self._failure = exc
            for loop, stream in list(self._streams.values()):
                loop.call_soon_threadsafe(stream.put_nowait, EngineFailed(repr(exc)))
        finally:
            engine.shutdown()

    def _run_commands(self, engine: MarsEngine, *, block: bool) -> None:
        """Run the queued commands; with `block` (nothing to step), sleep until
        one arrives: an idle engine thread takes no CPU and no GIL turns from
        the replica's event loop."""
        command = self._commands.get() if block else None
        while command is not None:
            command(engine)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                command = None

    def _forward(self, session: Session, token_ids: list[int], finish_reason: str | None) -> None:
        """Engine-thread listener: hand each output to the session's stream."""
        target = self._streams.get(session.session_id)
        if target is None:
            return
        loop, stream = target
        events: list[Event] = [TokenDelta(token_ids)] if token_ids else []
        if finish_reason is not None:
            events.append(ChunkEnd(finish_reason, session.state, list(session.outputs[-1])))
        for event in events:
            loop.call_soon_threadsafe(stream.put_nowait, event)


def _wake_up(engine: MarsEngine) -> None:
    """The no-op command `shutdown` sends, so that an idle engine thread sees
    that it is stopping."""
