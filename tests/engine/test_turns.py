"""What a turn being an ordinary vLLM request gives a session: vLLM's whole
sampling on resumed turns, and prefix caching shared across requests."""

from __future__ import annotations

import pytest

from tests.engine.helpers import mars_engine, next_context, prompt, run_turns, turn

pytestmark = pytest.mark.engine


def test_a_resumed_turn_honours_stop_strings_and_seeds(tiny_model_dir):
    from vllm.sampling_params import RequestOutputKind

    with mars_engine(tiny_model_dir) as engine:
        first = run_turns(engine, turn("a1", prompt(60), "a", max_tokens=6))["a1"]
        context = next_context(first, [5, 6, 7])
        free = run_turns(engine, turn("probe", context, max_tokens=24))["probe"]
        text = engine.tokenizer.decode(list(free.output_token_ids))
        stop = next(c for c in text[len(text) // 3 :] if c.isascii() and c.isalpha())

        final = RequestOutputKind.FINAL_ONLY
        engine.add_turn(turn("a2", context, "a", max_tokens=24, stop=[stop], output_kind=final))
        (output,) = [e.output for e in engine.run_until_idle() if hasattr(e, "output")]
        completion = output.outputs[0]
        assert completion.finish_reason == "stop" and completion.stop_reason == stop
        assert stop not in completion.text and len(completion.text) < len(text)
        assert engine.session_info("a").phase.value == "paused"  # the session goes on

        def sample(request_id, session):
            seeded = {"temperature": 1.0, "seed": 11, "max_tokens": 12}
            end = run_turns(engine, turn(request_id, context, session, **seeded))[request_id]
            return end.output_token_ids

        assert sample("s1", "x") == sample("s2", "y")  # a fixed seed: the same tokens
        greedy = run_turns(engine, turn("g", context, max_tokens=12))["g"].output_token_ids
        assert sample("s3", "z") != greedy  # and it did sample


def test_a_shared_system_prompt_is_computed_once(tiny_model_dir):
    """Sessions of one agent share its system prompt: the second session's
    first turn hits the first's cached blocks (vLLM's own count), and the
    parked sessions' load counts the shared blocks once."""
    with mars_engine(tiny_model_dir) as engine:
        system = prompt(128, seed=6)
        ends = run_turns(
            engine,
            turn("a1", [*system, *prompt(20, seed=1)], "a"),
        )
        assert ends["a1"].kv.cached_tokens == 0
        ends = run_turns(engine, turn("b1", [*system, *prompt(20, seed=2)], "b"))
        assert ends["b1"].kv.cached_tokens == 128
        load = engine.scheduler.load_snapshot()
        # 128 + 20 + 8 tokens each: 4 shared blocks + 1 of each session's own.
        assert load["paused_preserved_blocks"] == 4 + 2
        assert load["paused_preserved_sessions"] == 2
