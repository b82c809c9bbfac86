"""One engine instance as a Ray Serve deployment.

Our own deployment around `AsyncMarsEngine` rather than a subclass of Ray
Serve LLM's `LLMServer`: MARS drives vLLM's engine core in-process (its
scheduler's per-session records, KV strategies and load snapshot are read
directly), and Ray 2.60's LLM layer is tested against vLLM 0.29, not the
0.32 we extend; this keeps our dependence on its internals at zero.

Each instance is its own deployment (`engine-<instance id>`), so the global
scheduler can address it, and later migrate from or to it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from workers.async_engine import AsyncMarsEngine, ChunkEnd, TokenDelta
from workers.engine import AugmentedRequest, EngineConfig, MarsEngine, Segment
from workers.hints import SegmentHints
from workers.tools import ToolCall, ToolRegistry, default_registry

STARTUP_TIMEOUT_S = 600.0


class EngineInstance:
    """The deployment class; `cluster.app` wraps it with `serve.deployment`."""

    def __init__(self, instance_id: str, engine_config: dict[str, Any], tools: list[dict]):
        self.instance_id = instance_id
        self._tools = _registry(tools)
        self._engine = AsyncMarsEngine(EngineConfig.model_validate(engine_config), self._tools)
        # The replica counts as started only once its engine has: Ray Serve
        # then routes nothing to it before, and `serve run` waits for it.
        self._engine.wait_started(timeout_s=STARTUP_TIMEOUT_S)

    async def _ready(self) -> AsyncMarsEngine:
        return self._engine

    async def check_health(self) -> None:
        """Ray Serve's health probe: the engine thread must be alive."""
        if not self._engine.alive:
            raise RuntimeError(f"engine {self.instance_id} has stopped")

    async def generate(
        self,
        session_id: str,
        token_ids: list[int],
        max_tokens: int,
        hints: dict[str, Any] | None = None,
        stop_token_ids: list[int] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """One client-driven chunk; streams {"tokens": [...]} then {"end": ...}."""
        engine = await self._ready()
        async for event in engine.generate(
            session_id,
            token_ids,
            max_tokens,
            hints=SegmentHints(**(hints or {})),
            stop_token_ids=stop_token_ids or (),
        ):
            if isinstance(event, TokenDelta):
                yield {"tokens": event.token_ids}
            elif isinstance(event, ChunkEnd):
                yield {
                    "end": event.finish_reason,
                    "state": event.state.value,
                    "token_ids": event.token_ids,
                }

    async def run_plan(
        self, session_id: str, prompt_token_ids: list[int], segments: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """A session whose tool calls run here; returns its outputs and latencies."""
        engine = await self._ready()
        plan = AugmentedRequest(
            session_id,
            prompt_token_ids,
            [
                Segment(s["generate_tokens"], ToolCall(**s["call"]) if s.get("call") else None)
                for s in segments
            ],
        )
        session = await engine.run_plan(plan)
        return {
            "outputs": session.outputs,
            "ttft_s": session.ttft_s,
            "e2e_s": session.e2e_s,
            "context_tokens": session.context_tokens,
        }

    async def close(self, session_id: str) -> None:
        engine = await self._ready()
        await engine.call(lambda e: e.close_session(session_id))

    async def session_info(self, session_id: str) -> dict[str, Any]:
        """The engine's view of a session: phase, KV strategy, timeline, counters."""
        engine = await self._ready()
        return await engine.call(lambda e: _session_info(e, session_id))

    async def load(self) -> dict[str, Any]:
        engine = await self._ready()
        snapshot = await engine.call(lambda e: e.scheduler.load_snapshot())
        return {"instance_id": self.instance_id, **snapshot}


def _session_info(engine: MarsEngine, session_id: str) -> dict[str, Any]:
    session = engine.sessions.get(session_id)
    if session is None:
        raise KeyError(f"unknown session_id {session_id!r}")
    record = engine.record(session_id)
    return {
        "state": session.state.value,
        "phase": record.phase.value,
        "strategy": record.strategy.value,
        "context_tokens": session.context_tokens,
        "segments": len(session.outputs),
        "recomputed_tokens": record.recomputed_tokens,
        "swapped_out_tokens": record.swapped_out_tokens,
        "timeline": [
            {**asdict(e), "strategy": e.strategy.value if e.strategy else None}
            for e in record.timeline
        ],
    }


def _registry(tools: list[dict]) -> ToolRegistry:
    """The built-in tools plus the config's emulated ones (fixed duration and size)."""
    registry = default_registry()
    for tool in tools:
        if tool["kind"] == "emulated":
            duration, size = tool["duration_s"], tool["return_tokens"]
            base = registry.run

            def emulated(call: ToolCall, duration=duration, size=size, base=base):
                return base(ToolCall("emulated", duration_s=duration, return_tokens=size))

            registry.register(tool["name"], emulated)
    return registry
