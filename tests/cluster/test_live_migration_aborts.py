"""A live move whose destination cannot take the turn, on real engines: the
destination has no room for the turn's KV (one block of host space), so its
commit fails after the source stopped the turn; the source takes the turn
back and its client reads every token once, and neither instance is left
holding anything of the move."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.ports import free_port
from tests.cluster.serving import call, serve_app

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

MODEL = "tiny"
ROOMY, TIGHT = "roomy-0", "tight-0"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, redis_url: str, tmp_path_factory):
    port = free_port()
    config = tmp_path_factory.mktemp("serve") / "app.yaml"
    config.write_text(
        f"""
model: {{path: {tiny_model_dir}, name: {MODEL}}}
engine: {{num_kv_blocks: 32, max_model_len: 512, max_num_seqs: 8}}
pools:
  - {{name: roomy, count: 1}}
  - {{name: tight, count: 1, engine: {{host_swap_tokens: 32}}}}
dispatch: {{policy: mars_aware}}
state_store: {{url: "{redis_url}", session_ttl_s: 600}}
http: {{port: {port}}}
"""
    )
    with serve_app(config, port, num_cpus=6) as url:
        yield url


def _loads(server: str) -> dict[str, dict]:
    return {i["instance_id"]: i for i in call("GET", f"{server}/v1/instances")[1]["instances"]}


def test_a_destination_without_room_hands_the_turn_back_to_its_source(server: str) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "a long answer that cannot move, please"}]
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=300,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
        extra_headers={"X-Session-Id": "stuck"},
    )
    chunks = iter(stream)
    head = [next(chunks) for _ in range(20)]  # past the 32 tokens the destination takes
    tight_before = _loads(server)[TIGHT]
    status, body = call("POST", f"{server}/v1/sessions/stuck/migrate", {"instance_id": TIGHT})
    assert status == 503, body
    message = body["error"]["message"]
    assert "host space" in message and "the source continues the turn" in message, body

    text, mars, usage = "", None, None
    for chunk in [*head, *chunks]:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        mars = (chunk.model_extra or {}).get("mars") or mars
        usage = chunk.usage or usage
    assert usage.completion_tokens == 300 and text
    (move,) = mars["moves"]  # taken back: it went on where it was
    assert move["from"] == move["to"] == ROOMY == mars["instance_id"], mars

    # Nothing of the move is left on the destination: no KV held there, no
    # session; the session is paused on its source.
    tight_after = _loads(server)[TIGHT]
    assert tight_after["free_blocks"] == tight_before["free_blocks"], (tight_before, tight_after)
    assert tight_after["paused_swapped_sessions"] == 0 == tight_after["paused_preserved_sessions"]
    record = call("GET", f"{server}/v1/sessions/stuck")[1]
    assert record["instance_id"] == ROOMY and record["state"] == "paused", record
