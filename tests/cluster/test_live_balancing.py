"""The global scheduler's `balance_running` policy on a real local Ray
cluster: two vLLM engine instances on CPU, Redis for sessions, two turns
streaming on one instance while the other is idle; the policy moves one of
them there live, and both clients read every token."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cluster.ports import free_port
from tests.cluster.serving import call, read_stream, serve_app, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

MODEL = "tiny"
TOKENS = 1800
"""Each turn's length: a few seconds on the tiny model, so that the global
scheduler's loads (refreshed about once a second) show the other instance
taking sessions again while both turns still run."""
SOURCE_BELOW = 80
"""Free blocks per running turn under which an instance sheds one: two
turns on 128 blocks are under from their start (at most 64 each). The one
left behind is under too once it is long, but moving it would leave the
other instance the fuller one."""


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, redis_url: str, tmp_path_factory):
    port = free_port()
    config = tmp_path_factory.mktemp("serve") / "app.yaml"
    config.write_text(
        f"""
model: {{path: {tiny_model_dir}, name: {MODEL}}}
engine: {{num_kv_blocks: 128, max_model_len: 2048, max_num_seqs: 8}}
instances: 2
dispatch: {{policy: mars_aware}}
migration:
  policy: balance_running
  params: {{source_below: {SOURCE_BELOW}, min_gap: 0, max_moves: 1, settle_s: 600}}
  interval_s: 0.2
state_store: {{url: "{redis_url}", session_ttl_s: 600}}
http: {{port: {port}}}
"""
    )
    with serve_app(config, port, num_cpus=6) as url:
        yield url


def test_a_running_turn_moves_live_off_the_busy_instance(server: str) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    # Both turns on default-0: default-1 takes nothing new while it drains.
    assert call("POST", f"{server}/v1/instances/default-1/drain", {})[0] == 200
    wait_until(  # /ready answers 503 until the global scheduler has seen the engines
        "default-1 draining",
        lambda: call("GET", f"{server}/ready")[1].get("draining") == ["default-1"],
    )
    streams = {}
    for session in ("balanced-0", "balanced-1"):  # ids of their own: one Redis for all tests
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"{session}: a long story, please"}],
            max_tokens=TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
            extra_headers={"X-Session-Id": session},
        )
        streams[session] = iter(stream)
        next(streams[session])  # started
    # Room on default-1 again: the policy moves one turn there, not both
    # (one turn left on default-0 has room enough).
    assert call("DELETE", f"{server}/v1/instances/default-1/drain")[0] == 200
    with ThreadPoolExecutor(2) as pool:
        read = {s: pool.submit(read_stream, chunks) for s, chunks in streams.items()}
        results = {s: future.result() for s, future in read.items()}

    moved = {s: mars["moves"] for s, (_, mars, _) in results.items() if "moves" in mars}
    assert len(moved) == 1, {s: mars for s, (_, mars, _) in results.items()}
    ((session, (move,)),) = moved.items()
    assert (move["from"], move["to"]) == ("default-0", "default-1"), move
    for name, (text, mars, usage) in results.items():
        assert usage.completion_tokens == TOKENS and text, (name, mars)
        expected = "default-1" if name == session else "default-0"
        assert mars["instance_id"] == expected, (name, mars)
        assert call("GET", f"{server}/v1/sessions/{name}")[1]["instance_id"] == expected
