"""End to end over HTTP: a real local Ray cluster, Ray Serve, two vLLM engine
instances on CPU, Redis for sessions, and the `openai` client."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest

from cluster.ports import free_port

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, redis_url: str, tmp_path_factory):
    import ray
    from ray import serve

    from cluster.app import build_app

    port = free_port()
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
http: {{port: {port}, ingress_replicas: 2}}
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
    mars = reply.model_extra["mars"]
    assert mars["session_state"] == "closed"  # no session id: a one-turn session
    assert 0 < mars["engine_s"] < 60


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


def test_a_client_leaving_mid_stream_leaves_its_session_paused(server: str, client) -> None:
    session = {"X-Session-Id": "gone-1"}
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "tell me a long story"}],
        max_tokens=200,
        stream=True,
        extra_headers=session,
    )
    next(iter(stream))
    stream.close()  # the client leaves after the first chunk
    deadline = time.monotonic() + 60
    while True:
        status, record = _get(f"{server}/v1/sessions/gone-1")
        if status == 200 and record["state"] == "paused":
            break
        assert time.monotonic() < deadline, record
        time.sleep(0.2)
    assert record["engine"]["state"] == "awaiting_client"
    assert record["tokens"] == record["engine"]["context_tokens"]
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "go on"}],
        max_tokens=3,
        extra_headers=session,
    )
    assert reply.model_extra["mars"]["instance_id"] == record["instance_id"]


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


def test_an_ended_session_id_starts_a_new_session(server: str, client) -> None:
    """Engines keep an ended session's record a while, yet its id is free
    again: four incarnations of one id (ended by `DELETE` and by
    `mars.close`) on two instances, so at least two share an instance, and
    each starts from its own prompt. A plan under a live id is refused."""
    import openai

    session = {"X-Session-Id": "reused-1"}
    engine_ids, instances = set(), []
    for i in range(4):
        turn = client.completions.create(
            model=MODEL, prompt="hello there", max_tokens=2, extra_headers=session
        )
        assert turn.choices[0].finish_reason == "length"
        status, record = _get(f"{server}/v1/sessions/reused-1")
        assert status == 200 and record["state"] == "paused", record
        assert record["engine"]["context_tokens"] == turn.usage.prompt_tokens + 1
        engine_ids.add(record["engine_session_id"])
        instances.append(record["instance_id"])
        if i == 0:
            with pytest.raises(openai.ConflictError, match=r"mars\.plan runs"):
                client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": "x"}],
                    extra_headers=session,
                    extra_body={"mars": {"plan": [{"generate_tokens": 2}]}},
                )
        if i % 2 == 0:
            delete = urllib.request.Request(f"{server}/v1/sessions/reused-1", method="DELETE")
            with urllib.request.urlopen(delete, timeout=60) as response:
                assert response.status == 200
        else:
            last = client.completions.create(
                model=MODEL,
                prompt=" bye",
                max_tokens=1,
                extra_headers=session,
                extra_body={"mars": {"close": True}},
            )
            assert last.model_extra["mars"]["session_state"] == "closed"
        assert _get(f"{server}/v1/sessions/reused-1")[0] == 404
    assert len(engine_ids) == 4 and all(e.startswith("reused-1@") for e in engine_ids)
    assert len(set(instances)) < len(instances)  # some instance saw the id twice


Sample = tuple[str, dict[str, str], float]


_SAMPLE = re.compile(r"^(?P<name>ray_mars_\w+)(?:\{(?P<labels>.*)\})? (?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _metric_samples() -> list[Sample]:
    """The ``ray_mars_*`` samples that the local Ray node exports in
    Prometheus text format, as (sample name, labels, value). Only our lines
    are parsed: the node's other metrics are Ray's business."""
    import ray

    node = ray.nodes()[0]
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            labels = dict(_LABEL.findall(match["labels"] or ""))
            samples.append((match["name"], labels, float(match["value"])))
    return samples


def _total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(
        value
        for sample, tags, value in samples
        if sample == name and all(tags.get(k) == v for k, v in labels.items())
    )


def _label_values(samples: list[Sample], name: str, label: str) -> set[str | None]:
    return {tags.get(label) for sample, tags, _ in samples if sample == name}


def test_metrics_reach_prometheus(client) -> None:
    """After a few turns, the node's Prometheus endpoint shows the mars_
    metrics (Ray exports them as ``ray_mars_*``) with plausible values."""
    import time

    session = {"X-Session-Id": "metrics-1"}
    for content in ("first turn", "tool result"):
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": content}],
            max_tokens=4,
            extra_headers=session,
        )
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "stream"}], max_tokens=4, stream=True
    )
    assert list(stream)
    turns = 3
    placements = 2  # new sessions; a session's later turns go straight to its instance
    instances = {"default-0", "default-1"}

    # Workers report to the node's metrics agent every few seconds.
    deadline = time.monotonic() + 120
    while True:
        samples = _metric_samples()
        ready = (
            _total(samples, "ray_mars_ttft_seconds_count") >= turns
            and _total(samples, "ray_mars_dispatch_decisions_total") >= placements
            and instances <= _label_values(samples, "ray_mars_kv_capacity_blocks", "instance")
            and _total(samples, "ray_mars_paused_sessions") >= 1
        )
        if ready or time.monotonic() > deadline:
            break
        time.sleep(2)
    names = sorted({name for name, _, _ in samples if name.startswith("ray_mars_")})

    for histogram in ("ttft_seconds", "e2e_latency_seconds", "time_per_output_token_seconds"):
        count = _total(samples, f"ray_mars_{histogram}_count", policy="mars")
        assert count >= turns, (histogram, count, names)
        assert _label_values(samples, f"ray_mars_{histogram}_count", "instance") <= instances
    assert _total(samples, "ray_mars_e2e_latency_seconds_sum") > 0

    decisions = "ray_mars_dispatch_decisions_total"
    assert _total(samples, decisions, policy="mars_aware") >= placements, names
    assert _label_values(samples, decisions, "reason") <= {"new", "affinity", "moved"}

    for instance in instances:
        blocks = _total(samples, "ray_mars_kv_capacity_blocks", instance=instance)
        used = _total(samples, "ray_mars_kv_used_blocks", instance=instance)
        assert 0 < blocks <= 64 and 0 <= used <= blocks, (instance, blocks, used)
        assert 0 <= _total(samples, "ray_mars_kv_usage_ratio", instance=instance) <= 1
        for gauge in ("ray_mars_requests_waiting", "ray_mars_requests_running"):
            assert instance in _label_values(samples, gauge, "instance"), (gauge, names)
    paused = "ray_mars_paused_sessions"
    assert _label_values(samples, paused, "strategy") == {"preserve", "discard", "swap"}
    # metrics-1 (and earlier tests' sessions) wait paused on their instances.
    assert _total(samples, paused) >= 1


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
