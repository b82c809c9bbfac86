"""The global scheduler's migration policy on a real local Ray cluster: two
vLLM engine instances on CPU, Redis for sessions, `relocate_paused` moving
a paused session off the instance that holds too much."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.ports import free_port
from tests.cluster.serving import call, serve_app, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

MODEL = "tiny"
BLOCKS = 16
"""KV blocks per instance (of 32 tokens)."""
SOURCE_BELOW = 11
"""An instance sheds paused sessions while fewer than this many blocks are
free of what it holds and owes: with two sessions of 3 to 5 blocks each
(65 to 160 tokens of context) it is under, with one it is not."""


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, redis_url: str, tmp_path_factory):
    port = free_port()
    config = tmp_path_factory.mktemp("serve") / "app.yaml"
    config.write_text(
        f"""
model: {{path: {tiny_model_dir}, name: {MODEL}}}
engine: {{num_kv_blocks: {BLOCKS}, max_model_len: 256, max_num_seqs: 8}}
instances: 2
dispatch: {{policy: mars_aware}}
migration:
  policy: relocate_paused
  params: {{source_below: {SOURCE_BELOW}, min_gap: 0, max_moves: 4}}
  interval_s: 0.2
state_store: {{url: "{redis_url}", session_ttl_s: 600}}
http: {{port: {port}}}
"""
    )
    with serve_app(config, port, num_cpus=6) as url:
        yield url


def _turn(server: str, session: str, messages: list[dict]) -> dict:
    status, body = call(
        "POST",
        f"{server}/v1/chat/completions",
        {
            "model": MODEL,
            "session_id": session,
            "messages": messages,
            "max_tokens": 4,
            "temperature": 0,
            # a long tool call ahead: the session is worth moving
            "mars": {"tool": "search", "expected_api_s": 60},
        },
    )
    assert status == 200, body
    return body


def _ready(server: str) -> dict:
    """/ready's body (a 503's until the global scheduler has seen the engines)."""
    return call("GET", f"{server}/ready")[1]


def test_a_paused_session_moves_off_the_instance_that_holds_too_much(server: str) -> None:
    # Both sessions on one instance: the other takes nothing new while it drains.
    status, _ = call("POST", f"{server}/v1/instances/default-1/drain", {})
    assert status == 200
    wait_until("default-1 draining", lambda: _ready(server).get("draining") == ["default-1"])
    words = " ".join(f"item{i}" for i in range(15))
    histories, firsts = {}, {}
    for session in ("crowded-0", "crowded-1"):
        histories[session] = [{"role": "user", "content": f"{session}: look up {words}"}]
        firsts[session] = _turn(server, session, histories[session])
        assert firsts[session]["mars"]["instance_id"] == "default-0"
        context = firsts[session]["usage"]["total_tokens"]
        assert 65 <= context <= 160, f"the test needs 3 to 5 blocks a session, got {context}"
    # Room again on default-1: the policy moves one session there, not both
    # (the second would leave default-1 the fuller one).
    status, _ = call("DELETE", f"{server}/v1/instances/default-1/drain")
    assert status == 200

    def placed() -> dict[str, str]:
        return {s: call("GET", f"{server}/v1/sessions/{s}")[1]["instance_id"] for s in firsts}

    where = wait_until(
        "a session moved to default-1", lambda: (w := placed()) and "default-1" in w.values() and w
    )
    (moved,) = [s for s, instance in where.items() if instance == "default-1"]
    (stayed,) = set(firsts) - {moved}

    for session in (moved, stayed):
        history = [
            *histories[session],
            firsts[session]["choices"][0]["message"],
            {"role": "user", "content": "the search returned nothing"},
        ]
        mars = _turn(server, session, history)["mars"]
        assert mars["instance_id"] == where[session], mars
        if session == moved:
            # its KV came along (loaded) or had been discarded (recomputed)
            kv = mars["kv"]
            assert (kv["loaded_tokens"] > 0) != (kv["recomputed_tokens"] > 0), mars
