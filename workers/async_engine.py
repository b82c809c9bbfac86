"""`AsyncMarsEngine`: a `MarsEngine` on its own thread, for asyncio servers.

vLLM's in-process engine is driven by one thread, which owns every vLLM
object; callers on the event loop send it commands and receive each turn's
events through an asyncio queue. The Ray Serve replica sits on top of this
class and never touches the engine directly.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from workers.engine import AugmentedRequest, EngineConfig, MarsEngine, PlanSession, PlanState
from workers.tools import ToolRegistry
from workers.turns import TurnEnd, TurnEvent, TurnRequest

logger = logging.getLogger(__name__)
_T = TypeVar("_T")


class EngineStopped(RuntimeError):
    """The engine thread has stopped (start-up failure, crash, shutdown):
    nothing on this instance can run any more."""


@dataclass(frozen=True)
class _Failed:
    reason: str


class AsyncMarsEngine:
    """See the module docstring. Each caller's events reach it on the event
    loop it awaited from."""

    def __init__(self, config: EngineConfig, tools: ToolRegistry | None = None) -> None:
        self._commands: queue.SimpleQueue[Callable[[MarsEngine], None]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._plans: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
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
            raise EngineStopped(f"the MARS engine has stopped ({self._failure!r})")
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

    async def generate(self, turn: TurnRequest) -> AsyncIterator[list[TurnEvent]]:
        """Run one turn; yield its outputs, then its `TurnEnd`, in batches:
        each batch is every event that was ready when the caller asked for
        more (one, when the caller keeps up with the engine; several steps'
        worth, when it does not: then they travel on as one message). A
        caller that stops iterating (its client left) aborts the turn."""
        stream: asyncio.Queue = asyncio.Queue()
        if turn.request_id in self._streams:
            raise ValueError(f"request_id {turn.request_id!r} is already running")
        self._streams[turn.request_id] = (asyncio.get_running_loop(), stream)
        ended = False
        try:
            await self.call(lambda engine: engine.add_turn(turn))
            while not ended:
                batch = [await stream.get()]
                while not stream.empty():
                    batch.append(stream.get_nowait())
                for event in batch:
                    if isinstance(event, _Failed):
                        raise EngineStopped(f"the MARS engine failed: {event.reason}")
                ended = isinstance(batch[-1], TurnEnd)
                yield batch
        finally:
            self._streams.pop(turn.request_id, None)
            if not ended and self._failure is None and self._thread.is_alive():
                self._commands.put(lambda engine: engine.abort_turn(turn.request_id))

    async def run_plan(self, request: AugmentedRequest) -> PlanSession:
        """Run a session whose tools execute server-side; return it when finished."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[PlanSession] = loop.create_future()
        self._plans[request.request_id] = (loop, done)
        try:
            await self.call(lambda engine: engine.submit(request))
            return await done
        finally:
            self._plans.pop(request.request_id, None)

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
        self._ready.set_result(None)
        try:
            while not self._stopping.is_set():
                self._run_commands(engine, block=not engine.has_work())
                if engine.has_work():
                    self._forward(engine.step())
                    self._settle_plans(engine)
        except BaseException as exc:
            logger.exception("MARS engine thread failed; failing every open stream")
            self._failure = exc
            for loop, stream in list(self._streams.values()):
                loop.call_soon_threadsafe(stream.put_nowait, _Failed(repr(exc)))
            for loop, done in list(self._plans.values()):
                loop.call_soon_threadsafe(_fail, done, EngineStopped(repr(exc)))
        finally:
            engine.shutdown()

    def _run_commands(self, engine: MarsEngine, *, block: bool) -> None:
        """Run the queued commands (between two steps of a busy engine: a new
        turn joins the running batch at the next step); with `block`
        (nothing to step), sleep until one arrives: an idle engine thread
        takes no CPU and no GIL turns from the replica's event loop."""
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return
            command(engine)
            block = False

    def _forward(self, events: list[TurnEvent]) -> None:
        """Hand each event to its turn's stream, on its caller's loop: one
        wake-up of each loop per step, however many turns it streams."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, TurnEvent]]] = {}
        for event in events:
            request_id = event.request_id if isinstance(event, TurnEnd) else event.output.request_id
            target = self._streams.get(request_id)
            if target is not None:
                loop, stream = target
                by_loop.setdefault(loop, []).append((stream, event))
        for loop, deliveries in by_loop.items():
            loop.call_soon_threadsafe(_deliver, deliveries)

    def _settle_plans(self, engine: MarsEngine) -> None:
        for session_id, (loop, done) in list(self._plans.items()):
            session = engine.plans.get(session_id)
            if session is not None and session.state is PlanState.FINISHED:
                del self._plans[session_id]
                loop.call_soon_threadsafe(_resolve, done, session)


def _deliver(deliveries: list[tuple[asyncio.Queue, TurnEvent]]) -> None:
    for stream, event in deliveries:
        stream.put_nowait(event)


def _resolve(done: asyncio.Future, value: object) -> None:
    if not done.done():
        done.set_result(value)


def _fail(done: asyncio.Future, exc: BaseException) -> None:
    if not done.done():
        done.set_exception(exc)


def _wake_up(engine: MarsEngine) -> None:
    """The no-op command `shutdown` sends, so that an idle engine thread sees
    that it is stopping."""
