"""The global scheduler: places each session on an engine instance.

One replica per application (a Ray actor under Ray Serve). It keeps no
session state of its own: affinity comes from the state store on every
placement, so a restart loses nothing. Instance loads are pulled from the
engines and reused for `load_ttl_s`; the decision itself is a pure policy
from `policies.dispatch`. Each decision is logged with its session and
request, and counted in ``mars_dispatch_decisions`` when metrics are on.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

from cluster.logs import request_id, serve_logger
from cluster.metrics import DispatchMetrics, dispatch_reason
from cluster.state_store import UnknownSession, make_state_store
from policies import (
    DispatchRequest,
    DispatchState,
    InstanceLoad,
    NoInstanceAvailable,
    make_dispatch_policy,
)

logger = serve_logger(__name__)

LOAD_TIMEOUT_S = 5.0


class GlobalScheduler:
    """The deployment class; `cluster.app` wraps it with `serve.deployment`."""

    def __init__(
        self,
        engines: dict[str, Any],
        dispatch: dict[str, Any],
        state_store: dict[str, Any],
        *,
        metrics: bool,
        load_ttl_s: float = 0.1,
    ) -> None:
        self._engines = engines
        self._policy = make_dispatch_policy(dispatch["policy"], **dispatch.get("params", {}))
        self._state = DispatchState()
        self._store = make_state_store(state_store.get("url"), state_store["session_ttl_s"])
        self._load_ttl_s = load_ttl_s
        self._loads: list[InstanceLoad] = []
        self._loads_at = float("-inf")
        self._lock = asyncio.Lock()
        self.decisions: collections.Counter[str] = collections.Counter()
        self._metrics = DispatchMetrics(dispatch["policy"]) if metrics else None

    async def place(self, session_id: str | None, prompt_tokens: int) -> dict[str, str]:
        """The instance for a new chunk of `session_id` (affinity first)."""
        affinity = None
        if session_id is not None:
            try:
                record = await asyncio.to_thread(self._store.get_session, session_id)
                affinity = record.instance_id
            except UnknownSession:
                pass
        async with self._lock:
            loads = await self._fresh_loads()
            request = DispatchRequest(session_id, prompt_tokens, affinity)
            try:
                decision, self._state = self._policy.choose(request, loads, self._state)
            except NoInstanceAvailable as exc:
                logger.error(
                    "placement failed session=%s request=%s: %s", session_id, request_id(), exc
                )
                raise
        self.decisions[decision.instance_id] += 1
        if self._metrics is not None:
            self._metrics.record(
                decision.instance_id, dispatch_reason(affinity, decision.instance_id)
            )
        logger.info(
            "placed session=%s request=%s instance=%s affinity=%s reason=%s",
            session_id,
            request_id(),
            decision.instance_id,
            affinity,
            decision.reason,
        )
        return {"instance_id": decision.instance_id, "reason": decision.reason}

    async def loads(self) -> list[dict[str, Any]]:
        async with self._lock:
            return [vars(load) for load in await self._fresh_loads()]

    async def _fresh_loads(self) -> list[InstanceLoad]:
        if time.monotonic() - self._loads_at < self._load_ttl_s:
            return self._loads
        ids = list(self._engines)
        results = await asyncio.gather(*(self._load_of(i) for i in ids), return_exceptions=True)
        loads = []
        for instance_id, result in zip(ids, results, strict=True):
            if isinstance(result, BaseException):
                logger.warning("instance %s unhealthy: %r", instance_id, result)
                loads.append(_unhealthy(instance_id))
            else:
                loads.append(InstanceLoad(**result))
        self._loads, self._loads_at = loads, time.monotonic()
        return loads

    async def _load_of(self, instance_id: str) -> dict[str, Any]:
        return await asyncio.wait_for(
            self._engines[instance_id].load.remote(), timeout=LOAD_TIMEOUT_S
        )


def _unhealthy(instance_id: str) -> InstanceLoad:
    return InstanceLoad(
        instance_id=instance_id,
        total_blocks=0,
        free_blocks=0,
        running=0,
        waiting=0,
        waiting_demand_blocks=0,
        paused_preserved_blocks=0,
        paused_released_blocks=0,
        healthy=False,
    )
