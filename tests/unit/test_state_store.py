"""Both state stores keep the same contract; Redis runs as a real server."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from cluster.state_store import (
    InMemoryStateStore,
    RedisStateStore,
    SessionRecord,
    SessionState,
    UnknownSession,
    make_state_store,
    new_engine_session_id,
)


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        return InMemoryStateStore(session_ttl_s=60)
    url = request.getfixturevalue("redis_url")
    import redis

    redis.Redis.from_url(url).flushdb()
    return RedisStateStore(url, session_ttl_s=60)


def test_session_round_trip(store) -> None:
    created = store.create_session(SessionRecord("s1", "default-0", tokens=12))
    assert created.created_s > 0 and created.updated_s == created.created_s
    assert store.get_session("s1") == created
    paused = store.update_session(
        "s1", lambda r: replace(r, state=SessionState.PAUSED, strategy="swap", tokens=40)
    )
    assert store.get_session("s1") == paused
    assert (paused.state, paused.strategy, paused.tokens) == (SessionState.PAUSED, "swap", 40)
    store.delete_session("s1")
    with pytest.raises(UnknownSession):
        store.get_session("s1")


def test_each_incarnation_of_a_session_id_has_its_own_engine_id(store) -> None:
    first = new_engine_session_id("s1")
    store.create_session(SessionRecord("s1", "default-0", first))
    assert store.get_session("s1").engine_session_id == first
    store.delete_session("s1")
    second = new_engine_session_id("s1")
    store.create_session(SessionRecord("s1", "default-0", second))
    assert store.get_session("s1").engine_session_id == second != first
    assert first.startswith("s1@") and second.startswith("s1@")


def test_a_record_without_an_engine_id_uses_the_session_id() -> None:
    """Records written before `engine_session_id` existed still resolve."""
    old = (
        '{"session_id": "s1", "instance_id": "default-0", "state": "paused", '
        '"strategy": null, "tokens": 5, "created_s": 1.0, "updated_s": 2.0}'
    )
    record = SessionRecord.from_json(old)
    assert record.engine_session_id == "s1" and record.tokens == 5
    assert SessionRecord.from_json(record.to_json()) == record


def test_errors(store) -> None:
    store.create_session(SessionRecord("s1", "default-0"))
    with pytest.raises(ValueError, match="already exists"):
        store.create_session(SessionRecord("s1", "default-1"))
    for call in (
        lambda: store.get_session("ghost"),
        lambda: store.update_session("ghost", lambda r: r),
        lambda: store.delete_session("ghost"),
    ):
        with pytest.raises(UnknownSession):
            call()


def test_concurrent_updates_are_atomic(store) -> None:
    store.create_session(SessionRecord("c", "default-0"))

    def add_tokens() -> None:
        for _ in range(50):
            store.update_session("c", lambda r: replace(r, tokens=r.tokens + 1))

    threads = [threading.Thread(target=add_tokens) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get_session("c").tokens == 200


def test_instance_registry(store) -> None:
    store.register_instance("default-0", {"pool": "default", "blocks": 128})
    store.register_instance("default-1", {"pool": "default", "blocks": 128})
    assert store.instances()["default-1"] == {"pool": "default", "blocks": 128}


def test_idle_sessions_expire() -> None:
    now = [1000.0]
    store = InMemoryStateStore(session_ttl_s=10, clock=lambda: now[0])
    store.create_session(SessionRecord("old", "default-0"))
    now[0] += 5
    store.update_session("old", lambda r: r)  # activity refreshes the TTL
    now[0] += 9
    assert store.get_session("old").session_id == "old"
    now[0] += 11
    with pytest.raises(UnknownSession):
        store.get_session("old")


def test_redis_ttl_is_set_and_survives_a_new_client(redis_url) -> None:
    import redis

    first = RedisStateStore(redis_url, session_ttl_s=30)
    first.create_session(SessionRecord("kept", "default-1", tokens=7))
    ttl_ms = redis.Redis.from_url(redis_url).pttl("mars:session:kept")
    assert 0 < ttl_ms <= 30_000
    restarted = make_state_store(redis_url, 30)  # e.g. the ingress after a restart
    assert restarted.get_session("kept").tokens == 7


def test_unreachable_redis_fails_at_start() -> None:
    import redis

    with pytest.raises(redis.ConnectionError):
        RedisStateStore("redis://127.0.0.1:1/0")
