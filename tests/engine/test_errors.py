"""Bad input gets a clear error naming the field; the engine keeps serving."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tests.engine.helpers import mars_engine, prompt
from workers.engine import AugmentedRequest, EngineConfig, Segment, SessionEnded, SessionState
from workers.settings import SchedulerSettings
from workers.tools import ToolCall

pytestmark = pytest.mark.engine


def test_config_errors_name_the_field():
    with pytest.raises(ValidationError, match="unknown engine policy 'fifo'"):
        SchedulerSettings(policy="fifo")
    with pytest.raises(ValidationError, match="block_size"):
        EngineConfig(model="m", block_size=48)
    with pytest.raises(ValidationError, match="extra"):
        EngineConfig(model="m", blocks=3)


def test_request_errors_name_the_field_and_the_engine_keeps_serving(tiny_model_dir):
    with pytest.raises(ValueError, match="duration_s must be >= 0"):
        ToolCall("emulated", duration_s=-1.0)
    with mars_engine(tiny_model_dir) as engine:
        ok = engine.submit(
            AugmentedRequest(
                "ok", prompt(40), [Segment(4, ToolCall("calculator", arguments="6*7")), Segment(4)]
            )
        )
        bad = [
            (
                AugmentedRequest("t", prompt(8), [Segment(4, ToolCall("nope")), Segment(2)]),
                "unknown tool 'nope'",
            ),
            (AugmentedRequest("l", prompt(8), [Segment(2000)]), "max_model_len"),
            (AugmentedRequest("m", prompt(8), [Segment(2), Segment(2)]), r"segments\[0\].call"),
            (AugmentedRequest("e", [], [Segment(2)]), "prompt_token_ids"),
            (AugmentedRequest("ok", prompt(8), [Segment(2)]), "already exists"),
        ]
        for request, message in bad:
            with pytest.raises(ValueError, match=message):
                engine.submit(request)
        with pytest.raises(KeyError, match="unknown session_id 'ghost'"):
            engine.continue_session("ghost", [1], 4)
        with pytest.raises(ValueError, match="max_tokens must be >= 1"):
            engine.open_session("c", prompt(8), 0)
        engine.run_until_idle(timeout_s=120)
        assert ok.state is SessionState.FINISHED
        assert len(ok.outputs) == 2 and all(len(o) == 4 for o in ok.outputs)
        calculator_result = engine.tokenizer.encode("42", add_special_tokens=False)
        assert ok.context_tokens == 40 + 3 + len(calculator_result) + 3
        with pytest.raises(SessionEnded, match="a new session needs a new id"):
            engine.continue_session("ok", [1], 4)


def test_start_up_profiling_measures_costs(tiny_model_dir):
    with mars_engine(tiny_model_dir, profile_costs=True) as engine:
        cost = engine.scheduler.cost
        assert cost.iter_fixed_s + cost.iter_per_token_s > 0
        assert cost.swap_s_per_token > 0
        # 2 layers x 1 KV head x 64 dims x (K + V) x 2 bytes (bf16)
        assert cost.kv_bytes_per_token == 512


def test_finished_sessions_beyond_the_retention_are_forgotten(tiny_model_dir):
    """A server finishes sessions without end: past `finished_sessions_kept`,
    the oldest finished session and its scheduler record are dropped, and the
    engine keeps serving (a forgotten id is unknown, so it can be reused)."""
    with mars_engine(tiny_model_dir, finished_sessions_kept=2) as engine:
        for name in ("a", "b", "c", "a"):
            engine.open_session(name, prompt(12), 3)
            engine.run_until_idle(timeout_s=120)
            engine.close_session(name)
            engine.run_until_idle(timeout_s=120)
        assert list(engine.sessions) == ["c", "a"]
        assert len(engine.scheduler.records) == 2
        with pytest.raises(KeyError, match="unknown session_id 'b'"):
            engine.record("b")
        assert engine.record("a").phase.value == "finished"


def test_sessions_idle_past_the_limit_are_closed_and_free_their_kv(tiny_model_dir):
    """A client that never comes back: its paused session is closed once it
    has awaited the client longer than the limit, and its blocks are freed;
    a session that has not waited that long, or is not awaiting its client,
    is left alone."""
    with mars_engine(tiny_model_dir) as engine:
        free_before = engine.scheduler.free_blocks()
        engine.open_session("gone", prompt(70), 3)
        engine.run_until_idle(timeout_s=120)
        engine.open_session("back", prompt(12), 3)
        engine.run_until_idle(timeout_s=120)
        gone, back = engine.sessions["gone"], engine.sessions["back"]
        assert gone.state is back.state is SessionState.AWAITING_CLIENT
        assert engine.close_idle_sessions(3600.0) == []
        # "back" paused later than "gone": a clock between the two idle times.
        between = (
            gone.awaiting_since_s + 3600.0 + (back.awaiting_since_s - gone.awaiting_since_s) / 2
        )
        assert engine.close_idle_sessions(3600.0, now=between) == ["gone"]
        engine.run_until_idle(timeout_s=120)
        assert gone.state is SessionState.FINISHED
        assert back.state is SessionState.AWAITING_CLIENT and back.awaiting_since_s is not None
        engine.continue_session("back", [5, 6], 2)
        assert back.awaiting_since_s is None
        assert engine.close_idle_sessions(0.0, now=between + 10_000) == []
        engine.run_until_idle(timeout_s=120)
        engine.close_session("back")
        engine.run_until_idle(timeout_s=120)
        assert engine.scheduler.free_blocks() == free_before
