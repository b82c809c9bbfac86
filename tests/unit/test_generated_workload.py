"""bench.generated_workload: agent sessions drawn from a seed, with tools of
several kinds and a system prompt every session shares."""

from __future__ import annotations

import pytest

from bench.generated_workload import TOOL_KINDS, AgentMix, generate_sessions
from bench.workload import build_workload


def test_the_same_seed_draws_the_same_sessions() -> None:
    assert generate_sessions(20, seed=3) == generate_sessions(20, seed=3)
    assert generate_sessions(20, seed=3) != generate_sessions(20, seed=4)


def test_sessions_stay_within_the_mix() -> None:
    mix = AgentMix()
    kinds = {tool.name: tool for tool in TOOL_KINDS}
    sessions = generate_sessions(300, seed=0, mix=mix)
    calls = [len(s.segments) - 1 for s in sessions]
    assert min(calls) == mix.calls[0] and max(calls) == mix.calls[1]
    seen = set()
    for session in sessions:
        assert session.shared_prefix_tokens == mix.system_prompt_tokens
        assert session.prompt_tokens > mix.system_prompt_tokens
        *called, last = session.segments
        assert last.api_time_s is None and last.tool is None and last.api_return_tokens == 0
        for segment in called:
            kind = kinds[segment.tool]
            seen.add(kind.name)
            low, high = kind.duration_s
            assert low <= segment.api_time_s <= high
            assert kind.result_tokens[0] <= segment.api_return_tokens <= kind.result_tokens[1]
    assert seen == set(kinds)
    # Durations from milliseconds to a minute.
    durations = [s.api_time_s for session in sessions for s in session.segments[:-1]]
    assert min(durations) < 0.01 and max(durations) > 30


def test_scaling_keeps_the_tools_and_scales_the_shared_prefix() -> None:
    sessions = generate_sessions(10, seed=1)
    scaled, dropped = build_workload(sessions, token_scale=0.25, api_scale=0.1, seed=0)
    assert dropped == 0
    for session in scaled:
        assert session.shared_prefix_tokens == 96  # 384 * 0.25
        assert all(s.tool for s in session.segments[:-1])


def test_a_bad_count_is_refused() -> None:
    with pytest.raises(ValueError, match="n must be a positive integer"):
        generate_sessions(0, seed=0)


def test_workload_source_knows_generated_workloads_and_traces() -> None:
    from bench.generated_workload import GENERATED_POOL, workload_source

    name, sessions = workload_source("agent_mix", seed=2)
    assert name == "agent_mix" and sessions == generate_sessions(GENERATED_POOL, seed=2)
    name, requests = workload_source(
        "multi_api", seed=2, count_tokens=lambda text: len(text.split())
    )
    assert name == "multi_api" and len(requests) == 397
    assert all(r.shared_prefix_tokens == 0 for r in requests)
