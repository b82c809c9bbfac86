"""The global scheduler: the application's view of its engine instances, and
the placement of new sessions.

One replica per application (a Ray actor under Ray Serve). A background task
pulls every engine's load into a `cluster.placement.Placer` (a `LoadView`:
ten times a second while the loads move, once a second while they stand
still), never inside a placement: placing a session costs a pure policy
decision, not a round of calls to every engine.

It keeps no session state: the ingress sends a session's later turns
straight to the instance that holds its KV (from the state store), so a
restart of this actor loses nothing, and placing a new session needs no
store round trip. A lone ingress replica places sessions itself from this
actor's `loads` (one Ray call per session less); with several ingress
replicas every new session is placed here, so their decisions stay coherent.

With a migration policy in the serving config (`migration.policy`), a
second background task runs the policy every `migration.interval_s` over
the same loads and makes the moves it picks (paused sessions with their
KV, running turns live)
(`cluster.relocation.relocation_round`), committing each move in the state
store (Redis) as the ingress's moves do.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from cluster.logs import serve_logger
from cluster.metrics import MigrationMetrics
from cluster.migration import MigrationOutcome
from cluster.placement import LoadView, Placer
from cluster.relocation import RELOCATION, relocation_round
from cluster.serve_env import freeze_startup_heap
from cluster.state_store import StateStore, make_state_store
from policies import InstanceLoad, MigrationPolicy, make_migration_policy

logger = serve_logger(__name__)

LOAD_TIMEOUT_S = 5.0


class GlobalScheduler:
    """The deployment class; `cluster.app` wraps it with `serve.deployment`."""

    def __init__(
        self,
        engines: dict[str, Any],
        dispatch: dict[str, Any],
        *,
        metrics: bool,
        migration: dict[str, Any] | None = None,
        state_store: dict[str, Any] | None = None,
    ) -> None:
        self._engines = engines
        self._last: dict[str, InstanceLoad] = {}
        self.placer = Placer(dispatch, metrics=metrics)
        self._view = LoadView(self.placer, self._fetch_loads, source="the engines")
        self._relocation: asyncio.Task[None] | None = None
        self._relocated: Counter[str] = Counter()
        self._moved_at: dict[str, float] = {}
        """When the policy last moved each session (`relocation_round`)."""
        if migration is not None and migration["policy"] is not None:
            if state_store is None or state_store.get("url") is None:
                raise ValueError("a migration policy needs state_store.url (Redis)")
            policy = make_migration_policy(migration["policy"], **migration["params"])
            store = make_state_store(state_store["url"], state_store["session_ttl_s"])
            relocate = self._relocate_forever(
                policy, store, migration["interval_s"], MigrationMetrics() if metrics else None
            )
            # Serve runs the constructor on the replica's event loop.
            self._relocation = asyncio.get_running_loop().create_task(relocate)
        freeze_startup_heap()

    async def place(
        self,
        session_id: str | None,
        prompt_tokens: int,
        affinity_instance: str | None = None,
        prefix_hashes: tuple[int, ...] = (),
    ) -> dict[str, str]:
        """The instance for a turn of `prompt_tokens` tokens (`Placer.place`:
        the session's instance while healthy, else the prompt's prefix, else
        the policy)."""
        decision = await self._view.place(
            session_id, prompt_tokens, affinity_instance, tuple(prefix_hashes)
        )
        return {"instance_id": decision.instance_id, "reason": decision.reason}

    async def loads(self) -> list[dict[str, Any]]:
        """The latest load of every instance (decisions since the last refresh
        included)."""
        placer = await self._view.ready()
        return [vars(load) for load in placer.loads]

    async def relocations(self) -> dict[str, int]:
        """The moves the migration policy made so far, by outcome."""
        return dict(self._relocated)

    async def _relocate_forever(
        self,
        policy: MigrationPolicy,
        store: StateStore,
        interval_s: float,
        metrics: MigrationMetrics | None,
    ) -> None:
        """Run `policy` every `interval_s` over the latest loads, for as long
        as this replica lives; a failed round is logged and the next tried."""
        logger.info("migration policy %r every %.3g s", policy, interval_s)
        while True:
            await asyncio.sleep(interval_s)
            try:
                placer = await self._view.ready()
                migrations = await relocation_round(
                    policy, placer.loads, store, self._engines, moved_at=self._moved_at
                )
                for migration in migrations:
                    self._relocated[migration.outcome.value] += 1
                    if metrics is not None:
                        metrics.observe(migration, RELOCATION)
            except Exception:  # the next round is tried: the loop must outlive any one
                logger.warning("relocation round failed", exc_info=True)
                continue
            if any(m.outcome is MigrationOutcome.COMMITTED for m in migrations):
                self._view.refresh_soon()

    async def _fetch_loads(self) -> list[InstanceLoad]:
        """Every instance's load. A busy engine is not a dead one: a load call
        that times out keeps the instance's last load (placement degrades to
        a stale view, no request is refused); an instance is unhealthy only
        when its call fails (the replica is gone or restarting) or it never
        answered."""
        ids = list(self._engines)
        results = await asyncio.gather(*(self._load_of(i) for i in ids), return_exceptions=True)
        loads = []
        for instance_id, result in zip(ids, results, strict=True):
            if isinstance(result, TimeoutError) and instance_id in self._last:
                logger.warning(
                    "instance %s: load call timed out after %.0f s; placing on its last load",
                    instance_id,
                    LOAD_TIMEOUT_S,
                )
                loads.append(self._last[instance_id])
            elif isinstance(result, BaseException):
                logger.warning("instance %s unhealthy: %r", instance_id, result)
                loads.append(_unhealthy(instance_id))
            else:
                self._last[instance_id] = InstanceLoad(**result)
                loads.append(self._last[instance_id])
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
