"""One engine instance as a Ray Serve deployment.

Our own deployment around `AsyncMarsEngine` rather than a subclass of Ray
Serve LLM's `LLMServer`: MARS drives vLLM's engine core in-process (its
scheduler's per-session records, KV strategies and load snapshot are read
directly), and Ray 2.60's LLM layer is tested against vLLM 0.29, not the
0.32 we extend; this keeps our dependence on its internals at zero.

Each instance is its own deployment (`engine-<instance id>`), so the global
scheduler can address it, and later migrate from or to it.

An ingress replica streams the turns it runs on an instance through one
feed (`subscribe`, then `start_turn` per turn): each engine step's events
of all its turns travel as one Ray message, as vLLM's engine core sends one
message per step to its API process. A stream per turn cost the replica a
message per turn per step (serialized one by one on the event loop that
shares the GIL with the engine thread): at a batch of 32 that was most of
the step's time (`bench.profile_serving`).

A session whose client never continues nor closes it is closed once it has
waited `session_ttl_s` (the state store's expiry of its record): a
background task looks for such sessions every `IDLE_SWEEP_PERIOD_S`.

With metrics on, a background task publishes the instance's gauges
(`cluster.metrics.EngineMetrics`) from its load snapshot every
`METRICS_PERIOD_S`, whether or not requests arrive: the gauges describe the
engine, not the traffic, and Ray drops a gauge that stops being set.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

from cluster.logs import adopt_into_serve_log, serve_logger
from cluster.metrics import EngineMetrics
from cluster.serve_env import freeze_startup_heap
from policies import HeldSession
from workers.async_engine import AsyncMarsEngine, TurnFeed
from workers.engine import EngineConfig, SessionInfo
from workers.kv_transport import ParkedState, RunningKv, SessionKv
from workers.turns import TurnEvent, TurnMoved, TurnOutput, TurnRequest

STARTUP_TIMEOUT_S = 600.0
METRICS_PERIOD_S = 1.0
"""How often the instance's gauges are set: at least once per Ray metrics
report (every `metrics_report_interval_ms`, 10 s by default and never under
1 s), since a report carries only the gauges set since the last one."""
GIL_SWITCH_INTERVAL_S = 0.002
"""The replica's GIL switch interval (Python's default: 5 ms). The engine
thread's steps are mostly Python that holds the GIL; the replica's event
loop, which takes new turns and streams outputs, waited up to the interval
for each of its turns of the GIL. Measured with `bench.stock_vllm`'s
multi_api run (96 sessions at 6/s, 40 KV blocks, one instance): first-turn
TTFT mean / P99 0.109 / 1.74 s at 5 ms, 0.055 / 0.50 s at 2 ms (0.5 ms and
0.2 ms did no better)."""
STOPPED_LEASE_S = 30.0
"""How long a turn stopped for a live move waits for its hand-over (the
move's coordinator died): then it goes on here."""

INCOMING_LEASE_S = 30.0
"""How long the stages of a turn moving here are held without a new one or
its commit (the move's coordinator died): then they are dropped."""

IDLE_SWEEP_PERIOD_S = 30.0
"""The longest wait between two looks for idle sessions (a quarter of
`session_ttl_s` when that is shorter, never under 0.5 s): a session is
closed at most this long after its limit."""

logger = serve_logger(__name__)


class FeedClosed(RuntimeError):
    """A turn was started for a subscriber whose feed is not open here."""


class EngineInstance:
    """The deployment class; `cluster.app` wraps it with `serve.deployment`."""

    def __init__(
        self,
        instance_id: str,
        engine_config: dict[str, Any],
        *,
        metrics: bool,
        session_ttl_s: float,
    ) -> None:
        self.instance_id = instance_id
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        # The engine thread's errors, and vLLM's own lines, in this replica's log.
        for package in ("workers", "vllm"):
            adopt_into_serve_log(package)
        self._engine = AsyncMarsEngine(EngineConfig.model_validate(engine_config))
        self._feeds: dict[str, TurnFeed] = {}
        self._accepting = True
        """False while draining (`drain`): placement sends no new session here."""
        self._moves: dict[str, tuple[str, float]] = {}
        """Each session whose turn a live move is copying: the move, and when
        its last stage was read (`live_stage`)."""
        self._stopped: dict[str, RunningKv] = {}
        """The last stage of each session's turn stopped here for a live
        move, until `hand_over`."""
        # The replica counts as started only once its engine has: Ray Serve
        # then routes nothing to it before, and `serve run` waits for it.
        self._engine.wait_started(timeout_s=STARTUP_TIMEOUT_S)
        # Serve runs the constructor on the replica's event loop, which then
        # serves its requests: the tasks live as long as the replica.
        loop = asyncio.get_running_loop()
        sweep_s = max(0.5, min(IDLE_SWEEP_PERIOD_S, session_ttl_s / 4))
        idle = partial(self._close_idle_sessions, session_ttl_s)
        self._idle_task = loop.create_task(self._repeat(sweep_s, idle, "closing idle sessions"))
        lease = self._repeat(
            INCOMING_LEASE_S / 2, self._drop_stale_incoming, "dropping stale move stages"
        )
        self._lease_task = loop.create_task(lease)
        self._metrics_task = None
        if metrics:
            publish = partial(self._publish_metrics, EngineMetrics(instance_id))
            repeat = self._repeat(METRICS_PERIOD_S, publish, "metrics refresh")
            self._metrics_task = loop.create_task(repeat)
        freeze_startup_heap()

    async def _ready(self) -> AsyncMarsEngine:
        return self._engine

    async def check_health(self) -> None:
        """Ray Serve's health probe: the engine thread must be alive."""
        if not self._engine.alive:
            raise RuntimeError(f"engine {self.instance_id} has stopped")

    async def generate(self, turn: TurnRequest) -> AsyncIterator[list[TurnEvent]]:
        """Run one turn on a stream of its own (callers with one turn at a
        time: benchmarks, tests; the ingress uses `subscribe`); stream vLLM's
        outputs (`TurnOutput`), then its `TurnEnd` with what it reused of its
        session's KV, in batches of the events ready together
        (`AsyncMarsEngine.generate`). Outputs travel
        without their prompt's token ids, which the caller sent and keeps
        (`TurnOutput.without_prompt`). A caller that leaves aborts the turn
        (its session's KV is kept)."""
        engine = await self._ready()
        logger.debug(
            "turn start session=%s request=%s prompt_tokens=%d",
            turn.session_id,
            turn.request_id,
            len(turn.prompt_token_ids),
        )
        try:
            async for batch in engine.generate(turn):
                yield [e.without_prompt() if isinstance(e, TurnOutput) else e for e in batch]
        except Exception:
            logger.exception("turn failed session=%s request=%s", turn.session_id, turn.request_id)
            raise

    async def subscribe(self, subscriber: str) -> AsyncIterator[list[TurnEvent]]:
        """The feed of `subscriber` (an ingress replica): an empty batch once
        it is open, then the events of every turn it starts with
        `start_turn`, a batch per engine step (outputs without their
        prompts' token ids). The subscriber's running turns are aborted
        when it leaves; a new subscription under the same name replaces the
        old one."""
        engine = await self._ready()
        feed = TurnFeed()
        self._feeds[subscriber] = feed
        logger.info("feed open subscriber=%s instance=%s", subscriber, self.instance_id)
        try:
            yield []
            while True:
                batch = await feed.next_batch()
                yield [e.without_prompt() if isinstance(e, TurnOutput) else e for e in batch]
        finally:
            if self._feeds.get(subscriber) is feed:
                del self._feeds[subscriber]
            for request_id in list(feed.running):
                engine.abort(request_id)
            logger.info("feed closed subscriber=%s instance=%s", subscriber, self.instance_id)

    async def start_turn(self, turn: TurnRequest, subscriber: str) -> None:
        """Start `turn`; its events go to `subscriber`'s feed. Raises what the
        engine raised on the turn's input, or `FeedClosed`."""
        engine = await self._ready()
        feed = self._feeds.get(subscriber)
        if feed is None:
            raise FeedClosed(
                f"engine instance {self.instance_id} has no open feed for {subscriber!r} "
                "(the replica restarted, or the feed ended): subscribe again"
            )
        logger.debug(
            "turn start session=%s request=%s prompt_tokens=%d",
            turn.session_id,
            turn.request_id,
            len(turn.prompt_token_ids),
        )
        await engine.start(turn, feed)

    async def abort_turn(self, request_id: str) -> None:
        """Abort a running turn (its client left); its session's KV is kept."""
        engine = await self._ready()
        engine.abort(request_id)

    async def end_session(self, session_id: str, reason: str = "session ended") -> None:
        """Release a session's kept KV (its record is the cluster's); `reason`
        lands in the engine's timeline of the session."""
        engine = await self._ready()
        await engine.call(lambda e: e.end_session(session_id, reason))

    async def export_session(self, session_id: str) -> SessionKv:
        """A paused session's KV, for another instance (`cluster.migration`);
        kept here until `end_session`."""
        engine = await self._ready()
        return await engine.call(lambda e: e.export_session(session_id))

    async def import_session(self, kv: SessionKv) -> dict[str, int]:
        """Park a session exported by another instance; its next turn here
        loads the KV. Returns the tokens and bytes that came."""
        engine = await self._ready()
        await engine.call(lambda e: e.import_session(kv))
        carried = kv.shards is not None
        return {"kv_tokens": len(kv.token_ids) if carried else 0, "kv_bytes": kv.nbytes}

    async def runs_session(self, session_id: str) -> bool:
        """Whether a turn of the session runs here now."""
        engine = await self._ready()
        return await engine.call(lambda e: session_id in e.live_sessions)

    async def live_stage(
        self, session_id: str, move: str, first_block: int, stop: bool
    ) -> RunningKv:
        """A stage of the session's running turn moving to another instance
        (`MarsEngine.running_kv`) for the move named `move`, read while it
        decodes, or with `stop` its last one: the turn then stops here and
        waits for `hand_over`, its session's KV parked here until
        `end_session`. Raises ValueError when the session has no turn running
        here, one that cannot move, or one another move is copying (one move
        per session; a claim lapses after `INCOMING_LEASE_S` without a stage)."""
        now = time.monotonic()
        claim = self._moves.get(session_id)
        if claim is not None and claim[0] != move and now - claim[1] < INCOMING_LEASE_S:
            raise ValueError(f"session {session_id!r} is already moving ({claim[0]})")
        self._moves[session_id] = (move, now)
        engine = await self._ready()

        def stage(e: Any) -> RunningKv:
            return e.running_kv(e.movable_turn(session_id), first_block, stop=stop)

        try:
            kv = await engine.call(stage)
        except BaseException:
            self._moves.pop(session_id, None)
            raise
        if stop:
            del self._moves[session_id]
            self._stopped[session_id] = kv
            loop = asyncio.get_running_loop()
            loop.call_later(STOPPED_LEASE_S, self._take_back, session_id, kv)
        return kv

    async def hand_over(self, session_id: str, destination: str) -> None:
        """End the session's stopped turn on its feed with `TurnMoved`: the
        ingress streaming it goes on from its tokens on `destination` (this
        instance itself, when the move failed)."""
        stopped = self._stopped.pop(session_id, None)
        if stopped is None:
            raise ValueError(f"session {session_id!r} has no turn stopped here for a move")
        engine = await self._ready()
        engine.hand_over(TurnMoved(stopped.request_id, destination, stopped.token_ids))

    def _take_back(self, session_id: str, stopped: RunningKv) -> None:
        """A stopped turn whose move never handed it over (its coordinator
        died) goes on here after `STOPPED_LEASE_S`."""
        if self._stopped.get(session_id) is stopped:
            logger.warning(
                "instance=%s: the move of session=%s never handed its turn over; it goes on here",
                self.instance_id,
                session_id,
            )
            del self._stopped[session_id]
            moved = TurnMoved(stopped.request_id, self.instance_id, stopped.token_ids)
            with contextlib.suppress(ValueError):  # its client left meanwhile
                self._engine.hand_over(moved)

    async def stage_in(self, key: str, stage: RunningKv) -> int:
        """Hold a stage of a turn moving here; the block the next starts at."""
        engine = await self._ready()
        return await engine.call(lambda e: e.stage_in(key, stage))

    async def commit_incoming(
        self, key: str, last: RunningKv, state: ParkedState, session_id: str
    ) -> dict[str, Any]:
        """Park the whole KV of the turn moving here under `key` as its
        session's, for its continuation (`MarsEngine.commit_incoming`)."""
        engine = await self._ready()
        return await engine.call(lambda e: e.commit_incoming(key, last, state, session_id))

    async def drop_incoming(self, key: str) -> None:
        """Forget the stages of a move that will not commit."""
        engine = await self._ready()
        await engine.call(lambda e: e.drop_incoming(key))

    async def session_info(self, session_id: str) -> SessionInfo:
        """The engine's view of a session: phase, KV strategy, timeline, counters."""
        engine = await self._ready()
        return await engine.call(lambda e: e.session_info(session_id))

    async def load(self) -> dict[str, Any]:
        """This instance's `InstanceLoad` fields (`MarsScheduler.load_snapshot`)."""
        engine = await self._ready()
        snapshot = await engine.call(lambda e: e.scheduler.load_snapshot())
        return {"instance_id": self.instance_id, **snapshot, "accepting": self._accepting}

    async def describe(self) -> dict[str, Any]:
        """This instance for an operator (`GET /v1/instances`): where it runs
        (Ray node, process) and its load."""
        import os

        import ray

        context = ray.get_runtime_context()
        return {
            **await self.load(),
            "node_id": context.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
        }

    async def drain(self) -> dict[str, Any]:
        """Stop taking new sessions (placement sees it at its next load
        refresh; the sessions held here still resume here until they move)
        and return what must move: the sessions `paused` here, those whose
        turn runs here (`live`), and how many turns run (`running`)."""
        engine = await self._ready()
        if self._accepting:
            logger.info("instance=%s draining: no new sessions", self.instance_id)
        self._accepting = False
        paused, live, running = await engine.call(lambda e: e.held_sessions())
        return {"paused": paused, "live": live, "running": running}

    async def held_sessions(self) -> dict[str, list[HeldSession]]:
        """The sessions paused here and those whose turn runs here, as a
        migration policy weighs them (`MarsEngine.held_sessions`)."""
        engine = await self._ready()
        paused, live, _ = await engine.call(lambda e: e.held_sessions())
        return {"paused": paused, "live": live}

    async def undrain(self) -> None:
        """Take new sessions again."""
        if not self._accepting:
            logger.info("instance=%s takes new sessions again", self.instance_id)
        self._accepting = True

    async def _repeat(
        self, period_s: float, work: Callable[[], Awaitable[None]], what: str
    ) -> None:
        """Run `work` every `period_s` for as long as the engine lives (a dead
        engine fails its health check and Serve replaces the replica); a
        failed round is logged, and the next one tried."""
        while self._engine.alive:
            try:
                await work()
            except Exception:
                logger.warning("instance=%s: %s failed", self.instance_id, what, exc_info=True)
            await asyncio.sleep(period_s)

    async def _publish_metrics(self, metrics: EngineMetrics) -> None:
        """Set the instance's gauges from its load snapshot."""
        metrics.publish(await self.load())

    async def _drop_stale_incoming(self) -> None:
        """Free the stages of moves that stopped coming (`INCOMING_LEASE_S`)."""
        stale = await self._engine.call(lambda e: e.drop_stale_incoming(INCOMING_LEASE_S))
        for key in stale:
            logger.warning(
                "instance=%s dropped the stages of move %s: none came for %.0f s",
                self.instance_id,
                key,
                INCOMING_LEASE_S,
            )

    async def _close_idle_sessions(self, max_idle_s: float) -> None:
        """Close the sessions that have awaited their client for `max_idle_s`."""
        closed = await self._engine.call(lambda e: e.close_idle_sessions(max_idle_s))
        for session_id in closed:
            logger.info(
                "closed idle session=%s instance=%s: no turn for %.0f s (session_ttl_s)",
                session_id,
                self.instance_id,
                max_idle_s,
            )
