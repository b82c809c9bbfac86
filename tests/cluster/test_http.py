"""End to end over HTTP: a real local Ray cluster, Ray Serve, two vLLM engine
instances on CPU, Redis for sessions, and the `openai` client."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

MODEL = "tiny"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, redis_url: str, tmp_path_factory):
    import ray
    from ray import serve

    from cluster.app import build_app

    port = _free_port()
    config = tmp_path_factory.mktemp("serve") / "app.yaml"
    config.write_text(
        f"""
model: {{path: {tiny_model_dir}, name: {MODEL}}}
engine: {{num_kv_blocks: 64, max_model_len: 1024, max_num_seqs: 32}}
policy: {{name: mars}}
instances: 2
dispatch: {{policy: mars_aware}}
state_store: {{url: "{redis_url}", session_ttl_s: 600}}
tools:
  - {{name: search, kind: emulated, duration_s: 0.2, return_tokens: 6}}
  - {{name: calculator, kind: calculator}}
http: {{port: {port}}}
"""
    )
    ray.init(num_cpus=8, include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"config": str(config)}), name="mars", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def client(server: str):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_models_and_health(server: str, client) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert _get(f"{server}/health") == (200, {"status": "ok"})
    status, body = _get(f"{server}/ready")
    assert status == 200 and sorted(body["instances"]) == ["default-0", "default-1"]


def test_chat_completion(client) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=8
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 8
    assert isinstance(reply.choices[0].message.content, str)


def test_streaming(client) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "count to three"}],
        max_tokens=6,
        stream=True,
    )
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks)


def test_client_tool_call_resumes_on_the_same_instance_with_its_kv(server: str, client) -> None:
    session = {"X-Session-Id": "agent-1"}
    first = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "what is 6*7? use the calculator"}],
        max_tokens=5,
        extra_headers=session,
        extra_body={"mars": {"tool": "calculator", "expected_api_s": 0.05}},
    )
    instance = first.model_extra["mars"]["instance_id"]
    status, paused = _get(f"{server}/v1/sessions/agent-1")
    assert status == 200 and paused["state"] == "paused" and paused["instance_id"] == instance
    held_tokens = paused["engine"]["context_tokens"]

    second = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "tool", "content": "42"}],
        max_tokens=5,
        extra_headers=session,
    )
    assert second.model_extra["mars"]["instance_id"] == instance
    status, resumed = _get(f"{server}/v1/sessions/agent-1")
    events = [e["event"] for e in resumed["engine"]["timeline"]]
    assert events.count("resumed") == 1
    # The engine kept the session's context: the resume computed only the new
    # tokens (no recompute) unless MARS chose to discard it.
    if resumed["engine"]["strategy"] == "preserve":
        assert resumed["engine"]["recomputed_tokens"] == 0
    assert resumed["engine"]["context_tokens"] > held_tokens


def test_server_side_tool_session(client) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "search twice"}],
        extra_body={
            "mars": {
                "plan": [
                    {"generate_tokens": 4, "call": {"tool": "search"}},
                    {"generate_tokens": 4, "call": {"tool": "calculator", "arguments": "2+3"}},
                    {"generate_tokens": 4},
                ]
            }
        },
    )
    assert reply.usage.completion_tokens == 12
    assert reply.model_extra["mars"]["e2e_s"] >= 0.2  # the emulated search took 0.2 s


def test_errors_follow_openai_shape(server: str, client) -> None:
    import openai

    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(
            model="gpt-9", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=0
        )
    with pytest.raises(openai.BadRequestError, match="plan"):
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            extra_body={"mars": {"plan": [{"generate_tokens": 2}, {"generate_tokens": 2}]}},
        )
    status, body = _get(f"{server}/v1/sessions/nobody")
    assert status == 404 and body["error"]["type"] == "not_found_error"
    # The server still serves after bad input.
    ok = client.completions.create(model=MODEL, prompt="still here", max_tokens=3)
    assert ok.choices[0].finish_reason == "length"


def test_session_survives_a_global_scheduler_restart(client, redis_url: str) -> None:
    """Kill the global scheduler's replica; Serve starts a new one, which finds
    the session's instance in Redis. Runs last: it disturbs the shared server."""
    import time

    import openai
    import ray
    import redis

    session = {"X-Session-Id": "durable-1"}
    first = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "look this up"}],
        max_tokens=4,
        extra_headers=session,
    )
    instance = first.model_extra["mars"]["instance_id"]
    stored = json.loads(redis.Redis.from_url(redis_url).get("mars:session:durable-1"))
    assert stored["instance_id"] == instance and stored["state"] == "paused"

    killed = 0
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "global-scheduler" in actor["name"]:
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            killed += 1
    assert killed == 1

    deadline = time.monotonic() + 120
    while True:
        try:
            second = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "tool", "content": "found it"}],
                max_tokens=4,
                extra_headers=session,
            )
            break
        except openai.APIError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
    assert second.model_extra["mars"]["instance_id"] == instance
    after = json.loads(redis.Redis.from_url(redis_url).get("mars:session:durable-1"))
    assert after["instance_id"] == instance
    assert after["created_s"] == stored["created_s"] and after["tokens"] > stored["tokens"]
