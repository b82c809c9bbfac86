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
import uuid
from dataclasses import dataclass
from typing import Any

from cluster.engine_deployment import FeedClosed
from cluster.logs import serve_logger
from workers.turns import TurnEnd, TurnEvent, TurnMoved, TurnRequest

logger = serve_logger(__name__)

FEED_CALL_TIMEOUT_S = 30.0
"""Timeout of opening a feed and of starting a turn on one (both return at
once on a live engine: a turn's queueing happens after its start)."""


@dataclass(frozen=True)
class FeedBroken:
    """Put in a turn's queue when its feed broke: the turn has ended with `error`."""

    error: BaseException


class _Subscription:
    """One open subscription stream and the turns started on it; its pump
    hands each event to its turn until the stream breaks."""

    def __init__(self, instance_id: str, stream: Any) -> None:
        self.instance_id = instance_id
        self.turns: dict[str, asyncio.Queue[TurnEvent | FeedBroken]] = {}
        self.pump = asyncio.get_running_loop().create_task(self._run(stream))

    @property
    def alive(self) -> bool:
        return not self.pump.done()

    def close(self, error: BaseException) -> None:
        """End every turn on this subscription with `error`."""
        broken, self.turns = self.turns, {}
        for events in broken.values():
            events.put_nowait(FeedBroken(error))

    async def _run(self, stream: Any) -> None:
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
        self.close(error)

    def _hand(self, event: TurnEvent) -> None:
        if isinstance(event, (TurnEnd, TurnMoved)):
            events = self.turns.pop(event.request_id, None)
        else:
            events = self.turns.get(event.output.request_id)
        if events is not None:
            events.put_nowait(event)


class EngineFeed:
    """One engine instance's feed, for the ingress replica that created it."""

    def __init__(self, instance_id: str, engine: Any) -> None:
        self.instance_id = instance_id
        self._engine = engine
        self._subscriber = f"ingress-{uuid.uuid4().hex}"
        self._subscription: _Subscription | None = None
        self._opening = asyncio.Lock()

    async def start(self, turn: TurnRequest) -> asyncio.Queue[TurnEvent | FeedBroken]:
        """Start `turn` on the instance; return the queue its events arrive
        in, ending with its `TurnEnd` or a `FeedBroken`. Raises what the
        engine raised on the turn's input, or the failure to reach it.

        A replica that restarted while the feed sat idle does not know the
        feed (its stream may not have reported the old replica's death
        yet): the feed is opened again on it, once."""
        for attempt in range(2):
            subscription = await self._open()
            events: asyncio.Queue[TurnEvent | FeedBroken] = asyncio.Queue()
            subscription.turns[turn.request_id] = events
            try:
                call = self._engine.start_turn.remote(turn, self._subscriber)
                await asyncio.wait_for(call, FEED_CALL_TIMEOUT_S)
            except BaseException as exc:
                subscription.turns.pop(turn.request_id, None)
                if not _feed_closed(exc) or attempt:
                    raise
                self._drop(subscription, ConnectionError(f"{exc}"))
                continue
            if not subscription.alive:  # it broke meanwhile
                self.abort(turn.request_id)
                raise ConnectionError(f"the feed of engine instance {self.instance_id} broke")
            return events
        raise AssertionError("unreachable")

    def abort(self, request_id: str) -> None:
        """Stop a turn that has not ended (its client left); its session's
        KV is kept. The engine is told in the background."""
        subscription = self._subscription
        if subscription is None or subscription.turns.pop(request_id, None) is None:
            return  # ended, or its subscription broke (its replica is gone)
        task = asyncio.get_running_loop().create_task(self._abort_on_engine(request_id))
        task.add_done_callback(_log_failure)

    async def _abort_on_engine(self, request_id: str) -> None:
        await asyncio.wait_for(self._engine.abort_turn.remote(request_id), FEED_CALL_TIMEOUT_S)

    async def _open(self) -> _Subscription:
        async with self._opening:
            if self._subscription is not None and self._subscription.alive:
                return self._subscription
            stream = self._engine.options(stream=True).subscribe.remote(self._subscriber)
            async with asyncio.timeout(FEED_CALL_TIMEOUT_S):
                await anext(stream)  # the empty batch: the feed is open
            self._subscription = _Subscription(self.instance_id, stream)
            return self._subscription

    def _drop(self, subscription: _Subscription, error: BaseException) -> None:
        """Give up a subscription whose replica no longer knows it."""
        if self._subscription is subscription:
            self._subscription = None
        subscription.pump.cancel()
        subscription.close(error)


def _feed_closed(exc: BaseException) -> bool:
    """Whether `exc` is the engine's `FeedClosed` (as Ray delivers it, or its cause)."""
    return isinstance(exc, FeedClosed) or isinstance(getattr(exc, "cause", None), FeedClosed)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("abort of a turn on its engine failed: %r", task.exception())
