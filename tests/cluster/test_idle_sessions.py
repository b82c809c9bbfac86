"""A session whose client never comes back is closed on its engine once it
has waited `session_ttl_s`: real Ray Serve and a vLLM CPU engine."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from cluster.ports import free_port

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SESSION_TTL_S = 2.0


async def _pause_then_watch(app_name: str) -> tuple[str, float]:
    """Run a session's turn, then watch the session on the engine: its phase
    once it stops waiting for its next turn, and how long after the turn.
    Serve is shut down on this loop too: in Serve's throughput mode a
    handle's router lives on the loop that first used it."""
    from ray import serve

    try:
        return await _watch(serve.get_deployment_handle("engine-default-0", app_name=app_name))
    finally:
        await serve.shutdown_async()


async def _watch(engine) -> tuple[str, float]:
    from vllm import SamplingParams

    from workers.turns import SessionAction, TurnEnd, TurnRequest

    turn = TurnRequest(
        "idle-1-t1",
        [1, 40, 41, 42, 43],
        SamplingParams(max_tokens=2, temperature=0.0),
        "idle-1",
        SessionAction.KEEP,
    )
    async for batch in engine.options(stream=True).generate.remote(turn):
        last = batch[-1]
    assert isinstance(last, TurnEnd)
    paused_at = time.monotonic()
    phase = (await engine.session_info.remote("idle-1")).phase.value
    assert phase == "paused"
    while phase == "paused" and time.monotonic() < paused_at + 30:
        await asyncio.sleep(0.2)
        phase = (await engine.session_info.remote("idle-1")).phase.value
    return phase, time.monotonic() - paused_at


def test_an_idle_session_is_closed_on_its_engine_after_the_ttl(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import ray
    from ray import serve

    from cluster.app import build_app

    port = free_port()
    config = tmp_path / "app.yaml"
    config.write_text(
        f"""
model: {{path: {tiny_model_dir}, name: tiny}}
engine: {{num_kv_blocks: 32, max_model_len: 512, max_num_seqs: 8}}
policy: {{name: mars}}
instances: 1
state_store: {{session_ttl_s: {SESSION_TTL_S}}}
http: {{port: {port}}}
"""
    )
    context = ray.init(num_cpus=8, include_dashboard=False, ignore_reinit_error=True)
    session_dir = context.address_info["session_dir"]
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"config": str(config)}), name="idle", route_prefix="/")
        state, waited = asyncio.run(_pause_then_watch("idle"))
    finally:
        ray.shutdown()
    assert state == "finished", f"still {state} after {waited:.1f} s"
    assert waited >= SESSION_TTL_S
    # The engine replica's own log says so (vLLM once closed its log handler).
    logs = Path(session_dir, "logs", "serve").glob("replica_idle_engine-default-0_*.log")
    text = "".join(log.read_text() for log in logs)
    assert "closed idle session=idle-1 instance=default-0" in text, text[-2000:]
