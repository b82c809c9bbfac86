"""Shared set-up for engine tests: build a real vLLM engine (CPU) with MARS."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from workers.engine import EngineConfig, MarsEngine
from workers.settings import CostOverride, SchedulerSettings

# Fixed costs keep strategy choices predictable in tests; profiling has its own test.
SWAP_IS_CHEAP = CostOverride(iter_fixed_s=0.01, iter_per_token_s=1e-3, swap_s_per_token=1e-9)
DISCARD_IS_CHEAP = CostOverride(iter_fixed_s=1e-6, iter_per_token_s=1e-9, swap_s_per_token=10.0)
# Recompute and copies so slow that holding the KV wins for any call under minutes.
PRESERVE_IS_CHEAP = CostOverride(iter_fixed_s=1.0, iter_per_token_s=1.0, swap_s_per_token=1.0)


@contextmanager
def mars_engine(model: Path, policy: str = "infercept", **overrides):
    scheduler_keys = {"cost", "policy_params", "predictor"}
    scheduler = SchedulerSettings(
        policy=policy, **{k: v for k, v in overrides.items() if k in scheduler_keys}
    )
    engine_args = {k: v for k, v in overrides.items() if k not in scheduler_keys}
    engine_args.setdefault("num_kv_blocks", 64)
    engine_args.setdefault("max_model_len", 1024)
    engine_args.setdefault("profile_costs", False)
    if scheduler.cost is None and not engine_args["profile_costs"]:
        scheduler = scheduler.model_copy(update={"cost": SWAP_IS_CHEAP})
    engine = MarsEngine(EngineConfig(model=str(model), scheduler=scheduler, **engine_args))
    try:
        yield engine
    finally:
        engine.shutdown()


def kv_blocks(engine: MarsEngine, request_id: str) -> torch.Tensor:
    """The engine's own KV blocks of a request, read from the KV cache tensors:
    [layers, blocks, heads, slots, content], in the request's block order."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    caches = get_kv_transfer_group()._kv_caches
    (block_ids,) = engine.scheduler.kv_cache_manager.get_block_ids(request_id)
    index = torch.tensor(block_ids, dtype=torch.long)
    return torch.stack([caches[name].index_select(0, index).float() for name in sorted(caches)])


def values_of(engine: MarsEngine, request_id: str, num_tokens: int) -> torch.Tensor:
    """Per-token V vectors of the first `num_tokens` tokens: [layers, tokens, heads, dim].

    vLLM's CPU attention stores each block as a K region then a V region of
    slots x head_dim per head; V is token-major, K is packed across slots by
    the kernel, so K is compared block by block (`kv_blocks`) instead.
    """
    blocks = kv_blocks(engine, request_id)
    layers, num_blocks, heads, slots, content = blocks.shape
    regions = blocks.reshape(layers, num_blocks, heads, 2, slots, content // 2)
    values = regions[:, :, :, 1].permute(0, 1, 3, 2, 4)  # [L, blocks, slots, heads, dim]
    return values.reshape(layers, num_blocks * slots, heads, content // 2)[:, :num_tokens]


def prompt(n: int, seed: int = 0) -> list[int]:
    return [10 + (seed * 31 + 7 * i) % 390 for i in range(n)]


def step_until(engine: MarsEngine, predicate, max_steps: int = 2000) -> None:
    for _ in range(max_steps):
        if predicate():
            return
        engine.step()
    raise AssertionError("condition not reached within the step budget")
