"""Bad input gets a clear error naming the field; the engine keeps serving."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from vllm.exceptions import VLLMValidationError

from tests.engine.helpers import mars_engine, next_context, prompt, run_turns, turn
from workers.engine import AugmentedRequest, EngineConfig, PlanState, Segment
from workers.settings import SchedulerSettings
from workers.tools import ToolCall
from workers.turns import SessionAction

pytestmark = pytest.mark.engine


def test_config_errors_name_the_field():
    with pytest.raises(ValidationError, match="unknown engine policy 'fifo'"):
        SchedulerSettings(policy="fifo")
    with pytest.raises(ValidationError, match="block_size"):
        EngineConfig(model="m", block_size=48)
    with pytest.raises(ValidationError, match="extra"):
        EngineConfig(model="m", blocks=3)


def test_turn_shape_errors_name_the_field():
    with pytest.raises(ValueError, match="prompt_token_ids must not be empty"):
        turn("r", [])
    with pytest.raises(ValueError, match="session_id None and action 'keep' disagree"):
        turn("r", [1], action=SessionAction.KEEP)
    with pytest.raises(ValueError, match="n is 2"):
        turn("r", [1], "s", n=2, temperature=1.0)


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
        engine.add_turn(turn("s0", prompt(30, seed=1), "s"))
        engine.add_turn(turn("s1", prompt(30, seed=1), "s"))  # supersedes s0 (its caller left)
        with pytest.raises(ValueError, match="request_id 's1' is already running"):
            engine.add_turn(turn("s1", prompt(30, seed=2)))
        with pytest.raises(ValueError, match="session 's' has a turn running"):
            engine.end_session("s")
        with pytest.raises(VLLMValidationError, match="maximum context length"):  # vLLM's own check
            engine.add_turn(turn("long", prompt(1100)))
        with pytest.raises(KeyError, match="unknown session_id 'ghost'"):
            engine.session_info("ghost")
        ends = {e.request_id: e for e in engine.run_until_idle(timeout_s=120) if hasattr(e, "kv")}
        assert ok.state is PlanState.FINISHED
        assert [len(o) for o in ok.outputs] == [4, 4]
        calculator_result = engine.tokenizer.encode("42", add_special_tokens=False)
        assert len(ok.context) == 40 + 4 + len(calculator_result) + 4
        assert len(ends["s1"].output_token_ids) == 8 and "s0" not in ends


def test_start_up_profiling_measures_costs(tiny_model_dir):
    with mars_engine(tiny_model_dir, profile_costs=True) as engine:
        cost = engine.scheduler.cost
        assert cost.iter_fixed_s + cost.iter_per_token_s > 0
        assert cost.swap_s_per_token > 0
        # 2 layers x 1 KV head x 64 dims x (K + V) x 2 bytes (bf16)
        assert cost.kv_bytes_per_token == 512


def test_ended_sessions_beyond_the_retention_are_forgotten(tiny_model_dir):
    """A server ends sessions without end: past `finished_sessions_kept`, the
    oldest ended session's record is dropped, and the engine keeps serving
    (an ended id starts a new session)."""
    with mars_engine(tiny_model_dir, finished_sessions_kept=2) as engine:
        for name in ("a", "b", "c", "a"):
            run_turns(engine, turn(f"{name}-{len(engine.scheduler.records)}", prompt(12), name))
            engine.end_session(name)
        assert set(engine.scheduler.records) == {"c", "a"}
        with pytest.raises(KeyError, match="unknown session_id 'b'"):
            engine.session_info("b")
        assert engine.session_info("a").phase.value == "finished"
        assert engine.session_info("a").turns == 1  # a new incarnation, not a resumed one


def test_sessions_idle_past_the_limit_are_closed_and_free_their_kv(tiny_model_dir):
    """A client that never comes back: its parked session is ended once it
    has waited longer than the limit, and its blocks are freed; a session
    that has not waited that long, or has a turn running, is left alone."""
    with mars_engine(tiny_model_dir) as engine:
        free_before = engine.scheduler.free_blocks()
        gone = run_turns(engine, turn("g1", prompt(70), "gone"))["g1"]
        back = run_turns(engine, turn("b1", prompt(12, seed=1), "back"))["b1"]
        assert gone and back
        assert engine.close_idle_sessions(3600.0) == []
        paused = {s: engine.record(s).paused_at_s for s in ("gone", "back")}
        between = paused["gone"] + 3600.0 + (paused["back"] - paused["gone"]) / 2
        assert engine.close_idle_sessions(3600.0, now=between) == ["gone"]
        assert engine.session_info("gone").phase.value == "finished"
        assert engine.session_info("back").phase.value == "paused"
        engine.add_turn(turn("b2", next_context(back, [5, 6]), "back", max_tokens=2))
        assert engine.close_idle_sessions(0.0, now=between + 10_000) == []
        engine.run_until_idle(timeout_s=120)
        engine.end_session("back")
        assert engine.scheduler.free_blocks() == free_before
