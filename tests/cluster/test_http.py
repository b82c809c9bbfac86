"""End to end over HTTP: a real local Ray cluster, Ray Serve, two vLLM engine
instances on CPU, Redis for sessions, and the `openai` client."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cluster.ports import free_port
from cluster.turn import TURN_PHASES
from tests.cluster.serving import read_stream, serve_app

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, redis_url: str, tmp_path_factory):
    port = free_port()
    config = tmp_path_factory.mktemp("serve") / "app.yaml"
    config.write_text(
        f"""
model: {{path: {tiny_model_dir}, name: {MODEL}, tool_parser: hermes}}
engine: {{num_kv_blocks: 64, max_model_len: 1024, max_num_seqs: 32}}
policy: {{name: mars}}
instances: 2
dispatch: {{policy: mars_aware}}
state_store: {{url: "{redis_url}", session_ttl_s: 600}}
tools: [{{name: calc, kind: calculator}}]
http: {{port: {port}, ingress_replicas: 2}}
"""
    )
    with serve_app(config, port, num_cpus=8) as url:
        yield url


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
    assert reply.usage.prompt_tokens_details.cached_tokens is not None
    assert isinstance(reply.choices[0].message.content, str)
    mars = reply.model_extra["mars"]
    assert "session_id" not in mars  # no session id: a request outside sessions
    assert mars["instance_id"] in {"default-0", "default-1"} and 0 < mars["engine_s"] < 60
    # Outside a session there is no record to move: only the engine call is timed.
    assert set(mars["phases_ms"]) == {"until_engine_call", "engine_call_ack"}


def test_streaming_starts_with_the_role_and_ends_with_usage(client) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "count to three"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 6
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _ask(client, session: str, messages: list[dict], **kwargs):
    return client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=kwargs.pop("max_tokens", 5),
        temperature=0,
        extra_headers={"X-Session-Id": session},
        **kwargs,
    )


def test_a_full_history_client_resumes_on_its_instance_with_its_kv(server: str, client) -> None:
    """The client re-sends the whole conversation, as every OpenAI client
    does: only the new message is appended, on the instance holding the
    session's KV, and vLLM counts the reused tokens."""
    history = [{"role": "user", "content": "what is 6*7? use the calculator"}]
    first = _ask(
        client, "agent-1", history, max_tokens=16, extra_body={"mars": {"tool": "calculator"}}
    )
    instance = first.model_extra["mars"]["instance_id"]
    status, paused = _get(f"{server}/v1/sessions/agent-1")
    assert status == 200 and paused["state"] == "paused" and paused["instance_id"] == instance
    assert paused["tokens"] == first.usage.prompt_tokens + first.usage.completion_tokens

    history += [first.choices[0].message.model_dump(exclude_none=True)]
    history += [{"role": "tool", "content": "42", "tool_call_id": "call-1"}]
    second = _ask(client, "agent-1", history)
    mars = second.model_extra["mars"]
    assert mars["instance_id"] == instance and mars["placed"] == "affinity"
    assert set(mars["phases_ms"]) == set(TURN_PHASES)  # a session turn: every step timed
    assert all(0 <= ms < 60_000 for ms in mars["phases_ms"].values())
    assert mars["history"]["matched_messages"] == 2 and mars["history"]["diverged_at"] is None
    assert mars["kv"]["resumed_from"] == "preserve"
    assert second.usage.prompt_tokens_details.cached_tokens == mars["kv"]["cached_tokens"] >= 32
    status, resumed = _get(f"{server}/v1/sessions/agent-1")
    assert resumed["tokens"] == second.usage.prompt_tokens + second.usage.completion_tokens
    events = [e["event"] for e in resumed["engine"]["timeline"]]
    assert events.count("resumed") == 1 and events[-1] == "paused"

    edited = [{"role": "user", "content": "what is 6*8? use the calculator"}]
    third = _ask(client, "agent-1", edited)
    assert third.model_extra["mars"]["history"]["diverged_at"] == 0
    assert _get(f"{server}/v1/sessions/agent-1")[1]["tokens"] == (
        third.usage.prompt_tokens + third.usage.completion_tokens
    )


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_paused_session_moves_to_the_other_instance_and_resumes_there_with_its_kv(
    server: str, client
) -> None:
    """The session's KV leaves its instance while it waits on a tool (one
    stop-and-copy between the two engine replicas), and its next turn loads
    it on the other instance instead of recomputing it: the same answer as a
    twin session that never moved."""
    history = [{"role": "user", "content": "look it up and come back to me"}]
    first = _ask(client, "mover", history, max_tokens=8)
    source = first.model_extra["mars"]["instance_id"]
    (destination,) = {"default-0", "default-1"} - {source}
    kept = first.usage.prompt_tokens + first.usage.completion_tokens - 1  # the last sampled: none

    status, body = _post(f"{server}/v1/sessions/mover/migrate", {"instance_id": destination})
    assert status == 200, body
    moved = body["migration"]
    assert (moved["outcome"], moved["source"], moved["destination"]) == (
        "committed",
        source,
        destination,
    )
    assert moved["kv_tokens"] == kept and moved["kv_bytes"] > 0
    status, session = _get(f"{server}/v1/sessions/mover")
    assert (session["instance_id"], session["state"], session["strategy"]) == (
        destination,
        "paused",
        "swap",
    )
    assert session["engine"]["timeline"][-1]["event"] == "migrated in"

    history += [first.choices[0].message.model_dump(exclude_none=True)]
    history += [{"role": "user", "content": "here is what the tool said"}]
    second = _ask(client, "mover", history)
    mars = second.model_extra["mars"]
    assert mars["instance_id"] == destination and mars["placed"] == "affinity"
    assert mars["kv"]["loaded_tokens"] == kept and mars["kv"]["recomputed_tokens"] == 0
    assert mars["kv"]["rebuilt_from_record"] is False
    # The twin comes after: its prompt in the destination's prefix cache
    # would have been found before the moved copy (and nothing loaded).
    twin_first = _ask(client, "mover-twin", history[:1], max_tokens=8)
    assert twin_first.choices[0].message.content == first.choices[0].message.content
    twin_second = _ask(client, "mover-twin", history)
    assert second.choices[0].message.content == twin_second.choices[0].message.content

    # What cannot move is refused, naming why; the session stays as it was.
    status, body = _post(f"{server}/v1/sessions/mover/migrate", {"instance_id": destination})
    assert status == 409 and "already on" in body["error"]["message"], body
    status, body = _post(f"{server}/v1/sessions/mover/migrate", {"instance_id": "nowhere"})
    assert status == 400 and body["error"]["param"] == "instance_id", body
    status, body = _post(f"{server}/v1/sessions/ghost/migrate", {"instance_id": source})
    assert status == 404, body
    status, body = _post(f"{server}/v1/sessions/mover/migrate", {"to": source})
    assert status == 400 and "instance_id" in body["error"]["message"], body
    assert _get(f"{server}/v1/sessions/mover")[1]["instance_id"] == destination


LONG = {
    "max_tokens": 400,
    "stream": True,
    "stream_options": {"include_usage": True},
    "extra_body": {"ignore_eos": True},
}


def test_a_streaming_turn_moves_live_and_its_client_reads_every_token_once(
    server: str, client
) -> None:
    history = [{"role": "user", "content": "a long story, please"}]
    first = _ask(client, "live-mover", history, max_tokens=4)
    source = first.model_extra["mars"]["instance_id"]
    (destination,) = {"default-0", "default-1"} - {source}
    history += [first.choices[0].message.model_dump(exclude_none=True)]
    history += [{"role": "user", "content": "go on, at length"}]
    # The unmoved twin first: its answer is what the moved one must read.
    _ask(client, "live-twin", history[:1], max_tokens=4)
    twin_text, twin_mars, twin_usage = read_stream(_ask(client, "live-twin", history, **LONG))
    assert "moves" not in twin_mars and twin_usage.completion_tokens == 400

    chunks = iter(_ask(client, "live-mover", history, **LONG))
    head = [next(chunks) for _ in range(3)]  # it streams from its instance
    status, body = _post(f"{server}/v1/sessions/live-mover/migrate", {"instance_id": destination})
    assert status == 200, body
    migration = body["migration"]
    assert migration["live"] and migration["outcome"] == "committed", migration
    assert migration["source"] == source and migration["stages"] >= 1
    assert migration["kv_tokens"] > 0 and migration["stopped_s"] > 0
    # The stages before the stop went into the destination's device blocks.
    written = migration["written_ahead_tokens"]
    assert 0 < written < migration["kv_tokens"], migration
    text, mars, usage = read_stream([*head, *chunks])
    assert text == twin_text  # every token once, in order, as if it had not moved
    assert usage.completion_tokens == 400 and usage.prompt_tokens == twin_usage.prompt_tokens
    (move,) = mars["moves"]
    assert (move["from"], move["to"]) == (source, destination)
    assert 0 < move["after_tokens"] < 400 and move["downtime_ms"] > 0
    # The continuation found the stages written ahead in its prefix cache (and
    # whatever the twin, which computed the same tokens, left there), loaded
    # at most the rest of the KV that came, and recomputed none of it.
    kv = mars["kv"]
    assert mars["instance_id"] == destination and kv["resumed_from"] == "swap", mars
    assert kv["loaded_tokens"] <= migration["kv_tokens"] - written, (mars, migration)
    assert kv["recomputed_tokens"] == 0, mars
    assert kv["cached_tokens"] >= migration["kv_tokens"], (mars, migration)
    record = _get(f"{server}/v1/sessions/live-mover")[1]
    assert record["instance_id"] == destination and record["state"] == "paused"
    assert record["tokens"] == _get(f"{server}/v1/sessions/live-twin")[1]["tokens"]


def test_two_moves_of_one_turn_at_once_make_one_move(server: str, client) -> None:
    history = [{"role": "user", "content": "move me twice"}]
    first = _ask(client, "live-twice", history, max_tokens=4)
    (destination,) = {"default-0", "default-1"} - {first.model_extra["mars"]["instance_id"]}
    history += [first.choices[0].message.model_dump(exclude_none=True)]
    history += [{"role": "user", "content": "and on"}]
    chunks = iter(_ask(client, "live-twice", history, **LONG))
    head = next(chunks)
    url = f"{server}/v1/sessions/live-twice/migrate"
    with ThreadPoolExecutor(2) as pool:
        calls = [pool.submit(_post, url, {"instance_id": destination}) for _ in range(2)]
        answers = sorted((call.result() for call in calls), key=lambda answer: answer[0])
    (ok, moved), (conflict, refused) = answers
    assert ok == 200 and moved["migration"]["outcome"] == "committed", answers
    # the second found the turn moving, stopped, or already moved there
    assert conflict == 409, answers
    why = refused["error"]["message"]
    assert re.search("already moving|already on|no turn running", why), refused
    _, mars, usage = read_stream([head, *chunks])
    assert usage.completion_tokens == 400 and len(mars["moves"]) == 1, mars


def test_a_drain_moves_a_streaming_turn_live(server: str, client) -> None:
    history = [{"role": "user", "content": "drain me while I talk"}]
    first = _ask(client, "live-drained", history, max_tokens=4)
    source = first.model_extra["mars"]["instance_id"]
    (other,) = {"default-0", "default-1"} - {source}
    history += [first.choices[0].message.model_dump(exclude_none=True)]
    history += [{"role": "user", "content": "keep talking"}]
    chunks = iter(_ask(client, "live-drained", history, **LONG))
    head = next(chunks)
    try:
        status, drain = _post(f"{server}/v1/instances/{source}/drain", {})
        assert status == 200, drain
        (live,) = [m for m in drain["migrations"] if m["session_id"] == "live-drained"]
        assert live["live"] and live["outcome"] == "committed" and live["destination"] == other
        _, mars, usage = read_stream([head, *chunks])
        assert usage.completion_tokens == 400 and mars["instance_id"] == other, mars
        assert mars["moves"][0]["from"] == source
    finally:
        status, _ = _delete(f"{server}/v1/instances/{source}/drain")
        assert status == 200
    _wait_for_ready(server, lambda body: body["draining"] == [])


def test_a_turn_whose_sampler_state_cannot_travel_is_not_moved(server: str, client) -> None:
    history = [{"role": "user", "content": "stop me if you can"}]
    chunks = iter(_ask(client, "live-refused", history, stop=["never appears"], **LONG))
    head = next(chunks)
    status, body = _post(f"{server}/v1/sessions/live-refused/migrate", {"instance_id": "default-0"})
    if status == 409 and "already on" in body["error"]["message"]:
        status, body = _post(
            f"{server}/v1/sessions/live-refused/migrate", {"instance_id": "default-1"}
        )
    assert status == 409, body
    assert "cannot move live: its stop strings" in body["error"]["message"], body
    _, mars, usage = read_stream([head, *chunks])
    assert "moves" not in mars and usage.completion_tokens == 400


def test_the_cli_moves_a_session_and_drains_an_instance(server: str, client, capsys) -> None:
    from cluster.cli import main

    first = _ask(client, "cli-mover", [{"role": "user", "content": "move me by hand"}])
    source = first.model_extra["mars"]["instance_id"]
    (other,) = {"default-0", "default-1"} - {source}
    assert main(["migrate", "cli-mover", other, "--url", server]) == 0
    assert f"cli-mover {source} -> {other}: moved" in capsys.readouterr().out
    assert main(["migrate", "cli-mover", "nowhere", "--url", server]) == 2
    assert "400 instance_id 'nowhere' is not an instance" in capsys.readouterr().err

    try:
        assert main(["drain", other, "--url", server]) == 0
        out = capsys.readouterr().out
        assert f"cli-mover {other} -> {source}: moved" in out
        assert f"{other}: drained" in out
        assert main(["status", "--url", server]) == 0
        table = capsys.readouterr().out.splitlines()
        (line,) = [row for row in table if row.startswith(other)]
        import ray

        node_ip = ray.util.get_node_ip_address()  # one node: the engines' too
        assert node_ip in line and "draining" in line, table
        (line,) = [row for row in table if row.startswith(source)]
        assert "serving" in line, table
    finally:
        assert main(["drain", other, "--undo", "--url", server]) == 0
    assert f"{other}: takes new sessions again" in capsys.readouterr().out
    _wait_for_ready(server, lambda body: body["draining"] == [])


def _wait_for_ready(server: str, predicate, timeout_s: float = 30.0) -> dict:
    """`/ready` once `predicate(body)` holds (placement sees loads as of its
    last refresh)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, body = _get(f"{server}/ready")
        if status == 200 and predicate(body):
            return body
        assert time.monotonic() < deadline, f"/ready never showed it: {body}"
        time.sleep(0.1)  # a poll's interval: the loop waits on the condition


def test_a_drained_instance_hands_its_paused_sessions_over_and_gets_no_new_ones(
    server: str, client
) -> None:
    firsts = {}
    for i in range(4):
        history = [{"role": "user", "content": f"drain test {i}: wait for the tool"}]
        firsts[f"drain-{i}"] = (history, _ask(client, f"drain-{i}", history, max_tokens=4))
    held = {s: r.model_extra["mars"]["instance_id"] for s, (_, r) in firsts.items()}
    source = sorted(held.values())[0]  # one that holds at least one of them
    (other,) = {"default-0", "default-1"} - {source}

    status, drain = _post(f"{server}/v1/instances/{source}/drain", {})
    assert status == 200, drain
    assert drain["drained"] is True and drain["accepting"] is False, drain
    moved = {m["session_id"]: m for m in drain["migrations"]}
    assert {s for s, i in held.items() if i == source} <= set(moved)
    assert all(m["outcome"] == "committed" and m["destination"] == other for m in moved.values())
    _wait_for_ready(server, lambda body: body["draining"] == [source])
    try:
        fresh = _ask(client, "after-drain", [{"role": "user", "content": "a new session"}])
        assert fresh.model_extra["mars"]["instance_id"] == other
        for session, (history, first) in firsts.items():
            history = [*history, first.choices[0].message.model_dump(exclude_none=True)]
            history.append({"role": "user", "content": "the tool answered"})
            mars = _ask(client, session, history).model_extra["mars"]
            assert mars["instance_id"] == other, mars
            if session in moved:
                # What the move carried is loaded, not recomputed. MARS may
                # have demoted a paused session's KV to DISCARD before the
                # drain (its pause outgrew the waste of holding it): such a
                # move carries no KV, and that turn recomputes.
                carried = moved[session]["kv_tokens"]
                assert mars["kv"]["loaded_tokens"] == carried, (session, mars, moved)
                assert (mars["kv"]["recomputed_tokens"] == 0) == (carried > 0), (session, mars)
        status, again = _post(f"{server}/v1/instances/{source}/drain", {})
        assert status == 200 and again["drained"] and again["migrations"] == [], again
    finally:
        status, body = _delete(f"{server}/v1/instances/{source}/drain")
        assert (status, body) == (200, {"instance_id": source, "accepting": True})
    _wait_for_ready(server, lambda body: body["draining"] == [])
    status, body = _post(f"{server}/v1/instances/nowhere/drain", {})
    assert status == 404 and body["error"]["param"] == "instance_id", body


def _delete(url: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, method="DELETE")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


CALC = {
    "type": "function",
    "function": {
        "name": "calc",
        "description": "Evaluate an arithmetic expression",
        "strict": True,
        "parameters": {  # an enum, so that the random tiny model's call ends
            "type": "object",
            "properties": {"expression": {"type": "string", "enum": ["6*7", "6*8"]}},
            "required": ["expression"],
            "additionalProperties": False,
        },
    },
}


def test_a_server_side_tool_runs_inside_one_response(server: str, client) -> None:
    """The model calls `calc`, a tool of the serving config: the server runs
    it and generation goes on, in the same response; the session's KV waits
    on its engine between the two turns (preserved: MARS's choice here)."""
    history = [{"role": "user", "content": "what is 6*7? use calc"}]
    named = {"type": "function", "function": {"name": "calc"}}  # one call, then it stops
    reply = _ask(client, "server-tool-1", history, tools=[CALC], tool_choice=named, max_tokens=80)
    mars = reply.model_extra["mars"]
    calls = mars["server_tool_calls"]
    assert calls and {c["name"] for c in calls} == {"calc"}
    assert {c["result"] for c in calls} <= {"42", "48"}  # evaluated by the server
    assert not reply.choices[0].message.tool_calls  # the answer, not a call
    status, record = _get(f"{server}/v1/sessions/server-tool-1")
    turns = record["turns"]
    assert status == 200 and 2 <= turns <= len(calls) + 1
    assert record["tokens"] == reply.usage.prompt_tokens + reply.usage.completion_tokens
    events = [e["event"] for e in record["engine"]["timeline"]]
    assert events.count("paused") == turns and events.count("resumed") == turns - 1
    assert mars["kv"]["resumed_from"] == "preserve"

    # Without a session id the calls run in a session of the response's own.
    stateless = client.chat.completions.create(
        model=MODEL, messages=history, tools=[CALC], tool_choice=named, max_tokens=80
    )
    ran = stateless.model_extra["mars"]["server_tool_calls"]
    assert ran and {c["name"] for c in ran} == {"calc"}  # the random model may call again
    assert "session_id" not in stateless.model_extra["mars"]


def _stream_events(server: str, body: dict, headers: dict | None = None) -> list[str]:
    """The `data:` payloads of a streamed chat response, in order."""
    import httpx

    url = f"{server}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=120) as response:
        assert response.status_code == 200, response.read()
        return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def test_a_streamed_server_side_tool_streams_every_round_in_one_response(server: str) -> None:
    """Streamed, the rounds of server-side calls are one SSE response: the
    calls' progress chunks, then the answer as any stream ends (finish
    chunk, usage, `mars` chunk, one `[DONE]`); the record has every round."""
    named = {"type": "function", "function": {"name": "calc"}}
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "what is 6*7? use calc"}],
        "tools": [CALC],
        "tool_choice": named,
        "max_tokens": 80,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = _stream_events(server, body, {"X-Session-Id": "stream-tool-1"})
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]", events
    chunks = [json.loads(event) for event in events[:-1]]
    progress = [i for i, c in enumerate(chunks) if "server_tool_call" in c.get("mars", {})]
    ran = [chunks[i]["mars"]["server_tool_call"] for i in progress]
    assert ran and {c["name"] for c in ran} == {"calc"}, events
    assert {c["result"] for c in ran} <= {"42", "48"}  # evaluated by the server
    choices = [(i, choice) for i, c in enumerate(chunks) for choice in c["choices"]]
    assert not [c for _, c in choices if c["delta"].get("tool_calls")]  # the server's calls
    finishes = [c["finish_reason"] for _, c in choices if c.get("finish_reason")]
    assert finishes in (["stop"], ["length"]), events  # the last round's only
    answer = "".join(c["delta"].get("content") or "" for i, c in choices if i > progress[-1])
    assert answer, events
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert len(usage) == 1 and usage[0]["completion_tokens"] > 0
    assert chunks[-1]["session_id"] == "stream-tool-1"
    assert chunks[-1]["mars"]["server_tool_calls"] == ran
    status, record = _get(f"{server}/v1/sessions/stream-tool-1")
    assert status == 200 and record["state"] == "paused"
    assert 2 <= record["turns"] <= len(ran) + 1
    assert record["tokens"] == usage[0]["prompt_tokens"] + usage[0]["completion_tokens"]

    # Without a session id the rounds run in a session of the response's own.
    events = _stream_events(server, body)
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]", events
    mars_chunk = json.loads(events[-2])
    assert mars_chunk["mars"]["server_tool_calls"] and "session_id" not in mars_chunk
    assert "session_id" not in mars_chunk["mars"]


def test_concurrent_turns_of_one_session_get_one_409(client) -> None:
    import openai

    _ask(client, "busy-1", [{"role": "user", "content": "start"}])
    for session, messages in (
        ("busy-1", [{"role": "user", "content": "start"}]),  # a paused session
        ("busy-new", [{"role": "user", "content": "first"}]),  # two first turns
    ):
        with ThreadPoolExecutor(2) as pool:
            calls = [pool.submit(_ask, client, session, messages, max_tokens=40) for _ in range(2)]
            outcomes = []
            for call in calls:
                try:
                    outcomes.append(call.result())
                except openai.ConflictError as exc:
                    outcomes.append(exc)
        errors = [o for o in outcomes if isinstance(o, Exception)]
        assert len(errors) == 1, outcomes
        body = errors[0].body
        assert body["type"] == "conflict_error" and body["param"] == "session_id"
        assert session in body["message"]


def test_a_client_leaving_mid_stream_leaves_its_session_as_before(server: str, client) -> None:
    history = [{"role": "user", "content": "tell me a long story"}]
    first = _ask(client, "leaver-1", history)
    before = _get(f"{server}/v1/sessions/leaver-1")[1]["tokens"]
    history += [first.choices[0].message.model_dump(exclude_none=True)]
    history += [{"role": "user", "content": "go on"}]
    stream = _ask(client, "leaver-1", history, max_tokens=400, stream=True)
    next(iter(stream))
    stream.close()  # the client goes away mid-answer
    deadline = time.monotonic() + 60
    while _get(f"{server}/v1/sessions/leaver-1")[1]["state"] != "paused":
        assert time.monotonic() < deadline, "the record stayed generating"
        time.sleep(0.1)
    assert _get(f"{server}/v1/sessions/leaver-1")[1]["tokens"] == before
    again = _ask(client, "leaver-1", history)  # the retry goes on from there
    assert again.model_extra["mars"]["history"]["matched_messages"] == 2


def test_a_client_leaving_after_the_finish_chunk_finds_its_turn_recorded(server: str, client):
    """The record is committed before the finish chunk goes out: a client
    that stops reading there, before usage and `[DONE]`, has its turn kept."""
    import httpx

    history = [{"role": "user", "content": "hello"}]
    first = _ask(client, "finish-leaver-1", history)
    history += [first.choices[0].message.model_dump(exclude_none=True)]
    history += [{"role": "user", "content": "and then?"}]
    body = {
        "model": MODEL,
        "messages": history,
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    content = []
    url = f"{server}/v1/chat/completions"
    headers = {"X-Session-Id": "finish-leaver-1"}
    with httpx.stream("POST", url, json=body, headers=headers, timeout=120) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            content.append(choice["delta"].get("content") or "")
            if choice.get("finish_reason"):
                break  # the connection closes here
    record = _get(f"{server}/v1/sessions/finish-leaver-1")[1]
    assert record["state"] == "paused" and record["turns"] == 2, record
    history += [{"role": "assistant", "content": "".join(content)}]
    history += [{"role": "user", "content": "more"}]
    third = _ask(client, "finish-leaver-1", history)
    assert third.model_extra["mars"]["history"]["matched_messages"] == 4
    assert third.model_extra["mars"]["history"]["diverged_at"] is None
    assert _get(f"{server}/v1/sessions/finish-leaver-1")[1]["turns"] == 3


def test_errors_name_the_field_in_openai_shape(server: str, client) -> None:
    import openai

    def post(body: dict, headers: dict | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"{server}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    base = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    cases = [
        ({**base, "temperature": "hot"}, None, 400, "temperature"),
        ({**base, "frobnicate": 1}, None, 400, "frobnicate"),
        ({**base, "mars": {"expected_api_s": -1}}, None, 400, "mars.expected_api_s"),
        ({**base, "n": 2, "temperature": 1}, {"X-Session-Id": "n-1"}, 400, "n"),
        ({**base, "session_id": "a"}, {"X-Session-Id": "b"}, 400, "session_id"),
    ]
    for body, headers, status, param in cases:
        got, reply = post(body, headers)
        assert got == status, (body, reply)
        assert param in (reply["error"]["param"] or "") + reply["error"]["message"], reply
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=base["messages"])
    assert _get(f"{server}/v1/sessions/ghost")[0] == 404


def test_an_ended_session_id_starts_a_new_session(server: str, client) -> None:
    import openai

    for i in range(2):
        turn = _ask(client, "reused-1", [{"role": "user", "content": f"hello {i}"}])
        assert turn.model_extra["mars"]["history"]["matched_messages"] == 0
        assert _get(f"{server}/v1/sessions/reused-1")[1]["turns"] == 1
        if i == 0:
            delete = urllib.request.Request(f"{server}/v1/sessions/reused-1", method="DELETE")
            with urllib.request.urlopen(delete, timeout=60) as response:
                assert response.status == 200
        else:
            last = client.completions.create(
                model=MODEL,
                prompt=[1, 2, 3],
                max_tokens=1,
                extra_headers={"X-Session-Id": "reused-1"},
                extra_body={"mars": {"close": True}},
            )
            assert last.model_extra["mars"]["session_state"] == "closed"
        assert _get(f"{server}/v1/sessions/reused-1")[0] == 404
    with pytest.raises(openai.NotFoundError):
        client.delete("/sessions/reused-1", cast_to=object)


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
    placements = 3  # every turn is placed (a session's turns by affinity)
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
                messages=[
                    {"role": "user", "content": "look this up"},
                    first.choices[0].message.model_dump(exclude_none=True),
                    {"role": "tool", "content": "found it", "tool_call_id": "c"},
                ],
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
    assert after["created_s"] == stored["created_s"]
    assert len(after["token_ids"]) > len(stored["token_ids"])
