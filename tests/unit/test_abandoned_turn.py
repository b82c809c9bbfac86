"""How the ingress reads an abandoned turn's session from its engine
(`Ingress._session_after_chunk`): the control flow only, against a stand-in
for the engine's Serve handle that raises what Serve raises. The whole path
on real Ray Serve is `tests/cluster/test_http.py::
test_a_client_leaving_mid_stream_leaves_its_session_paused`."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from cluster import ingress as ingress_module
from cluster.ingress import Ingress

PAUSED = {"state": "awaiting_client", "context_tokens": 40}


class _SessionInfo:
    """`handle.session_info` whose `.remote()` answers from a script."""

    def __init__(self, outcomes: list[object]) -> None:
        self.outcomes = outcomes
        self.calls = 0

    async def remote(self, session_id: str) -> dict:
        assert session_id == "s1@0"  # the engine knows this incarnation by its engine id
        self.calls += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def _read(outcomes: list[object]) -> tuple[dict, int]:
    info = _SessionInfo(outcomes)
    ingress = object.__new__(Ingress)  # only its engines are read here
    ingress._engines = {"default-0": SimpleNamespace(session_info=info)}
    turn = SimpleNamespace(
        session_id="s1", engine_session_id="s1@0", request_id="r1", instance_id="default-0"
    )
    return asyncio.run(ingress._session_after_chunk(turn)), info.calls


@pytest.fixture(autouse=True)
def _no_poll_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingress_module, "ABANDONED_TURN_POLL_S", 0.0)


def test_a_session_unknown_to_the_engine_reads_as_finished() -> None:
    info, calls = _read([KeyError("unknown session_id 's1'")])
    assert info["state"] == "finished" and calls == 1


def test_a_failed_call_is_retried_not_read_as_finished() -> None:
    info, calls = _read([RuntimeError("replica restarting"), PAUSED])
    assert info == PAUSED and calls == 2


def test_a_generating_chunk_is_polled_until_it_pauses() -> None:
    info, calls = _read([{"state": "generating", "context_tokens": 30}, PAUSED])
    assert info == PAUSED and calls == 2


def test_failures_past_the_deadline_are_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingress_module, "ABANDONED_TURN_TIMEOUT_S", -1.0)
    with pytest.raises(RuntimeError, match="replica restarting"):
        _read([RuntimeError("replica restarting")])
