"""An engine replica that dies loses KV, never a session: real Ray Serve, two
vLLM CPU engines, Redis, and a real SIGKILL of the replica's process."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from cluster.ports import free_port

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

MODEL = "tiny"
APP = "recovery"
RECOVERY_DEADLINE_S = 180.0


@pytest.fixture(scope="module")
def client(tiny_model_dir: Path, redis_url: str, tmp_path_factory):
    import openai
    import ray
    from ray import serve

    from cluster.app import build_app

    port = free_port()
    config = tmp_path_factory.mktemp("recovery") / "app.yaml"
    config.write_text(
        f"""
model: {{path: {tiny_model_dir}, name: {MODEL}, tool_parser: hermes}}
engine: {{num_kv_blocks: 64, max_model_len: 1024, max_num_seqs: 16}}
policy: {{name: mars}}
instances: 2
dispatch: {{policy: round_robin}}
state_store: {{url: "{redis_url}", session_ttl_s: 600}}
tools: [{{name: calc, kind: calculator}}]
http: {{port: {port}}}
"""
    )
    ray.init(num_cpus=8, include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"config": str(config)}), name=APP, route_prefix="/")
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    serve.shutdown()
    ray.shutdown()


def _kill_replica_of(instance_id: str) -> int:
    from bench.openai_conformance import kill_engine_replica

    return kill_engine_replica(instance_id, APP)


def _turn(client, session: str, history: list[dict], **kwargs):
    return client.chat.completions.create(
        model=MODEL,
        messages=history,
        max_tokens=kwargs.pop("max_tokens", 8),
        temperature=0,
        extra_headers={"X-Session-Id": session},
        **kwargs,
    )


def _retrying(call):
    """`call()` until it succeeds; only 503s (with Retry-After) are retried."""
    import openai

    deadline = time.monotonic() + RECOVERY_DEADLINE_S
    while True:
        try:
            return call()
        except openai.APIStatusError as exc:
            assert exc.status_code == 503, exc
            assert exc.response.headers.get("retry-after"), exc.response.headers
            assert time.monotonic() < deadline, "no recovery within the deadline"
            time.sleep(float(exc.response.headers["retry-after"]))


def _conversation(client, session: str, turns: int) -> tuple[list[dict], list]:
    history: list[dict] = []
    replies = []
    for i in range(turns):
        history.append({"role": "user", "content": f"step {i}: carry on with the plan"})
        reply = _turn(client, session, history)
        replies.append(reply)
        history.append(reply.choices[0].message.model_dump(exclude_none=True))
    return history, replies


def test_a_killed_replica_loses_kv_not_the_session(client) -> None:
    twin_history, twin = _conversation(client, "twin", 3)  # never interrupted

    history, replies = _conversation(client, "victim", 2)
    instance = replies[-1].model_extra["mars"]["instance_id"]
    _kill_replica_of(instance)
    history.append({"role": "user", "content": "step 2: carry on with the plan"})
    third = _retrying(lambda: _turn(client, "victim", history))

    mars = third.model_extra["mars"]
    assert mars["kv"]["rebuilt_from_record"] is True  # the engine had none of it
    assert mars["kv"]["resumed_from"] is None
    assert third.usage.prompt_tokens_details.cached_tokens == 0
    assert mars["history"]["matched_messages"] == 4  # the record had the whole conversation
    assert third.usage.prompt_tokens == twin[2].usage.prompt_tokens
    assert third.choices[0].message.content == twin[2].choices[0].message.content
    assert twin_history[:4] == history[:4]


def test_a_turn_in_flight_when_its_engine_dies_ends_with_an_error_and_can_be_retried(
    client,
) -> None:
    import httpx

    history, replies = _conversation(client, "inflight", 1)
    instance = replies[0].model_extra["mars"]["instance_id"]
    history.append({"role": "user", "content": "now a long answer"})
    stream = _turn(client, "inflight", history, max_tokens=600, stream=True)
    events = iter(stream)
    next(events)
    _kill_replica_of(instance)
    error = None
    try:
        for _ in events:
            pass
    except Exception as exc:  # the openai client raises on an in-band error event
        error = exc
    assert error is not None and not isinstance(error, httpx.TimeoutException), error
    assert "503" in str(error) or "retry" in str(error).lower(), error

    again = _retrying(lambda: _turn(client, "inflight", history))
    assert again.model_extra["mars"]["history"]["matched_messages"] == 2
    assert again.model_extra["mars"]["kv"]["rebuilt_from_record"] is True


def test_a_streamed_server_side_tool_response_whose_engine_dies_ends_in_band(client) -> None:
    """The round after a server-side call loses its engine mid-stream: the
    one SSE response ends with vLLM's in-band 503 and one `[DONE]`, and the
    record keeps the rounds before it."""
    import httpx

    calc = {
        "type": "function",
        "function": {
            "name": "calc",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string", "enum": ["6*7"]}},
                "required": ["expression"],
                "additionalProperties": False,
            },
        },
    }
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "what is 6*7? use calc"}],
        "tools": [calc],
        "tool_choice": {"type": "function", "function": {"name": "calc"}},
        "max_tokens": 850,  # the answer's round outlasts the kill
        "temperature": 0,
        "stream": True,
    }
    from bench.openai_conformance import engine_replica_pid

    base = str(client.base_url).rstrip("/")
    headers = {"X-Session-Id": "tool-victim"}
    # Both engines' processes, found before the request (each found once it
    # has started: an earlier test's kill may still be restarting one): the
    # kill must land within the answer's round, a few seconds on the tiny model.
    pids = [engine_replica_pid(instance, APP) for instance in ("default-0", "default-1")]
    events = []
    with httpx.stream(
        "POST", f"{base}/chat/completions", json=body, headers=headers, timeout=120
    ) as response:
        lines = (line[6:] for line in response.iter_lines() if line.startswith("data: "))
        for event in lines:
            events.append(event)
            if "server_tool_call" in event:
                break  # the call ran; the answer's round is being placed
        # Once the answer's round runs on its engine, that engine dies.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            record = httpx.get(f"{base}/sessions/tool-victim", timeout=60).json()
            if (record.get("engine") or {}).get("phase") == "running":
                break
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        events += list(lines)
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])["error"]
    assert error["code"] == 503, error
    record = httpx.get(f"{base}/sessions/tool-victim", timeout=60).json()
    assert record["state"] == "paused" and record["turns"] == 1, record  # the call's round
