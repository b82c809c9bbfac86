"""Where sessions and the engine-instance registry live.

Two stores with one contract: `InMemoryStateStore` (the single-node default)
and `RedisStateStore` (a real Redis server through redis-py), which lets the
ingress, the global scheduler and the engines restart without losing a
session. A session's record holds the token ids of its whole context: it is
the source of truth, and an engine's KV is a cache of it. Sessions expire
after `session_ttl_s` without an update.

Every change of a session's state goes through `transition`, a
compare-and-set: the record is read, `cluster.session_lifecycle.next_state`
says where the event leads (or raises `SessionConflict`), and the write
lands only if no one wrote in between (Redis WATCH/MULTI; a lock in memory).
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from cluster.session_lifecycle import SessionConflict, SessionEvent, SessionState, next_state

SESSION_PREFIX = "mars:session:"
INSTANCES_KEY = "mars:instances"


@dataclass(frozen=True)
class MessageMark:
    """Where one chat message of the session ends in its token ids, and a
    digest of the message as the client sees it (`cluster.history`)."""

    digest: str
    end: int
    generated: bool = False
    """An assistant message the engine generated (its tokens end where
    generation stopped, before the chat template closes the message)."""


@dataclass(frozen=True)
class SessionRecord:
    """What the cluster knows about one session (`GET /v1/sessions/{id}`)."""

    session_id: str
    instance_id: str
    state: SessionState = SessionState.GENERATING
    turn_id: str = ""
    """The turn that started the current (or last) GENERATING."""
    token_ids: tuple[int, ...] = ()
    """The whole context so far: prompts and generated tokens, as the engine
    saw them."""
    messages: tuple[MessageMark, ...] = ()
    """Chat sessions: one mark per message of the context."""
    turns: int = 0
    """Turns that ended."""
    last_turn: dict[str, Any] = field(default_factory=dict)
    """What the last turn reused of the session's KV (`workers.turns.KvReuse`)."""
    created_s: float = 0.0
    updated_s: float = 0.0

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    def to_json(self) -> str:
        data = asdict(self)
        data["state"] = self.state.value
        data["messages"] = [[m.digest, m.end, m.generated] for m in self.messages]
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> SessionRecord:
        data = json.loads(text)
        data["state"] = SessionState(data["state"])
        data["token_ids"] = tuple(data["token_ids"])
        data["messages"] = tuple(MessageMark(*m) for m in data["messages"])
        return cls(**data)


class UnknownSession(KeyError):
    """No such session (never created, deleted, or expired)."""


Change = Callable[[SessionRecord], SessionRecord]


class StateStore(Protocol):
    def start_turn(self, record: SessionRecord) -> SessionRecord:
        """A session's first turn: create its record (GENERATING); raises
        `SessionConflict` if the id exists (another first turn won)."""
        ...

    def get_session(self, session_id: str) -> SessionRecord: ...

    def transition(
        self, session_id: str, event: SessionEvent, turn_id: str, change: Change | None = None
    ) -> SessionRecord:
        """Apply `event` for turn `turn_id` (and `change` to the record)
        atomically; raises `UnknownSession` or `SessionConflict`."""
        ...

    def delete_session(self, session_id: str) -> None: ...
    def register_instance(self, instance_id: str, info: dict[str, Any]) -> None: ...
    def instances(self) -> dict[str, dict[str, Any]]: ...


def _applied(
    record: SessionRecord, event: SessionEvent, turn_id: str, change: Change | None, now: float
) -> SessionRecord:
    """`record` after `event` of turn `turn_id`: the table's next state, the
    turn check, the caller's change, the update stamp."""
    state = next_state(record.session_id, record.state, event)
    if event is SessionEvent.TURN_STARTED:
        record = replace(record, turn_id=turn_id)
    elif record.turn_id != turn_id:
        raise SessionConflict(record.session_id, record.state, event)
    if change is not None:
        record = change(record)
    return replace(record, state=state, turn_id=record.turn_id, updated_s=now)


def _created(record: SessionRecord, now: float) -> SessionRecord:
    state = next_state(record.session_id, None, SessionEvent.TURN_STARTED)
    return replace(record, state=state, created_s=now, updated_s=now)


class InMemoryStateStore:
    """Sessions in this process (lost with it); the default without a URL."""

    def __init__(self, session_ttl_s: float = 3600.0, clock: Callable[[], float] = time.time):
        self._ttl = session_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, SessionRecord] = {}
        self._instances: dict[str, dict[str, Any]] = {}

    def start_turn(self, record: SessionRecord) -> SessionRecord:
        with self._lock:
            self._expire()
            if record.session_id in self._sessions:
                existing = self._sessions[record.session_id]
                raise SessionConflict(record.session_id, existing.state, SessionEvent.TURN_STARTED)
            stored = _created(record, self._clock())
            self._sessions[record.session_id] = stored
            return stored

    def get_session(self, session_id: str) -> SessionRecord:
        with self._lock:
            self._expire()
            try:
                return self._sessions[session_id]
            except KeyError:
                raise UnknownSession(session_id) from None

    def transition(
        self, session_id: str, event: SessionEvent, turn_id: str, change: Change | None = None
    ) -> SessionRecord:
        with self._lock:
            self._expire()
            if session_id not in self._sessions:
                raise UnknownSession(session_id)
            updated = _applied(self._sessions[session_id], event, turn_id, change, self._clock())
            self._sessions[session_id] = updated
            return updated

    def delete_session(self, session_id: str) -> None:
        with self._lock:
            if self._sessions.pop(session_id, None) is None:
                raise UnknownSession(session_id)

    def register_instance(self, instance_id: str, info: dict[str, Any]) -> None:
        with self._lock:
            self._instances[instance_id] = dict(info)

    def instances(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: dict(v) for k, v in self._instances.items()}

    def _expire(self) -> None:
        cutoff = self._clock() - self._ttl
        for session_id in [k for k, v in self._sessions.items() if v.updated_s < cutoff]:
            del self._sessions[session_id]


class RedisStateStore:
    """Sessions in Redis: one key per session (`mars:session:<id>`, JSON, with a
    TTL refreshed on every write) and the instance registry in one hash.
    Transitions are optimistic transactions (WATCH/MULTI), retried on a
    conflicting write; every call has redis-py's socket timeout."""

    _MAX_RETRIES = 64
    _BACKOFF_S = 0.001
    TIMEOUT_S = 5.0

    def __init__(self, url: str, session_ttl_s: float = 3600.0) -> None:
        import redis

        self._redis = redis.Redis.from_url(
            url, socket_timeout=self.TIMEOUT_S, socket_connect_timeout=self.TIMEOUT_S
        )
        self._ttl_ms = max(1, int(session_ttl_s * 1000))
        self._watch_error = redis.WatchError
        self._redis.ping()  # fail at start-up, with redis-py's message, not at first use

    def start_turn(self, record: SessionRecord) -> SessionRecord:
        stored = _created(record, time.time())
        key = SESSION_PREFIX + record.session_id
        if not self._redis.set(key, stored.to_json(), nx=True, px=self._ttl_ms):
            raise SessionConflict(record.session_id, None, SessionEvent.TURN_STARTED)
        return stored

    def get_session(self, session_id: str) -> SessionRecord:
        raw = self._redis.get(SESSION_PREFIX + session_id)
        if raw is None:
            raise UnknownSession(session_id)
        return SessionRecord.from_json(raw)

    def transition(
        self, session_id: str, event: SessionEvent, turn_id: str, change: Change | None = None
    ) -> SessionRecord:
        key = SESSION_PREFIX + session_id
        for attempt in range(self._MAX_RETRIES):
            with self._redis.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise UnknownSession(session_id)
                    record = SessionRecord.from_json(raw)
                    updated = _applied(record, event, turn_id, change, time.time())
                    pipe.multi()
                    pipe.set(key, updated.to_json(), px=self._ttl_ms)
                    pipe.execute()
                    return updated
                except self._watch_error:
                    # Another writer won: back off a little (jittered) and retry.
                    time.sleep(random.uniform(0, self._BACKOFF_S * (1 + attempt)))
        raise RuntimeError(
            f"session {session_id!r}: update lost {self._MAX_RETRIES} races in a row"
        )

    def delete_session(self, session_id: str) -> None:
        if not self._redis.delete(SESSION_PREFIX + session_id):
            raise UnknownSession(session_id)

    def register_instance(self, instance_id: str, info: dict[str, Any]) -> None:
        self._redis.hset(INSTANCES_KEY, instance_id, json.dumps(info))

    def instances(self) -> dict[str, dict[str, Any]]:
        raw = self._redis.hgetall(INSTANCES_KEY)
        return {key.decode(): json.loads(value) for key, value in raw.items()}


def make_state_store(url: str | None, session_ttl_s: float) -> StateStore:
    """Redis when a URL is configured, else the in-process store."""
    if url is None:
        return InMemoryStateStore(session_ttl_s)
    return RedisStateStore(url, session_ttl_s)
