"""Generated agent workloads, beyond the INFERCEPT traces.

An agent session here is what a tool-using assistant produces: a system
prompt with the tool definitions (the same for every session, so a prefix
cache can share it), a user request, then 1 to 12 rounds of "write a little,
call a tool, read its result", and a final answer. Tools differ in how long
they take (a calculator answers in milliseconds, a search in about a second,
code execution in seconds, a human in up to a minute) and in how much they
return (a number, or a page of search results).

Pure Python and seeded, like `bench.workload`: the same seed gives the same
sessions, so every system in one benchmark run replays the same work. The
output is `TraceRequest`s (with tool names and the shared prefix), which the
engine and HTTP benchmarks scale, sample and replay as they do the traces.

    from bench.generated_workload import generate_sessions
    requests = generate_sessions(400, seed=0)
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.workload import TraceRequest, TraceSegment, load_trace

GENERATED_WORKLOADS = ("agent_mix",)
"""The generated workloads the benchmarks know by name."""
GENERATED_POOL = 400
"""Sessions a generated workload draws before sampling (as many as a trace holds)."""
TRACE_DIR = Path(__file__).resolve().parent / "data" / "infercept"


@dataclass(frozen=True)
class ToolKind:
    """One kind of tool: its call duration and result length are drawn
    log-uniformly from these closed ranges; `weight` is how often an agent
    picks it."""

    name: str
    duration_s: tuple[float, float]
    result_tokens: tuple[int, int]
    weight: float


TOOL_KINDS: tuple[ToolKind, ...] = (
    ToolKind("calculator", (0.001, 0.02), (4, 24), 3.0),
    ToolKind("database", (0.02, 0.5), (20, 160), 2.0),
    ToolKind("search", (0.3, 3.0), (80, 400), 3.0),
    ToolKind("code", (1.0, 10.0), (16, 240), 2.0),
    ToolKind("human", (10.0, 60.0), (8, 96), 1.0),
)


@dataclass(frozen=True)
class AgentMix:
    """The shape of the `agent_mix` workload (full-scale token counts)."""

    system_prompt_tokens: int = 384
    """Tool definitions and instructions, shared by every session."""
    user_prompt_tokens: tuple[int, int] = (24, 480)
    calls: tuple[int, int] = (1, 12)
    tokens_before_call: tuple[int, int] = (12, 96)
    """What the model writes before each call (its reasoning and the call)."""
    answer_tokens: tuple[int, int] = (32, 320)
    tools: tuple[ToolKind, ...] = TOOL_KINDS


def _log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def _tokens(rng: random.Random, bounds: tuple[int, int]) -> int:
    return max(1, round(_log_uniform(rng, *bounds)))


def generate_session(rng: random.Random, request_id: str, mix: AgentMix) -> TraceRequest:
    """One agent session drawn from `rng`."""
    calls = rng.randint(*mix.calls)
    weights = [tool.weight for tool in mix.tools]
    segments = []
    for _ in range(calls):
        tool = rng.choices(mix.tools, weights)[0]
        segments.append(
            TraceSegment(
                _tokens(rng, mix.tokens_before_call),
                _log_uniform(rng, *tool.duration_s),
                _tokens(rng, tool.result_tokens),
                tool.name,
            )
        )
    segments.append(TraceSegment(_tokens(rng, mix.answer_tokens), None, 0))
    prompt = mix.system_prompt_tokens + _tokens(rng, mix.user_prompt_tokens)
    return TraceRequest(request_id, prompt, tuple(segments), mix.system_prompt_tokens)


def generate_sessions(n: int, seed: int, mix: AgentMix | None = None) -> list[TraceRequest]:
    """`n` sessions of the `agent_mix` workload, drawn with `seed`."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    rng = random.Random(f"agent_mix:{seed}")
    mix = mix or AgentMix()
    return [generate_session(rng, f"agent-{i:04d}", mix) for i in range(n)]


def workload_source(
    name: str, seed: int, count_tokens: Callable[[str], int] | None = None
) -> tuple[str, list[TraceRequest]]:
    """(name, requests) of a workload the benchmarks replay: a generated one
    (`GENERATED_WORKLOADS`, its sessions drawn with `seed`), an INFERCEPT
    trace by name (`bench/data/infercept/<name>.json`), or a trace file
    (a .json path; its text-form segments counted with `count_tokens`)."""
    if name in GENERATED_WORKLOADS:
        return name, generate_sessions(GENERATED_POOL, seed)
    path = Path(name)
    if path.suffix == ".json" and path.exists():
        return path.stem, load_trace(path, count_tokens)
    return name, load_trace(TRACE_DIR / f"{name}.json", count_tokens)
