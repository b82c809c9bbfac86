"""bench.http_bench's pure parts: exact-length texts, session turns, the
configurations it compares, event-stream parsing, rows and the overhead
report. The benchmark itself needs a Ray cluster and is not run here."""

from __future__ import annotations

import json

import pytest

from bench.http_bench import (
    CLUSTER_KEYS,
    DEFAULT_CONFIGS,
    TOOL_HINT,
    BenchConfig,
    ClientMode,
    SessionOutcome,
    Turn,
    TurnError,
    _hints,
    filler_text,
    kv_counters,
    overhead_report,
    p99_interval_ms,
    parse_args,
    parse_config,
    parse_server_timing,
    parse_sse_line,
    serving_config,
    session_turns,
    single_token_words,
    summarize,
)
from bench.workload import TraceRequest, TraceSegment
from cluster.config import ServingConfig

WORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota"]


def _count(text: str) -> int:
    """A whitespace tokenizer stand-in: one token per space-led word."""
    return len(text.split())


class _FakeTokenizer:
    """Token i decodes to pieces[i]; " mixed" re-encodes as two tokens."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def __len__(self) -> int:
        return len(self.pieces)

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if text == " mixed":
            return [98, 99]
        return [self.pieces.index(text)]


ODD = ["run", " mixed", " !", " caf\u00e9", " a1"]
"""No space, two tokens, punctuation, not ASCII, not only letters."""


def test_single_token_words_keeps_space_led_single_token_letters() -> None:
    words = [f" {w}" for w in ("the", "of", "cat", "dog", "sun", "day", "tree", "sky")]
    assert single_token_words(_FakeTokenizer(ODD + words)) == [w[1:] for w in words]


def test_single_token_words_refuses_a_tokenizer_without_enough_words() -> None:
    with pytest.raises(RuntimeError, match="only 2 single-token words"):
        single_token_words(_FakeTokenizer([*ODD, " the", " of"]))


def test_filler_text_has_exact_length_and_depends_on_the_salt() -> None:
    text = filler_text(37, "s:1", WORDS)
    assert _count(text) == 37 and text.startswith(" ")
    assert text == filler_text(37, "s:1", WORDS)
    assert text != filler_text(37, "s:2", WORDS)
    with pytest.raises(ValueError, match="tokens must be >= 1"):
        filler_text(0, "s", WORDS)


REQUEST = TraceRequest(
    "r1",
    12,
    (TraceSegment(5, 0.5, 3), TraceSegment(7, 0.0, 2), TraceSegment(4, None, 0)),
)


def _encode(text: str) -> list[int]:
    """Ids for the whitespace stand-in: one per word."""
    return [len(word) for word in text.split()]


def test_session_turns_send_the_prompt_then_each_api_result() -> None:
    turns = session_turns(REQUEST, "0:0", WORDS, _encode, start_ids=[1])
    assert [(t.tokens, t.max_tokens, t.api_s) for t in turns] == [
        (12, 5, 0.5),
        (3, 7, 0.0),
        (2, 4, None),
    ]
    assert [_count(t.text) for t in turns] == [12, 3, 2]
    assert len({t.text for t in turns}) == 3
    # The ids a client appends to its context: the start token only once.
    assert [len(t.token_ids) for t in turns] == [13, 3, 2] and turns[0].token_ids[0] == 1


def test_session_turns_share_the_system_prompt_and_name_each_tool() -> None:
    shared = TraceRequest(
        "r2", 12, (TraceSegment(5, 0.5, 3, "search"), TraceSegment(4, None, 0)), 8
    )
    other = TraceRequest("r3", 10, (TraceSegment(6, None, 0),), 8)
    mine = session_turns(shared, "0:1", WORDS, _encode)
    theirs = session_turns(other, "0:2", WORDS, _encode)
    assert [t.tokens for t in mine] == [12, 3] and theirs[0].tokens == 10
    # The first 8 words are the same text for every session; the rest differ.
    assert mine[0].text.split()[:8] == theirs[0].text.split()[:8]
    assert mine[0].text.split()[8:] != theirs[0].text.split()[8:10]
    assert [t.tool for t in mine] == ["search", None]
    untitled = session_turns(REQUEST, "0:0", WORDS, _encode)
    assert [t.tool for t in untitled] == [TOOL_HINT, TOOL_HINT, None]


def test_client_hints_say_only_what_the_mode_allows() -> None:
    turn = Turn("x", 1, 4, 2.5, (1,), "search")
    assert _hints(turn, ClientMode()) == {"tool": "search", "expected_api_s": 2.5}
    assert _hints(turn, ClientMode(hints="tool")) == {"tool": "search"}
    assert _hints(turn, ClientMode(hints="none")) is None
    assert _hints(turn, ClientMode(sessions=False, hints="tool")) is None
    assert _hints(Turn("x", 1, 4, None), ClientMode()) is None
    with pytest.raises(ValueError, match="hints must be one of"):
        ClientMode(hints="all")


def test_session_turns_reject_text_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="turn 0: text for 12 tokens encodes to 13"):
        session_turns(REQUEST, "0:0", WORDS, lambda text: [*_encode(text), 0])


def test_parse_config_names_the_bad_part() -> None:
    assert parse_config("least_load:vllm") == BenchConfig("least_load", "vllm")
    assert [parse_config(c).label for c in DEFAULT_CONFIGS] == list(DEFAULT_CONFIGS)
    with pytest.raises(ValueError, match="must be <dispatch>:<engine policy>"):
        parse_config("mars_aware")
    with pytest.raises(ValueError, match="unknown dispatch 'random'"):
        parse_config("random:mars")
    with pytest.raises(ValueError, match="unknown engine policy 'fifo'"):
        parse_config("mars_aware:fifo")


def _base(policy: str = "mars") -> ServingConfig:
    return ServingConfig.model_validate(
        {
            "model": {"path": "/models/tiny", "name": "tiny"},
            "engine": {"num_kv_blocks": 128, "max_num_seqs": 64},
            "policy": {"name": policy, "params": {"threshold_iterations": 100}},
            "pools": [{"name": "a", "count": 3}],
        }
    )


@pytest.mark.parametrize(
    ("dispatch", "policy", "params"),
    [
        ("mars_aware", "mars_aware", {}),
        ("least_load", "session_affinity", {"fallback": "least_load"}),
        ("round_robin", "session_affinity", {"fallback": "round_robin"}),
    ],
)
def test_serving_config_applies_the_configuration(dispatch: str, policy: str, params) -> None:
    config = serving_config(
        _base(),
        BenchConfig(dispatch, "mars"),
        instances=2,
        kv_blocks=32,
        max_model_len=544,
        host_swap_tokens=8192,
        predictor="oracle",
        redis_url="redis://127.0.0.1:7000/0",
        port=8123,
    )
    assert (config.dispatch.policy, config.dispatch.params) == (policy, params)
    assert config.instance_ids() == ["default-0", "default-1"]
    assert config.engine.num_kv_blocks == 32 and config.engine.max_model_len == 544
    assert config.engine.max_num_seqs == 64  # the base's other settings stay
    assert config.policy.params == {"threshold_iterations": 100}
    assert config.policy.predictor == "oracle"
    assert config.state_store.url == "redis://127.0.0.1:7000/0" and config.http.port == 8123


def test_serving_config_drops_another_policys_params() -> None:
    config = serving_config(
        _base(),
        BenchConfig("round_robin", "vllm"),
        instances=2,
        kv_blocks=32,
        max_model_len=544,
        host_swap_tokens=0,
        predictor="online",
        redis_url="redis://127.0.0.1:7000/0",
        port=8123,
    )
    assert config.policy.name == "vllm" and config.policy.params == {}


def _sse(payload) -> bytes:
    return f"data: {json.dumps(payload)}\n".encode()


def test_parse_sse_line() -> None:
    assert parse_sse_line(_sse({"choices": [{"text": "a"}]})) == {"choices": [{"text": "a"}]}
    assert parse_sse_line(b"data: [DONE]\n") is None
    assert parse_sse_line(b"\n") is None
    assert parse_sse_line(b": keep-alive\n") is None
    with pytest.raises(TurnError, match="malformed event-stream line"):
        parse_sse_line(b"data: {not json\n")
    with pytest.raises(TurnError, match="not an object"):
        parse_sse_line(b"data: [1, 2]\n")


def _engine(segments: int, *, recomputed: int = 0, demotions=()) -> dict:
    return {
        "segments": segments,
        "recomputed_tokens": recomputed,
        "swapped_out_tokens": 0,
        "timeline": [{"event": "paused"}]
        + [{"event": "demoted", "strategy": s} for s in demotions],
    }


def test_parse_server_timing_reads_milliseconds_as_seconds() -> None:
    header = "ingress;dur=7.5, engine_call;dur=5.000, engine;desc=step;dur=2"
    assert parse_server_timing(header) == pytest.approx(
        {"ingress": 0.0075, "engine_call": 0.005, "engine": 0.002}
    )


@pytest.mark.parametrize(
    ("header", "named"),
    [
        ("", "lacks"),
        ("ingress;dur=1, engine_call;dur=1", "engine"),
        ("ingress, engine;dur=1", "dur"),
    ],
)
def test_parse_server_timing_refuses_a_missing_part(header: str, named: str) -> None:
    with pytest.raises(TurnError, match=named):
        parse_server_timing(header)


def test_kv_counters_sum_the_engine_records() -> None:
    counters = kv_counters(
        [_engine(2, recomputed=10, demotions=["swap"]), _engine(1, demotions=["discard", "swap"])]
    )
    assert counters == {"recompute_tokens": 10, "swapped_out_tokens": 0, "discards": 1, "swaps": 2}


def test_summarize_counts_every_session_by_how_it_ended() -> None:
    done = SessionOutcome("a", 2, "completed", 0.01, 0.1, 3.0, [0.2], ["length", "stop"])
    done.instance_id, done.engine = "default-0", _engine(2, demotions=["swap"])
    split = SessionOutcome("b", 3, "completed", 0.0, 0.3, 5.0, [0.1, 0.4], ["length"] * 3)
    split.instance_id, split.engine = "default-1", _engine(2)
    unverified = SessionOutcome("c", 1, "completed", 0.0, 0.2, 1.0, [], ["length"])
    failed = SessionOutcome("d", 2, "failed", 0.0, error="turn 1: TurnError: HTTP 409")
    cut = SessionOutcome("e", 2, "running", 0.5, 0.4)
    late = SessionOutcome("f", 2)
    row = summarize(
        [done, split, unverified, failed, cut, late],
        trace="multi_api",
        load_rps=2.0,
        config=BenchConfig("mars_aware", "mars"),
    )
    assert set(CLUSTER_KEYS) <= set(row)
    assert (row["completed"], row["requests"], row["unfinished"]) == (3, 6, 3)
    assert (row["failed"], row["timed_out"], row["not_submitted"]) == (1, 1, 1)
    assert row["e2e_mean_s"] == pytest.approx(3.0)
    assert row["ttft_mean_s"] == pytest.approx(0.2)
    assert row["resume_ttft_mean_s"] == pytest.approx(0.7 / 3)
    assert row["early_stop_turns"] == 1 and row["turns"] == 6
    assert row["split_sessions"] == 1 and row["unverified_sessions"] == 1
    assert row["placement"] == {"default-0": 1, "default-1": 1}
    assert row["swaps"] == 1 and row["errors"] == ["turn 1: TurnError: HTTP 409"]
    assert row["max_submit_lag_s"] == 0.5
    assert (row["policy"], row["dispatch"]) == ("mars", "mars_aware")


def test_summarize_with_nothing_completed_has_no_latencies() -> None:
    row = summarize(
        [SessionOutcome("a", 1)], trace="t", load_rps=1.0, config=BenchConfig("round_robin", "vllm")
    )
    assert row["completed"] == 0 and row["e2e_mean_s"] is None and row["ttft_p99_s"] is None


def test_overhead_report_pairs_http_and_direct_times() -> None:
    samples = {
        "http": [0.012, 0.014, 0.030],
        "direct": [0.010, 0.011, 0.012],
        # The third HTTP request met a slow engine step: 15 ms of its 30.
        "http_engine": [0.008, 0.009, 0.023],
        "direct_engine": [0.008, 0.008, 0.009],
        "health": [0.001] * 3,
        "place": [0.002] * 3,
        "store": [0.0002] * 3,
    }
    report = overhead_report(samples, goal_ms=10.0)
    # raw: 2, 3, 18 ms; net of each request's engine time: 2, 2, 4 ms
    assert report["added_raw_p50_ms"] == pytest.approx(3.0)
    assert report["summary_ms"]["added_raw"]["max"] == pytest.approx(18.0)
    assert report["added_raw_p99_ms"] > 10.0
    assert report["added_p50_ms"] == pytest.approx(2.0)
    assert report["summary_ms"]["added"]["max"] == pytest.approx(4.0)
    assert report["goal_met"] is True
    slow_path = {**samples, "http": [0.012, 0.014, 0.045]}  # 15 ms more outside the engine
    assert overhead_report(slow_path, goal_ms=10.0)["goal_met"] is False
    # Around the engine: HTTP 4, 5, 7 ms; direct 2, 3, 3 ms -> p99s differ by ~4 ms.
    assert report["added_p99_of_paths_ms"] == pytest.approx(6.96 - 3.0)
    low, high = report["added_p99_ci95_ms"]
    assert 2.0 <= low <= report["added_p99_ms"] <= high <= 4.0


def test_the_p99_interval_brackets_the_tail_and_is_reproducible() -> None:
    values = [0.001 * (i % 10) for i in range(300)] + [0.050, 0.060]  # two outliers
    low, high = p99_interval_ms(values)
    assert 9.0 - 1e-9 <= low <= high <= 60.0
    assert p99_interval_ms(values) == [low, high]
    assert p99_interval_ms([0.001]) is None


def test_parse_args_quick_and_errors(capsys) -> None:
    args = parse_args(["--quick"])
    assert args.max_requests == 8 and args.overhead_requests == 40
    assert [c.label for c in args.configs] == list(DEFAULT_CONFIGS)
    with pytest.raises(SystemExit):
        parse_args(["--kv-blocks", "0"])
    assert "--kv-blocks must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--configs", "nearest:mars"])
    assert "unknown dispatch 'nearest'" in capsys.readouterr().err


class _WordTokenizer:
    """One token per whitespace-separated word; a start token."""

    bos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [len(word) for word in text.split()]


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_a_workload_fits_the_kv_that_vllm_can_use(seed: int) -> None:
    import argparse

    from bench.http_bench import build_trace_workload

    args = argparse.Namespace(
        kv_blocks=40, token_scale=0.25, api_scale=0.1, max_requests=96, seed=seed
    )
    workload = build_trace_workload("multi_api", args, _WordTokenizer(), WORDS)
    usable = 39 * 32  # vLLM keeps one block of the 40 as its null block
    assert workload.max_model_len <= usable
    assert max(r.total_tokens for r in workload.requests) + 1 < workload.max_model_len
