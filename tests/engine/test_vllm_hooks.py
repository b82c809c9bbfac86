"""Contract tests of the vLLM internals mars-serve reaches (`workers.vllm_hooks`):
each fails if a vLLM upgrade changes what the scheduler relies on."""

from __future__ import annotations

import pytest

from tests.engine.helpers import mars_engine, next_context, prompt, run_turns, turn
from workers import vllm_hooks

pytestmark = pytest.mark.engine


def test_the_hooks_read_and_free_what_vllm_holds(tiny_model_dir):
    with mars_engine(tiny_model_dir) as engine:
        scheduler, manager = engine.scheduler, engine.scheduler.kv_cache_manager
        free = vllm_hooks.num_free_blocks(manager)
        first = run_turns(engine, turn("a1", prompt(90), "a"))["a1"]
        park = scheduler.parks["a"]
        ids = vllm_hooks.block_ids(manager, park.request.request_id)
        assert len(ids) == 4 and vllm_hooks.num_free_blocks(manager) == free - 4
        assert vllm_hooks.ref_counts(manager, ids) == [1, 1, 1, 1]

        # A waiting request on the same context: the cache holds 3 full blocks,
        # all referenced (by the park), and reading them takes nothing.
        engine.add_turn(turn("probe", next_context(first, [5, 6, 7])))
        (probe,) = list(scheduler.waiting)
        assert vllm_hooks.cached_prefix(manager, probe) == (96, 0)
        assert vllm_hooks.ref_counts(manager, ids) == [1, 1, 1, 1]
        engine.step()
        assert vllm_hooks.ref_counts(manager, ids)[:3] == [2, 2, 2]  # shared, not copied
        engine.run_until_idle(timeout_s=60)

        vllm_hooks.free_delayed_blocks(scheduler, park.request)
        park.holds_blocks = False
        assert park.request.request_id not in scheduler.requests
        assert vllm_hooks.num_free_blocks(manager) == free


def test_prefill_reuse_is_vllms_own_count_of_the_tokens_not_computed(tiny_model_dir):
    with mars_engine(tiny_model_dir) as engine:
        shared = prompt(100, seed=4)
        run_turns(engine, turn("x", [*shared, 1, 2]))
        engine.add_turn(turn("y", [*shared, 3, 4]))
        (request,) = list(engine.scheduler.waiting)
        assert vllm_hooks.prefill_reuse(request) is None  # not scheduled yet
        engine.step()
        # Read by the scheduler right after the schedule, before vLLM hands it on.
        reuse = engine.record(request.request_id).reuse
        assert (reuse.cached_tokens, reuse.loaded_tokens) == (96, 0)
        engine.run_until_idle(timeout_s=60)


def test_blocks_taken_written_and_cached_are_hit_by_a_request_with_that_prefix(tiny_model_dir):
    """A moving request's stages go into blocks the scheduler takes itself
    and enters in the prefix cache under vLLM's own hashes. Run alone, this
    is also the engine's first request after start-up with a few tokens
    over a cached prefix (`workers.profiling.warm_up`)."""
    with mars_engine(tiny_model_dir) as engine:
        manager = engine.scheduler.kv_cache_manager
        free = vllm_hooks.num_free_blocks(manager)
        context = prompt(100, seed=8)
        blocks = vllm_hooks.take_free_blocks(manager, 3)
        assert vllm_hooks.num_free_blocks(manager) == free - 3
        hasher = vllm_hooks.request_block_hasher(engine._core)
        vllm_hooks.cache_written_blocks(manager, hasher, context[:96], blocks, 0, 32)
        engine.add_turn(turn("probe", context))
        (probe,) = list(engine.scheduler.waiting)
        assert vllm_hooks.cached_prefix(manager, probe) == (96, 0)  # held: none in the free queue
        vllm_hooks.give_back_blocks(manager, blocks)
        assert vllm_hooks.cached_prefix(manager, probe) == (96, 3)
        assert vllm_hooks.num_free_blocks(manager) == free
        engine.step()
        assert engine.record(probe.request_id).reuse.cached_tokens == 96
        engine.run_until_idle(timeout_s=60)
