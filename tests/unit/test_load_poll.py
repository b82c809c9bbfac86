"""How the global scheduler reads its engines' loads (`GlobalScheduler.
_fetch_loads`): the control flow only, against stand-ins for the engines'
Serve handles that answer, hang or fail as a replica does. A busy engine
is not a dead one."""

from __future__ import annotations

import asyncio

import pytest

from cluster import global_scheduler as module
from cluster.global_scheduler import GlobalScheduler

LOAD = {
    "total_blocks": 64,
    "free_blocks": 60,
    "running": 1,
    "waiting": 0,
    "waiting_demand_blocks": 0,
    "paused_preserved_blocks": 0,
    "paused_released_blocks": 0,
}


class _Handle:
    """`handle.load.remote()` that answers from a script: a load, "hang"
    (slower than the poll's timeout) or an exception."""

    def __init__(self, instance_id: str, outcomes: list[object]) -> None:
        self.instance_id, self.outcomes = instance_id, outcomes
        self.load = self

    async def remote(self) -> dict:
        outcome = self.outcomes.pop(0)
        if outcome == "hang":
            await asyncio.sleep(10)
        if isinstance(outcome, BaseException):
            raise outcome
        return {"instance_id": self.instance_id, **LOAD}


def test_a_timed_out_load_call_keeps_the_last_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module, "LOAD_TIMEOUT_S", 0.05)
    busy = _Handle("busy", ["ok", "hang"])
    gone = _Handle("gone", ["ok", RuntimeError("actor died")])
    never = _Handle("never", ["hang", "hang"])
    scheduler = GlobalScheduler(
        {"busy": busy, "gone": gone, "never": never}, {"policy": "round_robin"}, metrics=False
    )

    async def two_rounds():
        return await scheduler._fetch_loads(), await scheduler._fetch_loads()

    first, second = asyncio.run(two_rounds())
    assert [load.healthy for load in first] == [True, True, False]  # never answered: unknown
    health = {load.instance_id: load.healthy for load in second}
    assert health == {"busy": True, "gone": False, "never": False}
    assert next(load for load in second if load.instance_id == "busy").free_blocks == 60
