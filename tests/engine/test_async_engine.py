"""`AsyncMarsEngine`: concurrent turns from an event loop, streamed outputs,
resumed sessions, server-side plans, errors handed back to the caller."""

from __future__ import annotations

import asyncio
import time

import pytest
from vllm.exceptions import VLLMValidationError

from tests.engine.helpers import SWAP_IS_CHEAP, next_context, prompt, turn
from workers.async_engine import AsyncMarsEngine
from workers.engine import AugmentedRequest, EngineConfig, PlanState, Segment
from workers.settings import SchedulerSettings
from workers.tools import ToolCall
from workers.turns import TurnEnd, TurnOutput

pytestmark = pytest.mark.engine


async def _run(engine, t):
    deltas, end = [], None
    async for batch in engine.generate(t):
        assert batch and end is None  # nothing after the end of the turn
        for event in batch:
            if isinstance(event, TurnOutput):
                deltas.extend(event.output.outputs[0].token_ids)
            else:
                assert isinstance(event, TurnEnd)
                end = event
    return deltas, end


def _streamed(request_id, tokens, session=None, max_tokens=6):
    from vllm.sampling_params import RequestOutputKind

    return turn(
        request_id, tokens, session, max_tokens=max_tokens, output_kind=RequestOutputKind.DELTA
    )


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
            _run(engine, _streamed("a1", prompt(50), "a", 6)),
            _run(engine, _streamed("b1", prompt(70, seed=4), None, 9)),
        )
        assert (len(a_tokens), len(b_tokens)) == (6, 9)
        assert list(a_end.output_token_ids) == a_tokens and list(b_end.output_token_ids) == b_tokens
        assert a_end.finish_reason == "length"

        resumed, end = await _run(engine, _streamed("a2", next_context(a_end, [5, 6, 7]), "a", 4))
        assert len(resumed) == 4
        assert end.kv.resumed_from.value == "preserve" and end.kv.cached_tokens == 32
        events = await engine.call(lambda e: [x.event for x in e.record("a").timeline])
        assert events.count("resumed") == 1 and events.count("paused") == 2

        plan = AugmentedRequest(
            "plan",
            prompt(40, seed=5),
            [Segment(5, ToolCall("emulated", duration_s=0.2, return_tokens=7)), Segment(5)],
        )
        session = await engine.run_plan(plan)
        assert session.state is PlanState.FINISHED
        assert [len(o) for o in session.outputs] == [5, 5]

        await engine.call(lambda e: e.end_session("a"))
        with pytest.raises(VLLMValidationError, match="maximum context length"):
            await _run(engine, _streamed("c", prompt(1100)))
        assert engine.alive
    finally:
        engine.shutdown()


def test_async_engine_serves_concurrent_turns(tiny_model_dir):
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
        calls.append(asyncio.ensure_future(_run(engine, _streamed("gone", prompt(20), None, 4))))
        await asyncio.sleep(0.05)
        for call in calls:
            call.cancel()
        await busy
        await asyncio.gather(*calls, return_exceptions=True)
        # The engine survived its callers' cancellations and still serves.
        tokens, end = await _run(engine, _streamed("after", prompt(30, seed=2), None, 3))
        assert len(tokens) == 3 and end.finish_reason == "length"
        assert engine.alive

        # A session turn whose caller leaves after its first output is aborted;
        # the session's KV is kept for its next turn, nothing is left running.
        stream = engine.generate(_streamed("left", prompt(40, seed=3), "s", 200))
        assert isinstance((await stream.__anext__())[0], TurnOutput)
        await stream.aclose()
        for _ in range(200):
            phase = await engine.call(lambda e: e.session_info("s").phase.value)
            if phase == "paused":
                break
            await asyncio.sleep(0.05)
        assert phase == "paused"
        assert await engine.call(lambda e: e.scheduler.get_num_unfinished_requests()) == 0
    finally:
        engine.shutdown()


async def _busy_engine_takes_new_work(model_dir):
    engine = AsyncMarsEngine(
        EngineConfig(
            model=str(model_dir), num_kv_blocks=64, max_model_len=1024, profile_costs=False
        )
    )
    try:
        await engine.ready()
        long = engine.generate(_streamed("long", prompt(30), None, 600))
        await long.__anext__()  # it runs
        # A call and a second turn are taken between two steps of the long
        # turn, not once the engine has nothing left to do.
        blocks = await engine.call(lambda e: e.scheduler.free_blocks())
        short, end = await _run(engine, _streamed("short", prompt(20, seed=9), None, 3))
        running = await engine.call(lambda e: e.scheduler.get_num_unfinished_requests())
        assert blocks > 0 and len(short) == 3 and end.finish_reason == "length"
        assert running == 1, "the long turn must still be running"
        await long.aclose()
    finally:
        engine.shutdown()


def test_a_busy_engine_takes_calls_and_turns_between_its_steps(tiny_model_dir):
    asyncio.run(asyncio.wait_for(_busy_engine_takes_new_work(tiny_model_dir), timeout=120))


def test_cancelled_calls_and_callers_that_leave_do_not_stop_the_engine(tiny_model_dir):
    # Bounded: an engine thread that died would leave a caller waiting for ever.
    asyncio.run(asyncio.wait_for(_cancelled_calls(tiny_model_dir), timeout=120))
