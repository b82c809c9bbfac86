"""`AsyncMarsEngine`: a `MarsEngine` on its own thread, for asyncio servers.

vLLM's in-process engine is driven by one thread, which owns every vLLM
object; callers on the event loop send it commands and receive each turn's
events through a `TurnFeed`: an asyncio queue that one turn or many share.
A feed shared by many turns gets each engine step's events of all of them
as one item (one wake-up of its loop per step, one message on for a caller
that relays them). The Ray Serve replica sits on top of this class and
never touches the engine directly.
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
from workers.turns import TurnEnd, TurnEvent, TurnMoved, TurnRequest

logger = logging.getLogger(__name__)
_T = TypeVar("_T")


class EngineStopped(RuntimeError):
    """The engine thread has stopped (start-up failure, crash, shutdown):
    nothing on this instance can run any more."""


@dataclass(frozen=True)
class _Failed:
    reason: str


class TurnFeed:
    """Where the engine thread delivers the events of the turns started on
    it (`AsyncMarsEngine.start`), on the event loop that created it: each
    item is one step's events of those turns, in order."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[list[TurnEvent | _Failed]] = asyncio.Queue()
        self.running: set[str] = set()
        """Request ids started on this feed whose `TurnEnd` has not been read."""

    async def next_batch(self) -> list[TurnEvent]:
        """Every event delivered since the last call (waits for one step's
        worth); raises `EngineStopped` once the engine thread has failed."""
        batch = list(await self._queue.get())
        while not self._queue.empty():
            batch.extend(self._queue.get_nowait())
        for event in batch:
            if isinstance(event, _Failed):
                raise EngineStopped(f"the MARS engine failed: {event.reason}")
            if isinstance(event, (TurnEnd, TurnMoved)):
                self.running.discard(event.request_id)
        return batch  # type: ignore[return-value]  # no _Failed left

    def _put(self, events: list[TurnEvent | _Failed]) -> None:
        self._queue.put_nowait(events)


class AsyncMarsEngine:
    """See the module docstring. Each caller's events reach it on the event
    loop it awaited from."""

    def __init__(self, config: EngineConfig, tools: ToolRegistry | None = None) -> None:
        self._commands: queue.SimpleQueue[Callable[[MarsEngine], None]] = queue.SimpleQueue()
        self._feeds: dict[str, TurnFeed] = {}
        """The feed of each running turn, by request id (the engine thread
        drops a turn's entry once it has delivered its `TurnEnd`)."""
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

    async def start(self, turn: TurnRequest, feed: TurnFeed) -> None:
        """Add `turn` to the engine; its events go to `feed`. Raises what the
        engine raised on the turn's input (a `ValueError` for a bad one)."""
        if turn.request_id in self._feeds:
            raise ValueError(f"request_id {turn.request_id!r} is already running")
        self._feeds[turn.request_id] = feed
        feed.running.add(turn.request_id)
        try:
            await self.call(lambda engine: engine.add_turn(turn))
        except BaseException:
            self._feeds.pop(turn.request_id, None)
            feed.running.discard(turn.request_id)
            raise

    def abort(self, request_id: str) -> None:
        """Stop delivering `request_id`'s events and abort it on the engine
        (its session's KV is kept); a no-op for a turn that has ended."""
        feed = self._feeds.pop(request_id, None)
        if feed is None:
            return
        feed.running.discard(request_id)
        if self._failure is None and self._thread.is_alive():
            self._commands.put(lambda engine: engine.abort_turn(request_id))

    def hand_over(self, moved: TurnMoved) -> None:
        """End a turn that the engine stopped for a live move on its feed with
        `moved` (after its last output, which the engine delivered before it
        stopped). Raises ValueError for a turn not on a feed here."""
        feed = self._feeds.pop(moved.request_id, None)
        if feed is None:
            raise ValueError(f"request_id {moved.request_id!r} has no feed here")
        feed._put([moved])

    async def generate(self, turn: TurnRequest) -> AsyncIterator[list[TurnEvent]]:
        """Run one turn on a feed of its own; yield its outputs, then its
        `TurnEnd`, in batches: each batch is every event that was ready when
        the caller asked for more. A caller that stops iterating (its client
        left) aborts the turn."""
        feed = TurnFeed()
        await self.start(turn, feed)
        ended = False
        try:
            while not ended:
                batch = await feed.next_batch()
                ended = isinstance(batch[-1], TurnEnd)
                yield batch
        finally:
            if not ended:
                self.abort(turn.request_id)

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
            for feed in {id(f): f for f in list(self._feeds.values())}.values():
                feed.loop.call_soon_threadsafe(feed._put, [_Failed(repr(exc))])
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
        """Hand each event to its turn's feed, on the feed's loop: one
        wake-up of each loop per step, one item per feed, however many
        turns it streams."""
        by_loop: dict[asyncio.AbstractEventLoop, dict[int, tuple[TurnFeed, list[TurnEvent]]]] = {}
        for event in events:
            ended = isinstance(event, TurnEnd)
            request_id = event.request_id if ended else event.output.request_id
            feed = self._feeds.pop(request_id, None) if ended else self._feeds.get(request_id)
            if feed is not None:
                per_feed = by_loop.setdefault(feed.loop, {})
                per_feed.setdefault(id(feed), (feed, []))[1].append(event)
        for loop, per_feed in by_loop.items():
            loop.call_soon_threadsafe(_deliver, list(per_feed.values()))

    def _settle_plans(self, engine: MarsEngine) -> None:
        for session_id, (loop, done) in list(self._plans.items()):
            session = engine.plans.get(session_id)
            if session is not None and session.state is PlanState.FINISHED:
                del self._plans[session_id]
                loop.call_soon_threadsafe(_resolve, done, session)


def _deliver(deliveries: list[tuple[TurnFeed, list[TurnEvent]]]) -> None:
    for feed, events in deliveries:
        feed._put(events)


def _resolve(done: asyncio.Future, value: object) -> None:
    if not done.done():
        done.set_result(value)


def _fail(done: asyncio.Future, exc: BaseException) -> None:
    if not done.done():
        done.set_exception(exc)


def _wake_up(engine: MarsEngine) -> None:
    """The no-op command `shutdown` sends, so that an idle engine thread sees
    that it is stopping."""
