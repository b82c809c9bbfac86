"""A paused session moves to another engine with its KV (`workers.kv_transport`):
exported from one real vLLM engine, imported into a second one started
after the first stopped (vLLM holds one KV connector per process), and
loaded there by the session's next turn, proved by vLLM's own count of the
prompt tokens the turn did not compute and by the KV bytes themselves."""

from __future__ import annotations

import pytest
import torch

from tests.engine.helpers import (
    PRESERVE_IS_CHEAP,
    SWAP_IS_CHEAP,
    kv_blocks,
    mars_engine,
    next_context,
    prompt,
    run_turns,
    step_until,
    turn,
)
from workers import vllm_hooks
from workers.hints import SegmentHints
from workers.kv_transport import SessionKv
from workers.turns import SessionAction, TurnEnd

pytestmark = pytest.mark.engine

PROMPT_TOKENS = 90
FIRST_TURN = 8
KEPT = PROMPT_TOKENS + FIRST_TURN - 1  # KV exists for all but the last sampled token
LONG_CALL = SegmentHints(tool="search", api_s=100.0)
NEW_TOKENS = [5, 6, 7]


def _first_turn(engine, session_id: str = "s", seed: int = 0) -> TurnEnd:
    ends = run_turns(engine, turn("t1", prompt(PROMPT_TOKENS, seed=seed), session_id))
    return ends["t1"]


def _second_turn(engine, first: TurnEnd, session_id: str = "s") -> TurnEnd:
    return run_turns(engine, turn("t2", next_context(first, NEW_TOKENS), session_id))["t2"]


def _stacked(kv: SessionKv) -> torch.Tensor:
    """The exported blocks as `kv_blocks` reads an engine's: [layers, blocks, ...]."""
    (shard,) = kv.shards
    return torch.stack([shard[name].float() for name in sorted(shard)])


def test_a_preserved_session_moves_and_its_next_turn_loads_all_its_kv(tiny_model_dir):
    with mars_engine(tiny_model_dir, cost=PRESERVE_IS_CHEAP) as source:
        first = _first_turn(source)
        assert source.session_info("s").strategy.value == "preserve"
        kv = source.export_session("s")
        assert kv.token_ids == (*first.prompt_token_ids, *first.output_token_ids)[:KEPT]
        assert kv.num_blocks == 4 and kv.nbytes == 4 * 32 * source.scheduler.kv_bytes_per_token
        assert torch.equal(_stacked(kv), kv_blocks(source, "s"))
        # The source keeps the session until the move is committed.
        assert source.session_info("s").strategy.value == "preserve"
        stayed = _second_turn(source, first)
    with mars_engine(tiny_model_dir, cost=PRESERVE_IS_CHEAP) as destination:
        destination.import_session(kv)
        info = destination.session_info("s")
        assert (info.phase.value, info.strategy.value, info.kv_tokens) == ("paused", "swap", KEPT)
        assert destination.scheduler.connector.free_host_tokens == (
            destination.config.host_swap_tokens - KEPT
        )
        moved = _second_turn(destination, first)
    assert moved.kv.loaded_tokens == moved.kv.cached_tokens == KEPT  # none recomputed
    assert moved.kv.recomputed_tokens == 0
    assert moved.kv.resumed_from.value == "swap"
    assert moved.output_token_ids == stayed.output_token_ids  # temperature 0


def test_a_swapped_session_moves_from_its_host_copy(tiny_model_dir):
    with mars_engine(
        tiny_model_dir, cost=SWAP_IS_CHEAP, num_kv_blocks=24, max_model_len=640
    ) as source:
        # Two parked sessions and a long generation: memory runs short and
        # the policy swaps one of them out (as in test_strategies).
        source.add_turn(turn("runner", prompt(40, seed=9), max_tokens=400))
        for i, s in enumerate("ab"):
            source.add_turn(turn(f"{s}1", prompt(PROMPT_TOKENS, seed=i), s, hints=LONG_CALL))
        events = step_until(source, lambda: _swapped_out(source) is not None)
        swapped = _swapped_out(source)
        (first,) = [e for e in events if isinstance(e, TurnEnd) and e.request_id == f"{swapped}1"]
        kv = source.export_session(swapped)
        assert kv.num_blocks == 4 and kv.token_ids[-1] == first.output_token_ids[-2]
        source.abort_turn("runner")
    with mars_engine(tiny_model_dir, cost=SWAP_IS_CHEAP) as destination:
        destination.import_session(kv)
        moved = _second_turn(destination, first, swapped)
        assert destination.record(swapped).swapped_in_tokens == KEPT
    assert moved.kv.loaded_tokens == KEPT and moved.kv.recomputed_tokens == 0


def _swapped_out(engine) -> str | None:
    """A session whose KV is now only in its host copy."""
    parks = engine.scheduler.parks
    return next(
        (
            s
            for s in "ab"
            if s in parks and parks[s].strategy.value == "swap" and not parks[s].holds_blocks
        ),
        None,
    )


def test_a_discarded_session_moves_without_kv_and_is_recomputed(tiny_model_dir):
    # vLLM's own policy: a paused session's KV is dropped at the next step.
    with mars_engine(tiny_model_dir, policy="vllm") as source:
        source.add_turn(turn("runner", prompt(40, seed=9), max_tokens=400))  # keeps it stepping
        source.add_turn(turn("t1", prompt(PROMPT_TOKENS), "s", hints=LONG_CALL))
        events = step_until(source, lambda: _strategy(source, "s") == "discard")
        (first,) = [e for e in events if isinstance(e, TurnEnd)]
        source.abort_turn("runner")
        kv = source.export_session("s")
        assert kv.shards is None and kv.nbytes == 0 and len(kv.token_ids) == KEPT
    with mars_engine(tiny_model_dir, policy="vllm") as destination:
        destination.import_session(kv)
        assert _strategy(destination, "s") == "discard"
        moved = _second_turn(destination, first)
    assert moved.kv.loaded_tokens == moved.kv.cached_tokens == 0
    assert moved.kv.recomputed_tokens == KEPT


def test_a_move_that_does_not_fit_is_refused_and_leaves_nothing_behind(tiny_model_dir):
    with mars_engine(tiny_model_dir, cost=PRESERVE_IS_CHEAP) as source:
        with pytest.raises(ValueError, match="not paused on this engine"):
            source.export_session("nobody")
        first = _first_turn(source)
        kv = source.export_session("s")
        with pytest.raises(ValueError, match="'s' is paused on this engine"):
            source.import_session(kv)  # it is still here
    with mars_engine(tiny_model_dir, cost=PRESERVE_IS_CHEAP, host_swap_tokens=64) as small:
        with pytest.raises(ValueError, match="host_swap_tokens"):
            small.import_session(kv)
        assert "s" not in small.scheduler.records and "s" not in small.scheduler.parks
    with mars_engine(tiny_model_dir, cost=PRESERVE_IS_CHEAP, block_size=64) as other:
        with pytest.raises(ValueError, match="block_size 32"):
            other.import_session(kv)
        bad = SessionKv(
            kv.session_id,
            kv.token_ids,
            64,
            [{name: t[:, :1] for name, t in kv.shards[0].items()}],
            kv.state,
        )
        with pytest.raises(ValueError, match="this engine needs"):
            other.import_session(bad)
        assert "s" not in other.scheduler.records
        # The refused session can still start here from scratch.
        fresh = _second_turn(other, first)
        assert fresh.kv.resumed_from is None


def _strategy(engine, session_id: str) -> str | None:
    strategy = engine.session_info(session_id).strategy
    return strategy.value if strategy is not None else None


def test_a_running_request_moves_in_stages_and_goes_on_with_the_same_tokens(tiny_model_dir):
    """Llumnix's live migration on two real engines: the finished blocks are
    copied while the request decodes, the rest once it stops; the second
    engine writes the early stage into device blocks as it comes (the
    continuation finds them in its prefix cache), loads the rest from host
    and continues the request, token for token as if it had never moved
    (temperature 0). No block stays held afterwards."""
    from workers.kv_transport import ParkedState

    total = 48
    with mars_engine(tiny_model_dir, cost=PRESERVE_IS_CHEAP) as source:
        expected = run_turns(source, turn("ref", prompt(PROMPT_TOKENS, seed=3), max_tokens=total))
        expected = expected["ref"].output_token_ids
        source.add_turn(turn("r", prompt(PROMPT_TOKENS, seed=3), max_tokens=total))
        step_until(source, lambda: _generated(source, "r") >= 8)
        early = source.running_kv("r", 0, stop=False)
        assert early.num_blocks == (PROMPT_TOKENS + 7) // 32 and early.shards is not None
        step_until(source, lambda: _generated(source, "r") >= 20)
        last = source.running_kv("r", early.first_block + early.num_blocks, stop=True)
        assert "r" not in source.scheduler.requests  # stopped: its blocks are free
        with pytest.raises(ValueError, match="not running"):
            source.running_kv("r", 0, stop=True)
    generated = list(last.token_ids[PROMPT_TOKENS:])
    assert last.computed_tokens == PROMPT_TOKENS + len(generated) - 1
    with mars_engine(tiny_model_dir, cost=PRESERVE_IS_CHEAP) as destination:
        free = destination.scheduler.free_blocks()
        with pytest.raises(ValueError, match="a stage is missing"):
            destination.commit_incoming("k", last, ParkedState(None, None, 0.0, 1, 0, 1))
        destination.stage_in("moving", early)
        assert destination.scheduler.free_blocks() == free - early.num_blocks
        remaining = total - len(generated)
        committed = destination.commit_incoming(
            "moving", last, ParkedState(None, None, 0.0, remaining, 0, 1)
        )
        assert committed["written_tokens"] == early.num_blocks * 32
        assert destination.scheduler.free_blocks() == free  # released into the prefix cache
        continued = turn(
            "r2", list(last.token_ids), "moving", max_tokens=remaining, action=SessionAction.END
        )
        end = run_turns(destination, continued)["r2"]
        assert destination.scheduler.free_blocks() == free and not destination.scheduler.incoming
    written = early.num_blocks * 32
    assert end.kv.cached_tokens == last.computed_tokens and end.kv.recomputed_tokens == 0
    assert end.kv.loaded_tokens == last.computed_tokens - written
    assert (*generated, *end.output_token_ids) == expected


def test_a_stage_without_room_on_the_device_stays_on_host_and_is_loaded_from_there(
    tiny_model_dir,
):
    """A destination whose device blocks are taken holds the stages on host
    only; the continuation loads all of its KV, with the same tokens. A
    move dropped before its commit releases what it held."""
    from workers.kv_transport import ParkedState

    with mars_engine(tiny_model_dir, cost=PRESERVE_IS_CHEAP) as source:
        source.add_turn(turn("r", prompt(PROMPT_TOKENS, seed=5), max_tokens=40))
        step_until(source, lambda: _generated(source, "r") >= 8)
        early = source.running_kv("r", 0, stop=False)
        last = source.running_kv("r", early.num_blocks, stop=True)
        expected = run_turns(source, turn("ref", prompt(PROMPT_TOKENS, seed=5), max_tokens=40))
    expected = expected["ref"].output_token_ids
    generated = list(last.token_ids[PROMPT_TOKENS:])
    remaining = 40 - len(generated)
    with mars_engine(tiny_model_dir, cost=PRESERVE_IS_CHEAP) as destination:
        free = destination.scheduler.free_blocks()
        taken = vllm_hooks.take_free_blocks(
            destination.scheduler.kv_cache_manager, free - early.num_blocks
        )
        destination.stage_in("moving", early)
        assert "moving" not in destination.scheduler.incoming  # no room: on host only
        vllm_hooks.give_back_blocks(destination.scheduler.kv_cache_manager, taken)
        committed = destination.commit_incoming(
            "moving", last, ParkedState(None, None, 0.0, remaining, 0, 1)
        )
        assert committed["written_tokens"] == 0
        continued = turn(
            "r2", list(last.token_ids), "moving", max_tokens=remaining, action=SessionAction.END
        )
        end = run_turns(destination, continued)["r2"]
        assert destination.scheduler.free_blocks() == free
        destination.stage_in("dropped", early)
        assert destination.scheduler.free_blocks() == free - early.num_blocks
        destination.drop_incoming("dropped")
        assert destination.scheduler.free_blocks() == free and not destination.scheduler.incoming
    # Without prefix caching nothing could find written blocks: on host only.
    with mars_engine(tiny_model_dir, cost=PRESERVE_IS_CHEAP, prefix_caching=False) as uncached:
        uncached.stage_in("moving", early)
        assert not uncached.scheduler.incoming
        uncached.commit_incoming("moving", last, ParkedState(None, None, 0.0, remaining, 0, 1))
        again = run_turns(uncached, continued)["r2"]
    assert again.output_token_ids == end.output_token_ids
    assert end.kv.loaded_tokens == last.computed_tokens and end.kv.recomputed_tokens == 0
    assert (*generated, *end.output_token_ids) == expected


def test_a_request_that_finishes_mid_move_stays_where_it_ran_and_the_stages_go(
    tiny_model_dir,
):
    """Llumnix's ABORTED_SRC on two real engines: a stage goes over while the
    request decodes, then the request finishes at its source before the
    next; the next stage is refused there, and the destination drops what
    it held: its free blocks are what they were."""
    with mars_engine(tiny_model_dir, cost=PRESERVE_IS_CHEAP) as source:
        source.add_turn(turn("r", prompt(PROMPT_TOKENS, seed=6), "s", max_tokens=24))
        step_until(source, lambda: _generated(source, "r") >= 4)
        early = source.running_kv("r", 0, stop=False)
        end = run_turns(source)["r"]  # it goes on to its end
        assert len(end.output_token_ids) == 24
        with pytest.raises(ValueError, match="not running"):
            source.running_kv("r", early.num_blocks, stop=False)
        assert _strategy(source, "s") == "preserve"  # paused where it ran
    with mars_engine(tiny_model_dir, cost=PRESERVE_IS_CHEAP) as destination:
        free = destination.scheduler.free_blocks()
        destination.stage_in("moving", early)
        assert destination.scheduler.free_blocks() == free - early.num_blocks
        destination.drop_incoming("moving")
        assert destination.scheduler.free_blocks() == free
        assert "s" not in destination.scheduler.records


def _generated(engine, request_id: str) -> int:
    return len(engine._live[request_id].token_ids) if request_id in engine._live else 0
