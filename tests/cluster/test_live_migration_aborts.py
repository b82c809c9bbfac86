"""Live moves that cannot complete, on real engines, each leaving its
client's stream whole (or ended in band, when the source itself died) and
no instance holding anything of the move:

- the destination has no room for the turn's KV (one block of host
  space), so its commit fails after the source stopped the turn; the
  source takes the turn back;
- the destination's process is killed (SIGKILL) as the move starts: its
  first stage finds it dead, or its restarted replica, and the turn goes
  on at the source;
- the source's process is killed while the turn streams: the stream ends
  with an in-band 503, the move finds no turn to move, and the session's
  next turn is rebuilt from its record (the sessions issue's replay).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.ports import free_port
from tests.cluster.serving import call, read_stream, serve_app, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

MODEL = "tiny"
APP = "mars"
"""The Serve application's name (`serve_app`)."""
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

    text, mars, usage = read_stream([*head, *chunks])
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


def _client(server: str):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def _long_second_turn(server: str, session: str) -> tuple[str, list[dict], object]:
    """A short first turn (its instance is the session's), then a streamed
    second turn of 400 tokens; the instance, the second turn's history and
    its chunks."""
    client = _client(server)
    history = [{"role": "user", "content": f"{session}: a question"}]
    first = client.chat.completions.create(
        model=MODEL,
        messages=history,
        max_tokens=4,
        temperature=0,
        extra_headers={"X-Session-Id": session},
    )
    history += [first.choices[0].message.model_dump(exclude_none=True)]
    history += [{"role": "user", "content": "now a long answer, please"}]
    stream = client.chat.completions.create(
        model=MODEL,
        messages=history,
        max_tokens=400,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
        extra_headers={"X-Session-Id": session},
    )
    return first.model_extra["mars"]["instance_id"], history, iter(stream)


def test_a_destination_killed_as_the_move_starts_leaves_the_turn_at_its_source(
    server: str,
) -> None:
    from bench.openai_conformance import engine_replica_pid, kill_engine_replica

    for instance in (ROOMY, TIGHT):  # alive (an earlier test's kill may linger)
        engine_replica_pid(instance, APP)
    source, _, chunks = _long_second_turn(server, "orphaned")
    (destination,) = {ROOMY, TIGHT} - {source}
    head = [next(chunks) for _ in range(5)]
    kill_engine_replica(destination, APP)
    status, body = call(
        "POST", f"{server}/v1/sessions/orphaned/migrate", {"instance_id": destination}
    )
    text, mars, usage = read_stream([*head, *chunks])
    # The turn went on where it was, every token once, whether the stage found
    # the dead replica (aborted_destination) or waited for its restart while
    # the turn ended (aborted_source).
    assert status != 200 and body["error"]["message"], body
    assert usage.completion_tokens == 400 and text and mars["instance_id"] == source, mars
    assert "moves" not in mars, mars
    # The destination, once back, holds nothing of the move: every block free.
    engine_replica_pid(destination, APP)
    back = wait_until("the destination's load", lambda: _loads(server).get(destination))
    assert back["free_blocks"] == back["total_blocks"], back
    record = call("GET", f"{server}/v1/sessions/orphaned")[1]
    assert record["instance_id"] == source and record["state"] == "paused", record


def test_a_source_killed_mid_stream_has_no_turn_to_move_and_its_session_replays(
    server: str,
) -> None:
    import openai

    from bench.openai_conformance import engine_replica_pid, kill_engine_replica

    for instance in (ROOMY, TIGHT):
        engine_replica_pid(instance, APP)
    source, history, chunks = _long_second_turn(server, "sunk")
    (destination,) = {ROOMY, TIGHT} - {source}
    next(chunks)
    before = _loads(server)[destination]
    kill_engine_replica(source, APP)
    with pytest.raises(openai.APIError, match="retry it"):  # in band: the turn failed
        for _ in chunks:
            pass
    status, body = call("POST", f"{server}/v1/sessions/sunk/migrate", {"instance_id": destination})
    assert status != 200 and body["error"]["message"], body
    assert _loads(server)[destination]["free_blocks"] == before["free_blocks"]
    again = wait_until("the retried turn", lambda: _retry(server, "sunk", history), timeout_s=120)
    mars = again.model_extra["mars"]
    assert mars["kv"]["rebuilt_from_record"] is True and mars["history"]["matched_messages"] == 2


def _retry(server: str, session: str, history: list[dict]):
    """The session's turn on `history`, or None while its engine restarts (503)."""
    import openai

    try:
        return _client(server).chat.completions.create(
            model=MODEL,
            messages=history,
            max_tokens=4,
            temperature=0,
            extra_headers={"X-Session-Id": session},
        )
    except openai.APIStatusError as exc:
        if exc.status_code != 503:
            raise
        return None
