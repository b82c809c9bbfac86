"""Where a new session goes: a dispatch policy over a cached view of the
instance loads.

A `Placer` holds the configured policy (`policies.dispatch`), its state and
the latest load of every instance; each decision is charged to the chosen
instance's cached load (`charge_placement`) until the next refresh replaces
the view, so a burst of new sessions spreads out instead of landing on
whichever instance looked freest at the last refresh. Decisions are logged
with their session and request at DEBUG level (the ingress logs each turn's
instance and placement reason at INFO, in its turn-start line: one line per
request on the response path, not two), and counted in
``mars_dispatch_decisions`` when metrics are on.

The global scheduler hosts one (the application's authority, refreshed from
the engines); a lone ingress replica hosts another, fed with the global
scheduler's loads, and decides without a Ray call per session (see
`cluster.ingress`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from cluster.logs import request_id, serve_logger
from cluster.metrics import DispatchMetrics, dispatch_reason
from policies import (
    DispatchDecision,
    DispatchRequest,
    DispatchState,
    InstanceLoad,
    NoInstanceAvailable,
    PrefixIndex,
    charge_placement,
    make_dispatch_policy,
)

logger = serve_logger(__name__)

FIRST_LOADS_TIMEOUT_S = 30.0
PLACEMENT_TIMEOUT_S = 10.0
"""The longest an ingress waits for the global scheduler's placement."""
LOAD_REFRESH_S = 0.1
"""How often a view's loads are fetched while they move."""
IDLE_LOAD_REFRESH_S = 1.0
"""How often a view's loads are fetched while they stand still."""


class Placer:
    """One decider: see the module docstring."""

    def __init__(self, dispatch: dict[str, Any], *, metrics: bool) -> None:
        self._policy = make_dispatch_policy(dispatch["policy"], **dispatch.get("params", {}))
        self._state = DispatchState()
        self._prefixes = PrefixIndex()
        self._loads: dict[str, InstanceLoad] = {}
        self._metrics = DispatchMetrics(dispatch["policy"]) if metrics else None

    def update(self, loads: Iterable[InstanceLoad]) -> None:
        """Replace the view with fresh loads (and drop the charged estimates)."""
        self._loads = {load.instance_id: load for load in loads}

    @property
    def loads(self) -> list[InstanceLoad]:
        """The current view, decisions since the last update included."""
        return list(self._loads.values())

    def place(
        self,
        session_id: str | None,
        prompt_tokens: int,
        affinity_instance: str | None = None,
        prefix_hashes: tuple[int, ...] = (),
    ) -> DispatchDecision:
        """The instance for a turn; raises `NoInstanceAvailable`.

        A session's turn goes to `affinity_instance` (where its KV is) while
        that instance is healthy, whatever the policy; a turn without one
        goes where the longest prefix of its prompt was served (`prefix`,
        block hashes), if healthy; otherwise the policy decides."""
        decision = self._sticky(affinity_instance, "affinity", draining_too=True)
        if decision is None and prefix_hashes:
            instance, _ = self._prefixes.longest(prefix_hashes)
            decision = self._sticky(instance, "prefix", draining_too=False)
        if decision is None:
            decision = self._choose(session_id, prompt_tokens, affinity_instance)
        chosen = decision.instance_id
        self._prefixes.record(prefix_hashes, chosen)
        self._loads[chosen] = charge_placement(self._loads[chosen], prompt_tokens)
        if self._metrics is not None:
            self._metrics.record(chosen, dispatch_reason(affinity_instance, chosen))
        logger.debug(
            "placed session=%s request=%s instance=%s affinity=%s reason=%s",
            session_id,
            request_id(),
            chosen,
            affinity_instance,
            decision.reason,
        )
        return decision

    def _sticky(
        self, instance_id: str | None, reason: str, *, draining_too: bool
    ) -> DispatchDecision | None:
        """`instance_id` while it is healthy; a draining one only with
        `draining_too` (a session it still holds, not a shared prefix)."""
        load = self._loads.get(instance_id) if instance_id is not None else None
        if load is None or not load.healthy or not (load.accepting or draining_too):
            return None
        return DispatchDecision(instance_id, reason)

    def _choose(
        self, session_id: str | None, prompt_tokens: int, affinity_instance: str | None
    ) -> DispatchDecision:
        request = DispatchRequest(session_id, prompt_tokens, affinity_instance)
        try:
            decision, self._state = self._policy.choose(request, self.loads, self._state)
        except NoInstanceAvailable as exc:
            logger.error(
                "placement failed session=%s request=%s: %s", session_id, request_id(), exc
            )
            raise
        return decision


class LoadView:
    """A `Placer` kept fresh in the background, from a task started on first
    use (a Serve replica's event loop runs by then), so that no placement
    waits for a round of load calls.

    `fetch()` runs every `period_s` while the loads move, and every
    `idle_period_s` once a fetch finds them as they were: idle instances
    cost one load call a second, not ten, and take no CPU from the requests
    that do arrive (on a small machine that background work shows in the
    request path's tail latency). A placement through the view brings the
    next fetch forward to `period_s`; a change made elsewhere (a paused
    session resuming on its instance) shows within `idle_period_s`.
    """

    def __init__(
        self,
        placer: Placer,
        fetch: Callable[[], Awaitable[Iterable[InstanceLoad]]],
        *,
        source: str,
        period_s: float = LOAD_REFRESH_S,
        idle_period_s: float = IDLE_LOAD_REFRESH_S,
    ) -> None:
        self._placer = placer
        self._fetch = fetch
        self._period_s = period_s
        self._idle_period_s = max(idle_period_s, period_s)
        self._source = source
        self._first_loads = asyncio.Event()
        self._placed = asyncio.Event()
        self._refresher: asyncio.Task[None] | None = None

    async def ready(self) -> Placer:
        """The placer, once it has seen the loads at least once; raises
        `NoInstanceAvailable` if that takes `FIRST_LOADS_TIMEOUT_S`."""
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())
        try:
            await asyncio.wait_for(self._first_loads.wait(), FIRST_LOADS_TIMEOUT_S)
        except TimeoutError:
            raise NoInstanceAvailable(
                f"no instance loads from {self._source} after {FIRST_LOADS_TIMEOUT_S:g} s"
            ) from None
        return self._placer

    async def place(
        self,
        session_id: str | None,
        prompt_tokens: int,
        affinity_instance: str | None = None,
        prefix_hashes: tuple[int, ...] = (),
    ) -> DispatchDecision:
        """`Placer.place` once the loads are in, and a fetch soon after."""
        placer = await self.ready()
        decision = placer.place(session_id, prompt_tokens, affinity_instance, prefix_hashes)
        self.refresh_soon()
        return decision

    def refresh_soon(self) -> None:
        """Bring the next fetch forward to `period_s` (something changed the
        loads: a placement, a move)."""
        self._placed.set()

    async def _refresh_forever(self) -> None:
        previous: list[InstanceLoad] | None = None
        while True:
            try:
                loads = list(await self._fetch())
                self._placer.update(loads)
                self._first_loads.set()
            except Exception:
                logger.exception(
                    "load refresh from %s failed; keeping the previous loads", self._source
                )
                loads = None
            await self._pause(idle=loads is not None and loads == previous)
            previous = loads

    async def _pause(self, *, idle: bool) -> None:
        """`period_s`, or while idle up to `idle_period_s` (a placement ends it
        at `period_s`)."""
        if idle:
            self._placed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._placed.wait(), self._idle_period_s)
        await asyncio.sleep(self._period_s)


class ViaScheduler:
    """Placement by the global scheduler: one Ray call per new session, every
    ingress replica's decisions made in one place."""

    def __init__(self, scheduler: Any) -> None:
        self._scheduler = scheduler

    async def place(
        self,
        session_id: str | None,
        prompt_tokens: int,
        affinity_instance: str | None = None,
        prefix_hashes: tuple[int, ...] = (),
    ) -> DispatchDecision:
        call = self._scheduler.place.remote(
            session_id, prompt_tokens, affinity_instance, prefix_hashes
        )
        placed = await asyncio.wait_for(call, timeout=PLACEMENT_TIMEOUT_S)
        return DispatchDecision(placed["instance_id"], placed["reason"])


class InIngress:
    """Placement in the (only) ingress replica, from the global scheduler's
    loads (a `LoadView` of them): the same decisions as the scheduler's
    when this replica is the only decider, without a Ray call per session."""

    def __init__(self, scheduler: Any, dispatch: dict[str, Any], *, metrics: bool) -> None:
        self._scheduler = scheduler
        self._view = LoadView(
            Placer(dispatch, metrics=metrics), self._fetch, source="the global scheduler"
        )

    async def place(
        self,
        session_id: str | None,
        prompt_tokens: int,
        affinity_instance: str | None = None,
        prefix_hashes: tuple[int, ...] = (),
    ) -> DispatchDecision:
        return await self._view.place(session_id, prompt_tokens, affinity_instance, prefix_hashes)

    async def _fetch(self) -> list[InstanceLoad]:
        loads = await asyncio.wait_for(self._scheduler.loads.remote(), PLACEMENT_TIMEOUT_S)
        return [InstanceLoad(**load) for load in loads]
