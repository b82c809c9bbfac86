"""Where sessions and the engine-instance registry live.

Two stores with one contract: `InMemoryStateStore` (the single-node default)
and `RedisStateStore` (a real Redis server through redis-py), which lets the
ingress and the global scheduler restart without losing a session. Sessions
expire after `session_ttl_s` without an update; every update is atomic.
"""

from __future__ import annotations

import enum
import json
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

SESSION_PREFIX = "mars:session:"
INSTANCES_KEY = "mars:instances"


class SessionState(str, enum.Enum):
    GENERATING = "generating"
    PAUSED = "paused"
    """Waiting for a tool result (client- or server-side)."""
    FINISHED = "finished"


@dataclass(frozen=True)
class SessionRecord:
    """What the cluster knows about one session (`GET /v1/sessions/{id}`)."""

    session_id: str
    instance_id: str
    engine_session_id: str = ""
    """The id the engine knows this session by. A client may reuse a session
    id once its session has ended, while the engine still keeps the ended
    session (`finished_sessions_kept`); each incarnation of an id therefore
    gets its own engine id (`new_engine_session_id`). Empty (and in records
    written before the field existed) means the session id itself."""
    state: SessionState = SessionState.GENERATING
    strategy: str | None = None
    """The KV strategy MARS chose for the current pause, if paused."""
    tokens: int = 0
    """Context tokens so far."""
    created_s: float = 0.0
    updated_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.engine_session_id:
            object.__setattr__(self, "engine_session_id", self.session_id)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "state": self.state.value})

    @classmethod
    def from_json(cls, text: str | bytes) -> SessionRecord:
        data = json.loads(text)
        return cls(**{**data, "state": SessionState(data["state"])})


def new_engine_session_id(session_id: str) -> str:
    """A fresh engine id for a new incarnation of `session_id`; it starts with
    the session id, so engine logs still name the session."""
    return f"{session_id}@{uuid.uuid4().hex[:12]}"


class UnknownSession(KeyError):
    """No such session (never created, deleted, or expired)."""


class StateStore(Protocol):
    def create_session(self, record: SessionRecord) -> SessionRecord: ...
    def get_session(self, session_id: str) -> SessionRecord: ...
    def update_session(
        self, session_id: str, change: Callable[[SessionRecord], SessionRecord]
    ) -> SessionRecord: ...
    def delete_session(self, session_id: str) -> None: ...
    def register_instance(self, instance_id: str, info: dict[str, Any]) -> None: ...
    def instances(self) -> dict[str, dict[str, Any]]: ...


def _stamped(record: SessionRecord, now: float, *, created: bool = False) -> SessionRecord:
    return replace(record, created_s=now if created else record.created_s, updated_s=now)


class InMemoryStateStore:
    """Sessions in this process (lost with it); the default without a URL."""

    def __init__(self, session_ttl_s: float = 3600.0, clock: Callable[[], float] = time.time):
        self._ttl = session_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, SessionRecord] = {}
        self._instances: dict[str, dict[str, Any]] = {}

    def create_session(self, record: SessionRecord) -> SessionRecord:
        with self._lock:
            self._expire()
            if record.session_id in self._sessions:
                raise ValueError(f"session {record.session_id!r} already exists")
            stored = _stamped(record, self._clock(), created=True)
            self._sessions[record.session_id] = stored
            return stored

    def get_session(self, session_id: str) -> SessionRecord:
        with self._lock:
            self._expire()
            try:
                return self._sessions[session_id]
            except KeyError:
                raise UnknownSession(session_id) from None

    def update_session(
        self, session_id: str, change: Callable[[SessionRecord], SessionRecord]
    ) -> SessionRecord:
        with self._lock:
            self._expire()
            if session_id not in self._sessions:
                raise UnknownSession(session_id)
            updated = _stamped(change(self._sessions[session_id]), self._clock())
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
    Updates are optimistic transactions (WATCH/MULTI), retried on conflict."""

    _MAX_RETRIES = 64
    _BACKOFF_S = 0.001

    def __init__(self, url: str, session_ttl_s: float = 3600.0) -> None:
        import redis

        self._redis = redis.Redis.from_url(url, socket_timeout=5.0)
        self._ttl_ms = max(1, int(session_ttl_s * 1000))
        self._watch_error = redis.WatchError
        self._redis.ping()  # fail at start-up, with redis-py's message, not at first use

    def create_session(self, record: SessionRecord) -> SessionRecord:
        stored = _stamped(record, time.time(), created=True)
        key = SESSION_PREFIX + record.session_id
        if not self._redis.set(key, stored.to_json(), nx=True, px=self._ttl_ms):
            raise ValueError(f"session {record.session_id!r} already exists")
        return stored

    def get_session(self, session_id: str) -> SessionRecord:
        raw = self._redis.get(SESSION_PREFIX + session_id)
        if raw is None:
            raise UnknownSession(session_id)
        return SessionRecord.from_json(raw)

    def update_session(
        self, session_id: str, change: Callable[[SessionRecord], SessionRecord]
    ) -> SessionRecord:
        key = SESSION_PREFIX + session_id
        for attempt in range(self._MAX_RETRIES):
            with self._redis.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise UnknownSession(session_id)
                    updated = _stamped(change(SessionRecord.from_json(raw)), time.time())
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
