"""`AsyncMarsEngine`: concurrent sessions from an event loop, streamed tokens,
client-driven resume, server-side plans, errors handed back to the caller."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.engine.helpers import SWAP_IS_CHEAP, prompt
from workers.async_engine import AsyncMarsEngine, ChunkEnd, TokenDelta
from workers.engine import AugmentedRequest, EngineConfig, Segment, SessionEnded, SessionState
from workers.settings import SchedulerSettings
from workers.tools import ToolCall

pytestmark = pytest.mark.engine


async def _chunk(engine, session_id, token_ids, max_tokens):
    deltas, end = [], None
    async for event in engine.generate(session_id, token_ids, max_tokens):
        if isinstance(event, TokenDelta):
            deltas.extend(event.token_ids)
        else:
            assert isinstance(event, ChunkEnd)
            end = event
    return deltas, end


async def _scenario(model_dir):
    config = EngineConfig(
        model=str(model_dir),
        num_kv_blocks=64,
        max_model_len=1024,
        profile_costs=False,
        scheduler=SchedulerSettings(policy="mars", cost=SWAP_IS_CHEAP),
    )
    engine = AsyncMarsEngine(config)
    try:
        await engine.ready()
        (a_tokens, a_end), (b_tokens, b_end) = await asyncio.gather(
            _chunk(engine, "a", prompt(50), 6), _chunk(engine, "b", prompt(70, seed=4), 9)
        )
        assert (len(a_tokens), len(b_tokens)) == (6, 9)
        assert a_end.token_ids == a_tokens and b_end.token_ids == b_tokens
        assert a_end.state is SessionState.AWAITING_CLIENT
        assert a_end.finish_reason == "length"

        resumed, end = await _chunk(engine, "a", [5, 6, 7], 4)
        assert len(resumed) == 4 and end.state is SessionState.AWAITING_CLIENT
        events = await engine.call(lambda e: [x.event for x in e.record("a").timeline])
        assert events.count("resumed") == 1 and events.count("paused") == 2

        plan = AugmentedRequest(
            "plan",
            prompt(40, seed=5),
            [Segment(5, ToolCall("emulated", duration_s=0.2, return_tokens=7)), Segment(5)],
        )
        session = await engine.run_plan(plan)
        assert session.state is SessionState.FINISHED
        assert [len(o) for o in session.outputs] == [5, 5]

        await engine.close("a")
        with pytest.raises(SessionEnded, match="a new session needs a new id"):
            await _chunk(engine, "a", [1], 2)
        with pytest.raises(ValueError, match="max_tokens must be >= 1"):
            await _chunk(engine, "c", prompt(8), 0)
        free = await engine.call(lambda e: e.scheduler.free_blocks())
        assert free > 0
    finally:
        engine.shutdown()


def test_async_engine_serves_concurrent_sessions(tiny_model_dir):
    asyncio.run(_scenario(tiny_model_dir))


async def _cancelled_calls(model_dir):
    engine = AsyncMarsEngine(
        EngineConfig(model=str(model_dir), num_kv_blocks=32, max_model_len=512, profile_costs=False)
    )
    try:
        await engine.ready()
        # Keep the engine thread busy so that the calls below are still queued
        # when their callers give up (as a load poll timing out, or a client
        # disconnecting, cancels a replica's call).
        busy = asyncio.ensure_future(engine.call(lambda e: time.sleep(0.3)))
        calls = [asyncio.ensure_future(engine.call(lambda e: e.scheduler.free_blocks()))]
        calls.append(asyncio.ensure_future(_chunk(engine, "gone", prompt(20), 4)))
        await asyncio.sleep(0.05)
        for call in calls:
            call.cancel()
        await busy
        await asyncio.gather(*calls, return_exceptions=True)
        # The engine survived its callers' cancellations and still serves.
        tokens, end = await _chunk(engine, "after", prompt(30, seed=2), 3)
        assert len(tokens) == 3 and end.finish_reason == "length"
        assert engine.alive
        assert "gone" not in await engine.call(lambda e: list(e.sessions))

        # A last chunk (close=True) whose caller leaves after its first token
        # is still closed by the engine when it ends: no session left holding KV.
        chunk = engine.generate("left", prompt(20, seed=3), 8, close=True)
        assert isinstance(await chunk.__anext__(), TokenDelta)
        await chunk.aclose()
        for _ in range(200):
            state = await engine.call(lambda e: e.sessions["left"].state)
            if state is SessionState.FINISHED:
                break
            await asyncio.sleep(0.05)
        assert state is SessionState.FINISHED
        outputs = await engine.call(lambda e: e.sessions["left"].outputs)
        assert [len(o) for o in outputs] == [8]
    finally:
        engine.shutdown()


def test_cancelled_calls_do_not_stop_the_engine(tiny_model_dir):
    # Bounded: before the fix the engine thread died and a caller waited for ever.
    asyncio.run(asyncio.wait_for(_cancelled_calls(tiny_model_dir), timeout=120))
