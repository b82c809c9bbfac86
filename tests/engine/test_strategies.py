"""Preserve, discard and swap of a session's KV between its turns, on a real
vLLM engine with prefix caching on, proved by observing the engine: its
block pool, its KV tensors, the connector's copies and vLLM's own count of
the prompt tokens each turn did not compute."""

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
    next_context,
    parked_blocks,
    prompt,
    run_turns,
    step_until,
    turn,
)
from workers.hints import SegmentHints
from workers.turns import SessionAction, TurnEnd

pytestmark = pytest.mark.engine

PROMPT_TOKENS = 90
FIRST_TURN = 8
KEPT = PROMPT_TOKENS + FIRST_TURN - 1  # KV exists for all but the last sampled token
FULL_BLOCKS = KEPT // 32  # the blocks vLLM's prefix cache can hit
LONG_CALL = SegmentHints(tool="search", api_s=100.0)
INSTANT_CALL = SegmentHints(tool="search", api_s=0.0)
NEW_TOKENS = [5, 6, 7]


def _park_two(engine, hints: SegmentHints, *, runner: bool = True) -> dict[str, TurnEnd]:
    """Sessions a and b (distinct prompts, so no shared blocks) end a turn
    and wait on a call; with `runner`, a long generation keeps a batch
    running meanwhile (a swap then stalls someone, as in a busy engine)."""
    if runner:
        engine.add_turn(turn("runner", prompt(40, seed=9), max_tokens=400))
    for i, s in enumerate("ab"):
        engine.add_turn(turn(f"{s}1", prompt(PROMPT_TOKENS, seed=i), s, hints=hints))
    events = step_until(
        engine, lambda: all(engine.session_info(s).phase.value == "paused" for s in "ab")
    )
    ends = {e.request_id: e for e in events if isinstance(e, TurnEnd)}
    return {s: ends[f"{s}1"] for s in "ab"}


def _evict_free_cached_blocks(engine) -> None:
    """Run a request that needs every free block, so that the blocks freed
    by a demotion leave the prefix cache (vLLM evicts them last)."""
    free = engine.scheduler.free_blocks()
    run_turns(engine, turn("filler", prompt(32 * free - 8, seed=7), max_tokens=8))


def _resume(engine, first: dict[str, TurnEnd]) -> dict[str, TurnEnd]:
    ends = run_turns(
        engine,
        *(turn(f"{s}2", next_context(first[s], NEW_TOKENS), s, hints=INSTANT_CALL) for s in first),
    )
    return {s: ends[f"{s}2"] for s in first}


def _strategy(engine, session_id: str) -> str:
    return engine.session_info(session_id).strategy.value


def _twin_continuation(engine, first: TurnEnd) -> tuple[int, ...]:
    """The second turn computed from scratch on a cold cache: what a session
    that never paused would produce."""
    for session_id in list(engine.scheduler.parks):
        engine.end_session(session_id)
    assert engine._llm.reset_prefix_cache()
    ends = run_turns(engine, turn("twin", next_context(first, NEW_TOKENS)))
    return ends["twin"].output_token_ids


def test_preserve_keeps_the_blocks_and_the_next_turn_hits_them(tiny_model_dir):
    with mars_engine(tiny_model_dir, cost=PRESERVE_IS_CHEAP) as engine:
        first = _park_two(engine, INSTANT_CALL)
        held = {s: parked_blocks(engine, s) for s in "ab"}
        assert all(len(b) == 4 for b in held.values())  # 97 tokens in 32-token blocks
        for _ in range(5):
            engine.step()
        assert {s: parked_blocks(engine, s) for s in "ab"} == held
        assert {_strategy(engine, s) for s in "ab"} == {"preserve"}
        second = _resume(engine, first)
        for s in "ab":
            reuse = second[s].kv
            assert reuse.resumed_from.value == "preserve"
            assert reuse.cached_tokens == FULL_BLOCKS * 32  # vLLM's own count
            assert reuse.recomputed_tokens == KEPT - FULL_BLOCKS * 32  # the partial block
        events = [e.event for e in engine.record("a").timeline]
        assert events[:4] == ["queued", "scheduled", "paused", "resumed"]
        assert "demoted" not in events


def test_discard_frees_the_blocks_and_the_next_turn_recomputes_once_they_are_gone(
    tiny_model_dir,
):
    with mars_engine(
        tiny_model_dir, cost=DISCARD_IS_CHEAP, num_kv_blocks=24, max_model_len=640
    ) as engine:
        first = _park_two(engine, LONG_CALL)
        free_before = engine.scheduler.free_blocks()
        step_until(engine, lambda: "discard" in {_strategy(engine, s) for s in "ab"})
        (discarded,) = [s for s in "ab" if _strategy(engine, s) == "discard"]
        (kept,) = [s for s in "ab" if s != discarded]
        assert parked_blocks(engine, discarded) == []
        assert engine.scheduler.free_blocks() >= free_before + 4 - 1  # the runner may take one
        # The placement snapshot: 4 blocks to come back when the 100 s call returns.
        snapshot = engine.scheduler.load_snapshot()
        assert snapshot["paused_released_blocks"] == 4
        assert snapshot["paused_preserved_blocks"] == 4
        ((remaining_s, blocks),) = snapshot["paused_returns"]
        assert blocks == 4 and 90.0 < remaining_s <= LONG_CALL.api_s
        assert InstanceLoad(instance_id="i", **snapshot).paused_returns == ((remaining_s, 4),)
        preserved_kv = kv_blocks(engine, kept)[:, :FULL_BLOCKS]

        _evict_free_cached_blocks(engine)
        engine.add_turn(turn("probe", next_context(first[discarded], NEW_TOKENS), discarded))
        assert engine.record(discarded).restore_pending is True  # gone: a recompute to come
        engine.abort_turn("probe")
        second = _resume(engine, first)
        assert second[discarded].kv.resumed_from.value == "discard"
        assert second[discarded].kv.cached_tokens == 0
        assert second[discarded].kv.recomputed_tokens == KEPT
        assert engine.record(discarded).recomputed_tokens == KEPT
        assert second[kept].kv.cached_tokens == FULL_BLOCKS * 32
        # The kept session's KV was not disturbed by the other's recompute. Its
        # partial block is recomputed by its own second turn (vLLM hits full
        # blocks only), and a recompute in another batch shape is bit-equal on
        # some CPUs only (another CI machine's bf16 kernels moved a value by 0.55).
        torch.testing.assert_close(kv_blocks(engine, kept)[:, :FULL_BLOCKS], preserved_kv)
        twin = _twin_continuation(engine, first[discarded])
        assert second[discarded].output_token_ids == twin  # temperature 0


def test_a_discarded_session_whose_blocks_are_still_cached_hits_them(tiny_model_dir):
    with mars_engine(tiny_model_dir, cost=DISCARD_IS_CHEAP) as engine:
        first = _park_two(engine, LONG_CALL)
        step_until(engine, lambda: "discard" in {_strategy(engine, s) for s in "ab"})
        (discarded,) = [s for s in "ab" if _strategy(engine, s) == "discard"]
        engine.add_turn(turn("probe", next_context(first[discarded], NEW_TOKENS), discarded))
        # Priced as what it is: nothing to recompute while the cache holds it.
        assert engine.record(discarded).restore_pending is False
        engine.abort_turn("probe")
        second = _resume(engine, first)
        assert second[discarded].kv.resumed_from.value == "discard"
        assert second[discarded].kv.cached_tokens == FULL_BLOCKS * 32
        assert second[discarded].kv.recomputed_tokens == KEPT - FULL_BLOCKS * 32


def test_swap_copies_to_host_and_loads_back_byte_identical_after_eviction(tiny_model_dir):
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    with mars_engine(
        tiny_model_dir,
        cost=SWAP_IS_CHEAP,
        num_kv_blocks=24,
        max_model_len=640,
        record_kv_digests=True,
    ) as engine:
        first = _park_two(engine, LONG_CALL)
        free_before = engine.scheduler.free_blocks()
        step_until(engine, lambda: "swap" in {_strategy(engine, s) for s in "ab"})
        (swapped,) = [s for s in "ab" if _strategy(engine, s) == "swap"]
        engine.step()  # the copy-out runs; the blocks are freed at the next step
        engine.step()
        assert parked_blocks(engine, swapped) == []
        assert engine.scheduler.free_blocks() >= free_before + 4 - 1  # the runner may take one
        connector = get_kv_transfer_group()
        (record,) = connector.swap_log[swapped]
        assert record.num_blocks == 4
        assert record.bytes_copied == 4 * 32 * engine.scheduler.kv_bytes_per_token

        _evict_free_cached_blocks(engine)
        second = _resume(engine, first)
        reuse = second[swapped].kv
        assert reuse.resumed_from.value == "swap"
        assert reuse.loaded_tokens == reuse.cached_tokens == KEPT  # all of it from host
        assert reuse.recomputed_tokens == 0
        (record,) = connector.swap_log[swapped]
        assert record.in_digest == record.out_digest
        assert engine.record(swapped).swapped_in_tokens == KEPT
        assert second[swapped].output_token_ids == _twin_continuation(engine, first[swapped])


def _forget_host_copy(worker: object, key: str) -> None:
    """On a worker (`collective_rpc`): lose a session's host copy, as a
    bookkeeping bug between scheduler and worker would."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    del get_kv_transfer_group()._host[key]


def test_a_host_copy_that_cannot_be_loaded_is_recomputed_not_fatal(tiny_model_dir):
    """A copy-in that finds nothing on the worker reports its blocks as not
    loaded: vLLM recomputes them, and the engine goes on serving (it used to
    fail with a KeyError, and every request on it with it)."""
    with mars_engine(tiny_model_dir, cost=SWAP_IS_CHEAP, num_kv_blocks=24, max_model_len=640) as e:
        first = _park_two(e, LONG_CALL)
        step_until(e, lambda: "swap" in {_strategy(e, s) for s in "ab"})
        (swapped,) = [s for s in "ab" if _strategy(e, s) == "swap"]
        e.step()  # the copy-out runs; the blocks are freed at the next step
        e.step()
        e._llm.collective_rpc(_forget_host_copy, args=(swapped,))
        _evict_free_cached_blocks(e)
        second = _resume(e, first)
        assert second[swapped].kv.resumed_from.value == "swap"
        assert len(second[swapped].output_token_ids) > 0
        assert second[swapped].output_token_ids == _twin_continuation(e, first[swapped])
        assert e.scheduler.free_blocks() > 0  # and it still runs turns


def test_a_history_that_diverges_from_the_host_copy_loads_nothing(tiny_model_dir):
    """The host copy holds the KV of one context: a next turn whose prompt
    does not start with it (an edited history) must not load it."""
    with mars_engine(
        tiny_model_dir, cost=SWAP_IS_CHEAP, num_kv_blocks=24, max_model_len=640
    ) as engine:
        first = _park_two(engine, LONG_CALL)
        step_until(engine, lambda: "swap" in {_strategy(engine, s) for s in "ab"})
        (swapped,) = [s for s in "ab" if _strategy(engine, s) == "swap"]
        engine.step()
        engine.step()
        _evict_free_cached_blocks(engine)
        edited = next_context(first[swapped], NEW_TOKENS)
        edited[10] = (edited[10] + 1) % 400 + 10
        ends = run_turns(engine, turn("edited", edited, swapped, hints=INSTANT_CALL))
        assert ends["edited"].kv.loaded_tokens == 0
        assert ends["edited"].kv.cached_tokens == 0


@pytest.mark.parametrize(("host_swap_tokens", "strategy"), [(4096, "swap"), (0, "discard")])
def test_stalled_turns_are_unblocked_by_evicting_the_last_ranked_park(
    tiny_model_dir, host_swap_tokens, strategy
):
    # 9 blocks, one of them vLLM's null block: two parked 97-token sessions
    # hold 4 each, the pool is full. Their next turns need a fifth block each
    # at once; nothing runs, so vLLM has nothing to preempt and, without the
    # eviction, neither would ever run. With nothing running a swap stalls
    # no batch, so it is the eviction of choice where host space allows.
    with mars_engine(
        tiny_model_dir,
        cost=SWAP_IS_CHEAP,
        num_kv_blocks=9,
        max_model_len=256,
        host_swap_tokens=host_swap_tokens,
    ) as engine:
        first = _park_two(engine, INSTANT_CALL, runner=False)
        assert engine.scheduler.free_blocks() == 0
        for s in "ab":  # 97 + 40 tokens: more blocks than are free
            engine.add_turn(turn(f"{s}2", next_context(first[s], prompt(40, seed=3)), s))
        engine.step()  # nothing can be scheduled
        assert engine.scheduler.last_scheduled_tokens == 0
        events = engine.run_until_idle(timeout_s=120)
        ends = {e.request_id: e for e in events if isinstance(e, TurnEnd)}
        assert set(ends) == {"a2", "b2"}

        evictions = sorted(
            (e.t, s, e.strategy.value)
            for s in "ab"
            for e in engine.record(s).timeline
            if e.detail.startswith("evicted")
        )
        # FCFS (infercept): the later arrival ranks last and gives way first
        # (a's park of its second turn may be evicted later, for b's turn).
        assert evictions[0][1:] == ("b", strategy)


def test_ending_a_session_frees_its_kv(tiny_model_dir):
    with mars_engine(tiny_model_dir, cost=PRESERVE_IS_CHEAP) as engine:
        free = engine.scheduler.free_blocks()
        first = _park_two(engine, INSTANT_CALL, runner=False)
        assert engine.scheduler.free_blocks() == free - 8
        engine.end_session("a")
        ends = run_turns(
            engine, turn("b2", next_context(first["b"], NEW_TOKENS), "b", action=SessionAction.END)
        )
        assert ends["b2"].kv.resumed_from.value == "preserve"
        assert engine.scheduler.free_blocks() == free
        assert engine.scheduler.parks == {}
        assert {engine.session_info(s).phase.value for s in "ab"} == {"finished"}
