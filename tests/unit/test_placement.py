"""`cluster.placement`: the placer's view of the loads, kept fresh in the
background (no Ray here: the fetch is a plain coroutine)."""

from __future__ import annotations

import asyncio

import pytest

from cluster import placement
from cluster.placement import LoadView, Placer
from policies import InstanceLoad, NoInstanceAvailable


def _load(instance_id: str, free: int) -> InstanceLoad:
    return InstanceLoad(
        instance_id=instance_id,
        total_blocks=100,
        free_blocks=free,
        running=1,
        waiting=0,
        waiting_demand_blocks=0,
        paused_preserved_blocks=0,
        paused_released_blocks=0,
    )


def test_the_view_places_from_fetched_loads_and_refreshes_them() -> None:
    fetched = []

    async def fetch() -> list[InstanceLoad]:
        fetched.append(True)
        return [_load("a", 50), _load("b", 10)]

    async def scenario() -> None:
        view = LoadView(
            Placer({"policy": "least_load"}, metrics=False), fetch, source="test", period_s=0.01
        )
        placer = await view.ready()
        assert placer.place("s1", 320).instance_id == "a"
        # Charged until the next refresh: 10 more blocks waiting on "a".
        assert {load.instance_id: load.waiting_demand_blocks for load in placer.loads}["a"] == 10
        await asyncio.sleep(0.05)
        assert {load.instance_id: load.waiting_demand_blocks for load in placer.loads}["a"] == 0
        assert len(fetched) >= 2

    asyncio.run(scenario())


def test_no_loads_at_all_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placement, "FIRST_LOADS_TIMEOUT_S", 0.05)

    async def fetch() -> list[InstanceLoad]:
        raise ConnectionError("scheduler gone")

    async def scenario() -> None:
        view = LoadView(
            Placer({"policy": "round_robin"}, metrics=False),
            fetch,
            period_s=0.01,
            source="the global scheduler",
        )
        with pytest.raises(
            NoInstanceAvailable, match="no instance loads from the global scheduler"
        ):
            await view.ready()

    asyncio.run(scenario())


def _fast_view(fetch, *, idle_period_s: float) -> LoadView:
    """A least-load view refreshing every 10 ms while its loads move."""
    placer = Placer({"policy": "least_load"}, metrics=False)
    return LoadView(placer, fetch, source="test", period_s=0.01, idle_period_s=idle_period_s)


def test_idle_loads_are_fetched_less_often_until_a_placement() -> None:
    """Loads that stand still are fetched every `idle_period_s`; a placement
    brings the next fetch forward."""
    fetched: list[float] = []

    async def fetch() -> list[InstanceLoad]:
        fetched.append(asyncio.get_running_loop().time())
        return [_load("a", 50), _load("b", 10)]

    async def scenario() -> None:
        view = _fast_view(fetch, idle_period_s=0.5)
        await view.ready()
        await asyncio.sleep(0.2)
        # The first fetch, the one that found nothing moved, then the idle wait.
        assert len(fetched) == 2
        await view.place("s1", 32)
        await asyncio.sleep(0.1)
        assert len(fetched) == 3

    asyncio.run(scenario())


def test_moving_loads_are_fetched_every_period() -> None:
    free = iter(range(100, 0, -1))

    async def fetch() -> list[InstanceLoad]:
        return [_load("a", next(free))]

    async def scenario() -> None:
        view = _fast_view(fetch, idle_period_s=10.0)
        placer = await view.ready()
        await asyncio.sleep(0.2)
        assert placer.loads[0].free_blocks < 90

    asyncio.run(scenario())
