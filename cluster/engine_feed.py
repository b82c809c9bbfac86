"""The ingress's one stream of turn events from one engine instance.

An ingress replica runs many turns on each engine instance at once. Each
engine step produces an event for every one of them; a Ray stream per turn
made that a message per turn per step, each serialized on its own on both
sides (`bench.profile_serving` measured it as most of a decode step at a
batch of 32). Instead, each ingress replica keeps one subscription per
instance (`EngineInstance.subscribe`) and starts its turns on it
(`EngineInstance.start_turn`): a step's events of all its turns arrive as
one message, and the feed's pump hands each turn its own.

A feed that breaks (the replica died, the stream ended) ends every turn on
it with the error, and the next turn opens a new one.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from dataclasses import dataclass
from typing import Any

from cluster.logs import serve_logger
from workers.turns import TurnEnd, TurnEvent, TurnRequest

logger = serve_logger(__name__)

FEED_CALL_TIMEOUT_S = 30.0
"""Timeout of opening a feed and of starting a turn on one (both return at
once on a live engine: a turn's queueing happens after its start)."""

_subscriber_ids = itertools.count()


@dataclass(frozen=True)
class FeedBroken:
    """Put in a turn's queue when its feed broke: the turn has ended with `error`."""

    error: BaseException


class EngineFeed:
    """One engine instance's feed, for the ingress replica that created it."""

    def __init__(self, instance_id: str, engine: Any) -> None:
        self.instance_id = instance_id
        self._engine = engine
        self._subscriber = f"ingress-{uuid.uuid4().hex[:12]}-{next(_subscriber_ids)}"
        self._turns: dict[str, asyncio.Queue[TurnEvent | FeedBroken]] = {}
        self._pump: asyncio.Task[None] | None = None
        self._opening = asyncio.Lock()

    async def start(self, turn: TurnRequest) -> asyncio.Queue[TurnEvent | FeedBroken]:
        """Start `turn` on the instance; return the queue its events arrive
        in, ending with its `TurnEnd` or a `FeedBroken`. Raises what the
        engine raised on the turn's input, or the failure to reach it."""
        await self._open()
        events: asyncio.Queue[TurnEvent | FeedBroken] = asyncio.Queue()
        self._turns[turn.request_id] = events
        try:
            call = self._engine.start_turn.remote(turn, self._subscriber)
            await asyncio.wait_for(call, FEED_CALL_TIMEOUT_S)
        except BaseException:
            self._turns.pop(turn.request_id, None)
            raise
        if self._pump is None or self._pump.done():  # it broke meanwhile
            self.abort(turn.request_id)
            raise ConnectionError(f"the feed of engine instance {self.instance_id} broke")
        return events

    def abort(self, request_id: str) -> None:
        """Stop a turn that has not ended (its client left); its session's
        KV is kept. The engine is told in the background."""
        if self._turns.pop(request_id, None) is None:
            return
        task = asyncio.get_running_loop().create_task(self._abort_on_engine(request_id))
        task.add_done_callback(_log_failure)

    async def _abort_on_engine(self, request_id: str) -> None:
        await asyncio.wait_for(self._engine.abort_turn.remote(request_id), FEED_CALL_TIMEOUT_S)

    async def _open(self) -> None:
        async with self._opening:
            if self._pump is not None and not self._pump.done():
                return
            stream = self._engine.options(stream=True).subscribe.remote(self._subscriber)
            async with asyncio.timeout(FEED_CALL_TIMEOUT_S):
                await anext(stream)  # the empty batch: the feed is open
            self._pump = asyncio.get_running_loop().create_task(self._run(stream))

    async def _run(self, stream: Any) -> None:
        """Hand each event to its turn, until the feed breaks."""
        error: BaseException = ConnectionError(
            f"the feed of engine instance {self.instance_id} ended"
        )
        try:
            async for batch in stream:
                for event in batch:
                    self._hand(event)
                # Ray hands over a batch that was already waiting without
                # giving the event loop a turn: the turns read theirs now.
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
        logger.warning("feed broke instance=%s: %r", self.instance_id, error)
        broken, self._turns = self._turns, {}
        for events in broken.values():
            events.put_nowait(FeedBroken(error))

    def _hand(self, event: TurnEvent) -> None:
        if isinstance(event, TurnEnd):
            events = self._turns.pop(event.request_id, None)
        else:
            events = self._turns.get(event.output.request_id)
        if events is not None:
            events.put_nowait(event)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("abort of a turn on its engine failed: %r", task.exception())
