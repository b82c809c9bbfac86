"""Two Ray nodes on this machine (`ray.cluster_utils.Cluster`: a head and a
worker, each its own raylet and object store), one engine instance pinned to
each by a custom resource (`pools[].resources.custom`), Redis for sessions:
sessions are served on both nodes, and a paused session's KV crosses from one
node's object store to the other's when it moves."""

from __future__ import annotations

import json
import random
import urllib.request
from pathlib import Path

import pytest

from cluster.ports import free_port

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

MODEL = "tiny"
NODE_MEMORY = {"object_store_memory": 256 * 2**20}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, redis_url: str, tmp_path_factory):
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from cluster.app import build_app

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 6, "resources": {"node_a": 1}, **NODE_MEMORY},
    )
    cluster.add_node(num_cpus=2, resources={"node_b": 1}, **NODE_MEMORY)
    port = free_port()
    config = tmp_path_factory.mktemp("multinode") / "app.yaml"
    config.write_text(
        f"""
model: {{path: {tiny_model_dir}, name: {MODEL}}}
engine: {{num_kv_blocks: 64, max_model_len: 1024, max_num_seqs: 16}}
policy: {{name: mars}}
pools:
  - {{name: a, count: 1, resources: {{cpus: 1, custom: {{node_a: 1}}}}}}
  - {{name: b, count: 1, resources: {{cpus: 1, custom: {{node_b: 1}}}}}}
dispatch: {{policy: round_robin}}
state_store: {{url: "{redis_url}", session_ttl_s: 600}}
http: {{port: {port}}}
"""
    )
    ray.init(address=cluster.address)
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"config": str(config)}), name="multinode", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


def _call(url: str, body: dict | None = None, headers: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data, {"Content-Type": "application/json", **(headers or {})}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _turn(server: str, session: str, prompt: list[int]) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    body["return_token_ids"] = True
    return _call(f"{server}/v1/completions", body, {"X-Session-Id": session})


def test_engines_on_two_nodes_serve_sessions_and_a_session_moves_across(server: str) -> None:
    instances = {i["instance_id"]: i for i in _call(f"{server}/v1/instances")["instances"]}
    assert set(instances) == {"a-0", "b-0"}
    assert instances["a-0"]["node_id"] != instances["b-0"]["node_id"]  # two raylets

    # Random prompts: no prefix any engine has seen (start-up profiling's included).
    rng = random.Random(7)
    prompts = {s: [rng.randrange(10, 400) for _ in range(200)] for s in "xy"}
    first = {s: _turn(server, s, p) for s, p in prompts.items()}
    served_on = {first[s]["mars"]["instance_id"] for s in first}
    assert served_on == {"a-0", "b-0"}  # round robin: one session on each node

    source = first["x"]["mars"]["instance_id"]
    (destination,) = {"a-0", "b-0"} - {source}
    moved = _call(f"{server}/v1/sessions/x/migrate", {"instance_id": destination})["migration"]
    assert moved["outcome"] == "committed" and moved["kv_bytes"] > 0
    context = [*prompts["x"], *first["x"]["choices"][0]["token_ids"], 5, 6, 7]
    second = _turn(server, "x", context)
    assert second["mars"]["instance_id"] == destination
    assert second["mars"]["kv"]["loaded_tokens"] == moved["kv_tokens"], second["mars"]
    assert second["mars"]["kv"]["recomputed_tokens"] == 0

    # A running turn moves live across the nodes, its stream going on.
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    y_source = first["y"]["mars"]["instance_id"]
    (y_destination,) = {"a-0", "b-0"} - {y_source}
    stream = client.completions.create(
        model=MODEL,
        prompt=[*prompts["y"], *first["y"]["choices"][0]["token_ids"], 8, 9],
        max_tokens=400,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
        extra_headers={"X-Session-Id": "y"},
    )
    chunks = iter(stream)
    head = [next(chunks) for _ in range(3)]
    live = _call(f"{server}/v1/sessions/y/migrate", {"instance_id": y_destination})["migration"]
    assert live["live"] and live["outcome"] == "committed" and live["kv_bytes"] > 0, live
    mars, usage = None, None
    for chunk in [*head, *chunks]:
        mars = (chunk.model_extra or {}).get("mars") or mars
        usage = chunk.usage or usage
    assert usage.completion_tokens == 400
    (move,) = mars["moves"]
    assert (move["from"], move["to"]) == (y_source, y_destination), mars
    assert _call(f"{server}/v1/sessions/y")["instance_id"] == y_destination
