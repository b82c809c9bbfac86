"""Shared set-up for engine tests: build a real vLLM engine (CPU) with MARS."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from workers.engine import EngineConfig, MarsEngine
from workers.hints import SegmentHints
from workers.settings import CostOverride, SchedulerSettings
from workers.turns import SessionAction, TurnEnd, TurnEvent, TurnRequest

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


def kv_blocks(engine: MarsEngine, session_id: str) -> torch.Tensor:
    """The engine's own KV blocks of a parked session, read from the KV cache
    tensors: [layers, blocks, heads, slots, content], in block order."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    caches = get_kv_transfer_group()._kv_caches
    block_ids = parked_blocks(engine, session_id)
    index = torch.tensor(block_ids, dtype=torch.long)
    return torch.stack([caches[name].index_select(0, index).float() for name in sorted(caches)])


def parked_blocks(engine: MarsEngine, session_id: str) -> list[int]:
    """The block ids a parked session holds ([] once released)."""
    park = engine.scheduler.parks[session_id]
    if not park.holds_blocks:
        return []
    (block_ids,) = engine.scheduler.kv_cache_manager.get_block_ids(park.request.request_id)
    return list(block_ids)


def prompt(n: int, seed: int = 0) -> list[int]:
    return [10 + (seed * 31 + 7 * i) % 390 for i in range(n)]


def step_until(engine: MarsEngine, predicate, max_steps: int = 2000) -> list[TurnEvent]:
    """Step until `predicate()`; return the events the steps produced."""
    events: list[TurnEvent] = []
    for _ in range(max_steps):
        if predicate():
            return events
        events.extend(engine.step())
    raise AssertionError("condition not reached within the step budget")


def turn(
    request_id: str,
    prompt_token_ids: list[int],
    session_id: str | None = None,
    *,
    max_tokens: int = 8,
    action: SessionAction | None = None,
    hints: SegmentHints | None = None,
    **sampling,
) -> TurnRequest:
    """A greedy turn (temperature 0, EOS ignored unless `sampling` says)."""
    from vllm import SamplingParams

    sampling = {"temperature": 0.0, "ignore_eos": True, **sampling}
    if action is None:
        action = SessionAction.KEEP if session_id else SessionAction.NONE
    return TurnRequest(
        request_id,
        prompt_token_ids,
        SamplingParams(max_tokens=max_tokens, **sampling),
        session_id,
        action,
        hints or SegmentHints(),
    )


def run_turns(
    engine: MarsEngine, *turns: TurnRequest, timeout_s: float = 300
) -> dict[str, TurnEnd]:
    """Add the turns, run until idle; return each turn's end by request id."""
    for t in turns:
        engine.add_turn(t)
    events = engine.run_until_idle(timeout_s=timeout_s)
    return {e.request_id: e for e in events if isinstance(e, TurnEnd)}


def next_context(end: TurnEnd, new_tokens: list[int]) -> list[int]:
    """The session's context after `end`, plus the client's new tokens."""
    return [*end.prompt_token_ids, *end.output_token_ids, *new_tokens]
