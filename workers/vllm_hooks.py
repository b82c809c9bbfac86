"""Every private vLLM 0.32 internal that mars-serve reaches, in one module.

The MARS scheduler subclasses vLLM's `Scheduler` through its public hook
(`scheduler_cls`) and overrides its narrow methods; what it needs beyond
them (freeing the blocks of a finished request whose free it delayed,
reading the prefix cache without touching it, block reference counts) is
here, so that a vLLM upgrade touches one file. Each function has a contract
test on a real engine (`tests/engine/test_vllm_hooks.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.kv_cache_utils import BlockHash, KVCacheBlock
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.request import Request


def free_delayed_blocks(scheduler: Scheduler, request: Request) -> None:
    """Free the blocks of a finished request whose free was delayed
    (`_free_request(..., delay_free_blocks=True)`) and forget the request:
    what vLLM does when a connector reports the request's transfer done.
    The blocks go back to the free queue with their prefix-cache hashes, so
    a later request may still hit them until they are reused."""
    scheduler._free_blocks(request)


def block_ids(manager: KVCacheManager, request_id: str) -> list[int]:
    """The request's KV block ids, in order (one KV cache group)."""
    (ids,) = manager.get_block_ids(request_id)
    return list(ids)


def ref_counts(manager: KVCacheManager, ids: list[int]) -> list[int]:
    """How many requests hold each block (a prefix shared by several
    requests is one block held several times)."""
    blocks = manager.block_pool.blocks
    return [blocks[i].ref_cnt for i in ids]


def cached_prefix(manager: KVCacheManager, request: Request) -> tuple[int, int]:
    """(tokens, blocks in the free queue) of the longest prefix of `request`
    that the prefix cache holds now, read without taking the blocks: the
    tokens a schedule would not compute, and how many of those blocks are
    unreferenced (they leave the free pool when the request takes them)."""
    if not manager.enable_caching or not request.block_hashes:
        return 0, 0
    blocks, tokens = manager.coordinator.find_longest_cache_hit(
        request.block_hashes, request.num_tokens - 1
    )[:2]
    (group,) = blocks
    return tokens, sum(1 for block in group if block.ref_cnt == 0)


def prefill_reuse(request: Request) -> tuple[int, int] | None:
    """(cached tokens, of which loaded by the connector) of a request's
    first schedule, from vLLM's own prefill statistics; None once vLLM has
    handed them to its output (read them right after `schedule`)."""
    stats = request.prefill_stats
    if stats is None or not stats.num_prompt_tokens:
        return None
    return stats.num_cached_tokens, stats.num_external_cached_tokens


def num_free_blocks(manager: KVCacheManager) -> int:
    return manager.block_pool.get_num_free_blocks()


def take_free_blocks(manager: KVCacheManager, count: int) -> list[KVCacheBlock]:
    """Take `count` blocks from the free queue for a caller that writes them
    itself (a moving request's KV, before the request exists here); each is
    held once, evicting any prefix-cache entry it had. ValueError when
    fewer are free."""
    return manager.block_pool.get_new_blocks(count)


def cache_written_blocks(
    manager: KVCacheManager,
    block_hasher: Callable[[Request], list[BlockHash]],
    token_ids: list[int],
    blocks: list[KVCacheBlock],
    already_cached: int,
    block_size: int,
) -> None:
    """Enter `blocks[already_cached:]`, full and holding the KV of
    `token_ids` (block `i` the tokens `i * block_size` on), into the prefix
    cache under the hashes vLLM gives those tokens, so that a request with
    that prefix hits them as it would hit its own. The hashes are the
    engine core's (`request_block_hasher`), computed on a request that is
    never scheduled."""
    from vllm import SamplingParams
    from vllm.v1.request import Request as VllmRequest

    probe = VllmRequest(
        "mars-written-blocks",
        token_ids,
        SamplingParams(max_tokens=1),
        None,
        block_hasher=block_hasher,
    )
    manager.block_pool.cache_full_blocks(
        probe,
        blocks,
        num_cached_blocks=already_cached,
        num_full_blocks=len(blocks),
        block_size=block_size,
        kv_cache_group_id=0,
    )


def give_back_blocks(manager: KVCacheManager, blocks: list[KVCacheBlock]) -> None:
    """Drop the holds of `take_free_blocks`: cached blocks join the free
    queue's tail (the prefix cache keeps them until they are reused), the
    others its head."""
    manager.block_pool.free_blocks(blocks)


def request_block_hasher(engine_core: EngineCore) -> Callable[[Request], list[BlockHash]]:
    """The block hasher the engine core gives every request (prefix caching
    or a KV connector on: always, in mars-serve)."""
    hasher = engine_core.request_block_hasher
    if hasher is None:
        raise RuntimeError("the engine core hashes no blocks: prefix caching and connector off")
    return hasher
