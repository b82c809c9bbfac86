"""Both state stores keep the same contract; Redis runs as a real server."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from cluster.session_lifecycle import SessionConflict, SessionEvent, SessionState, next_state
from cluster.state_store import (
    InMemoryStateStore,
    MessageMark,
    RedisStateStore,
    SessionRecord,
    UnknownSession,
    make_state_store,
)


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        return InMemoryStateStore(session_ttl_s=60)
    url = request.getfixturevalue("redis_url")
    import redis

    redis.Redis.from_url(url).flushdb()
    return RedisStateStore(url, session_ttl_s=60)


def _ended(tokens, marks=()):
    return lambda r: replace(r, token_ids=tuple(tokens), messages=tuple(marks), turns=r.turns + 1)


def test_a_session_lives_turn_by_turn(store) -> None:
    started = store.start_turn(SessionRecord("s1", "default-0", turn_id="t1"))
    assert started.state is SessionState.GENERATING and started.created_s > 0
    marks = [MessageMark("d1", 5), MessageMark("d2", 9, generated=True)]
    paused = store.transition("s1", SessionEvent.TURN_ENDED, "t1", _ended(range(9), marks))
    assert store.get_session("s1") == paused
    assert (paused.state, paused.tokens, paused.turns) == (SessionState.PAUSED, 9, 1)
    assert paused.messages == tuple(marks)
    resumed = store.transition("s1", SessionEvent.TURN_STARTED, "t2")
    assert resumed.state is SessionState.GENERATING and resumed.turn_id == "t2"
    failed = store.transition("s1", SessionEvent.TURN_FAILED, "t2")
    assert failed.state is SessionState.PAUSED and failed.tokens == 9  # kept as before
    store.delete_session("s1")
    with pytest.raises(UnknownSession):
        store.get_session("s1")


def test_a_second_turn_of_a_generating_session_conflicts(store) -> None:
    store.start_turn(SessionRecord("s1", "default-0", turn_id="t1"))
    with pytest.raises(SessionConflict, match="is generating; wait for its turn to end"):
        store.transition("s1", SessionEvent.TURN_STARTED, "t2")
    with pytest.raises(SessionConflict):  # two first turns: one record
        store.start_turn(SessionRecord("s1", "default-1", turn_id="t3"))
    with pytest.raises(SessionConflict, match="does not match its current turn"):
        store.transition("s1", SessionEvent.TURN_ENDED, "t2")  # not the current turn
    store.transition("s1", SessionEvent.TURN_ENDED, "t1")
    with pytest.raises(SessionConflict):  # ended twice
        store.transition("s1", SessionEvent.TURN_ENDED, "t1")


def test_a_paused_session_moves_only_if_no_turn_came_in_between(store) -> None:
    def to(instance):
        return lambda r: replace(r, instance_id=instance)

    store.start_turn(SessionRecord("s1", "default-0", turn_id="t1"))
    with pytest.raises(SessionConflict, match="moves only while paused"):
        store.transition("s1", SessionEvent.MIGRATED, "t1", to("default-1"))  # generating
    store.transition("s1", SessionEvent.TURN_ENDED, "t1", _ended(range(9)))
    moved = store.transition("s1", SessionEvent.MIGRATED, "t1", to("default-1"))
    assert (moved.state, moved.instance_id, moved.tokens) == (SessionState.PAUSED, "default-1", 9)
    store.transition("s1", SessionEvent.TURN_STARTED, "t2")
    store.transition("s1", SessionEvent.TURN_ENDED, "t2")
    with pytest.raises(SessionConflict, match="had a turn meanwhile"):  # read before t2
        store.transition("s1", SessionEvent.MIGRATED, "t1", to("default-0"))
    assert store.get_session("s1").instance_id == "default-1"


def test_unknown_sessions(store) -> None:
    for call in (
        lambda: store.get_session("ghost"),
        lambda: store.transition("ghost", SessionEvent.TURN_STARTED, "t"),
        lambda: store.delete_session("ghost"),
    ):
        with pytest.raises(UnknownSession):
            call()


def test_concurrent_turn_starts_let_exactly_one_in(store) -> None:
    store.start_turn(SessionRecord("c", "default-0", turn_id="t0"))
    store.transition("c", SessionEvent.TURN_ENDED, "t0")
    won, lost = [], []

    def start(i: int) -> None:
        try:
            store.transition("c", SessionEvent.TURN_STARTED, f"t{i}")
            won.append(i)
        except SessionConflict:
            lost.append(i)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 7
    assert store.get_session("c").turn_id == f"t{won[0]}"


def test_the_transition_table() -> None:
    assert next_state("s", None, SessionEvent.TURN_STARTED) is SessionState.GENERATING
    assert (
        next_state("s", SessionState.PAUSED, SessionEvent.TURN_STARTED) is SessionState.GENERATING
    )
    for event in (SessionEvent.TURN_ENDED, SessionEvent.TURN_FAILED):
        assert next_state("s", SessionState.GENERATING, event) is SessionState.PAUSED
        with pytest.raises(SessionConflict):
            next_state("s", SessionState.PAUSED, event)
        with pytest.raises(SessionConflict):
            next_state("s", None, event)


def test_record_round_trips_through_json() -> None:
    record = SessionRecord(
        "s1",
        "default-0",
        SessionState.PAUSED,
        "t1",
        (1, 2, 3),
        (MessageMark("a", 2), MessageMark("b", 3, True)),
        1,
        {"cached_tokens": 2},
        1.0,
        2.0,
    )
    assert SessionRecord.from_json(record.to_json()) == record


def test_instance_registry(store) -> None:
    store.register_instance("default-0", {"pool": "default", "blocks": 128})
    store.register_instance("default-1", {"pool": "default", "blocks": 128})
    assert store.instances()["default-1"] == {"pool": "default", "blocks": 128}


def test_idle_sessions_expire() -> None:
    now = [1000.0]
    store = InMemoryStateStore(session_ttl_s=10, clock=lambda: now[0])
    store.start_turn(SessionRecord("old", "default-0", turn_id="t"))
    now[0] += 5
    store.transition("old", SessionEvent.TURN_ENDED, "t")  # activity refreshes the TTL
    now[0] += 9
    assert store.get_session("old").session_id == "old"
    now[0] += 11
    with pytest.raises(UnknownSession):
        store.get_session("old")


def test_redis_ttl_is_set_and_survives_a_new_client(redis_url) -> None:
    import redis

    first = RedisStateStore(redis_url, session_ttl_s=30)
    first.start_turn(SessionRecord("kept", "default-1", turn_id="t"))
    first.transition("kept", SessionEvent.TURN_ENDED, "t", _ended(range(7)))
    ttl_ms = redis.Redis.from_url(redis_url).pttl("mars:session:kept")
    assert 0 < ttl_ms <= 30_000
    restarted = make_state_store(redis_url, 30)  # e.g. the ingress after a restart
    assert restarted.get_session("kept").token_ids == tuple(range(7))


def test_unreachable_redis_fails_at_start() -> None:
    import redis

    with pytest.raises(redis.ConnectionError):
        RedisStateStore("redis://127.0.0.1:1/0")
