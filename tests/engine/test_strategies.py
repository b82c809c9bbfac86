"""Preserve, discard and swap on a real vLLM engine, proved by observing the
engine: its block pool, its block tables, its KV tensors and what it computes."""

from __future__ import annotations

import pytest
import torch

from policies import InstanceLoad
from tests.engine.helpers import (
    DISCARD_IS_CHEAP,
    PRESERVE_IS_CHEAP,
    SWAP_IS_CHEAP,
    kv_blocks,
    mars_engine,
    prompt,
    step_until,
    values_of,
)
from workers.engine import AugmentedRequest, Segment, SessionState
from workers.hints import SegmentHints

pytestmark = pytest.mark.engine

PROMPT_TOKENS = 90
FIRST_CHUNK = 8
FRONTIER = PROMPT_TOKENS + FIRST_CHUNK - 1  # the chunk's last sampled token is not kept
LONG_CALL = SegmentHints(tool="search", api_s=100.0)
INSTANT_CALL = SegmentHints(tool="search", api_s=0.0)


def _background_runner(engine) -> None:
    """A long generation that keeps the engine stepping while sessions pause."""
    engine.submit(AugmentedRequest("runner", prompt(40, seed=9), [Segment(400)]))


def _pause_two(engine, hints: SegmentHints):
    sessions = [
        engine.open_session(name, prompt(PROMPT_TOKENS), FIRST_CHUNK, hints) for name in "ab"
    ]
    while any(s.state is not SessionState.AWAITING_CLIENT for s in sessions):
        engine.step()
    return sessions


def _blocks(engine, session) -> list[int]:
    (block_ids,) = engine.scheduler.kv_cache_manager.get_block_ids(session.engine_request_id)
    return block_ids


def _demoted(engine, sessions, strategy: str):
    return [s for s in sessions if engine.record(s.session_id).strategy.value == strategy]


def _resume_both(engine, sessions) -> None:
    for s in sessions:
        engine.continue_session(s.session_id, [5, 6, 7], 8, INSTANT_CALL)
    while any(s.state is not SessionState.AWAITING_CLIENT for s in sessions):
        engine.step()


def test_swap_copies_blocks_to_host_frees_them_and_reloads_byte_identical(tiny_model_dir):
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    with mars_engine(tiny_model_dir, cost=SWAP_IS_CHEAP) as engine:
        _background_runner(engine)
        sessions = _pause_two(engine, LONG_CALL)
        held = {s.session_id: list(_blocks(engine, s)) for s in sessions}
        assert all(len(b) == 4 for b in held.values())  # 97 tokens in 32-token blocks
        free_before = engine.scheduler.free_blocks()
        for _ in range(3):  # demote, copy out, free
            engine.step()
        (swapped,) = _demoted(engine, sessions, "swap")
        (kept,) = _demoted(engine, sessions, "preserve")
        assert _blocks(engine, swapped) == []
        assert _blocks(engine, kept) == held[kept.session_id]
        assert engine.scheduler.free_blocks() >= free_before + 4 - 1  # runner may take one
        connector = get_kv_transfer_group()
        (record,) = connector.swap_log[swapped.engine_request_id]
        assert record.num_blocks == 4
        assert record.bytes_copied == 4 * 32 * engine.scheduler.kv_bytes_per_token

        _resume_both(engine, sessions)
        (record,) = connector.swap_log[swapped.engine_request_id]
        assert record.in_digest == record.out_digest
        assert engine.record(swapped.session_id).swapped_in_tokens == FRONTIER
        assert engine.record(swapped.session_id).recomputed_tokens == 0
        assert swapped.outputs == kept.outputs  # temperature 0: token-identical


def test_discard_frees_blocks_and_recomputes_the_context(tiny_model_dir):
    with mars_engine(tiny_model_dir, cost=DISCARD_IS_CHEAP) as engine:
        _background_runner(engine)
        sessions = _pause_two(engine, LONG_CALL)
        free_before = engine.scheduler.free_blocks()
        engine.step()
        (discarded,) = _demoted(engine, sessions, "discard")
        (kept,) = _demoted(engine, sessions, "preserve")
        assert _blocks(engine, discarded) == []
        assert engine.scheduler.free_blocks() >= free_before + 4 - 1
        # The placement snapshot: 4 blocks to come back when the 100 s call returns.
        snapshot = engine.scheduler.load_snapshot()
        assert snapshot["paused_released_blocks"] == 4
        ((remaining_s, blocks),) = snapshot["paused_returns"]
        assert blocks == 4
        assert 90.0 < remaining_s <= LONG_CALL.api_s
        assert InstanceLoad(instance_id="i", **snapshot).paused_returns == ((remaining_s, 4),)

        _resume_both(engine, sessions)
        record = engine.record(discarded.session_id)
        assert record.frontier_tokens == FRONTIER
        assert record.recomputed_tokens == FRONTIER
        assert engine.record(kept.session_id).recomputed_tokens == 0
        assert discarded.outputs == kept.outputs
        # Whole blocks the context fills (K and V), and V of every context token.
        full = FRONTIER // 32
        torch.testing.assert_close(
            kv_blocks(engine, discarded.engine_request_id)[:, :full],
            kv_blocks(engine, kept.engine_request_id)[:, :full],
            atol=3e-2,
            rtol=3e-2,
        )
        torch.testing.assert_close(
            values_of(engine, discarded.engine_request_id, FRONTIER),
            values_of(engine, kept.engine_request_id, FRONTIER),
            atol=3e-2,
            rtol=3e-2,
        )


def test_preserve_keeps_blocks_through_a_short_call(tiny_model_dir):
    with mars_engine(tiny_model_dir, cost=PRESERVE_IS_CHEAP) as engine:
        _background_runner(engine)
        sessions = _pause_two(engine, INSTANT_CALL)
        held = {s.session_id: list(_blocks(engine, s)) for s in sessions}
        for _ in range(5):
            engine.step()
        for s in sessions:
            assert _blocks(engine, s) == held[s.session_id]
            assert engine.record(s.session_id).strategy.value == "preserve"
        events = [e.event for e in engine.record("a").timeline]
        assert events[:3] == ["queued", "scheduled", "paused"]
        assert "demoted" not in events


@pytest.mark.parametrize(("host_swap_tokens", "strategy"), [(4096, "swap"), (0, "discard")])
def test_stalled_kv_holders_are_broken_by_evicting_the_last_ranked(
    tiny_model_dir, host_swap_tokens, strategy
):
    # 9 blocks, one of them vLLM's null block: two paused 97-token sessions
    # hold 4 each, the pool is full. Resumed, each needs a fifth block at
    # once; nothing runs, so vLLM has nothing to preempt and, without the
    # eviction, neither would ever run. With nothing running a swap stalls
    # no batch, so it is the eviction of choice where host space allows.
    with mars_engine(
        tiny_model_dir,
        cost=SWAP_IS_CHEAP,
        num_kv_blocks=9,
        max_model_len=256,
        host_swap_tokens=host_swap_tokens,
    ) as engine:
        sessions = _pause_two(engine, INSTANT_CALL)
        assert engine.scheduler.free_blocks() == 0
        for s in sessions:
            # 97 + 40 tokens: a fifth block before the first new token is computed.
            engine.continue_session(s.session_id, prompt(40, seed=3), 16, INSTANT_CALL)
        engine.step()  # nothing can be scheduled
        assert engine.scheduler.last_scheduled_tokens == 0
        step_until(
            engine,
            lambda: all(s.state is SessionState.AWAITING_CLIENT for s in sessions),
            max_steps=20_000,  # idle steps are fast; a demotion waits for its call to age
        )
        first, last = sessions  # FCFS (infercept): the later arrival ranks last

        def evictions(session):
            timeline = engine.record(session.session_id).timeline
            return [e.strategy.value for e in timeline if e.detail.startswith("evicted")]

        assert evictions(last) == [strategy]
        assert evictions(first) == []
        assert last.outputs == first.outputs  # temperature 0: the eviction lost nothing
