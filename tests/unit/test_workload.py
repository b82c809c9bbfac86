"""bench.workload: trace parsing (both spellings), scaling, sampling, arrivals."""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path

import pytest

from bench.workload import (
    TraceRequest,
    TraceSegment,
    arrivals,
    build_workload,
    load_trace,
    parse_trace,
    prompt_token_ids,
    sample,
    scale_request,
)

DATA = Path(__file__).resolve().parents[2] / "bench" / "data" / "infercept"

TOKEN_FORM = """
{
  "a": [
    {"prompt_tokens": 100, "completion_tokens": 20, "api_time": 1.5, "api_token_length": 7},
    {"prompt_tokens": 127, "completion_tokens": 9, "api_time": 0, "api_token_length": 3},
    {"prompt_tokens": 139, "completion_tokens": 4}
  ],
  "b": [{"prompt_tokens": 50, "completion_tokens": 5}]
}
"""

TEXT_FORM = """
{
  "t": [
    {"prompt": "one two three", "completion": "four five", "api_token": "six",
     "api_time": 2.0},
    {"prompt": "one two three four five six", "completion": "seven eight nine",
     "api_token": "ignored", "api_time": 30.0}
  ]
}
"""


def words(text: str) -> int:
    return len(text.split())


def test_token_form():
    requests = parse_trace(json.loads(TOKEN_FORM))
    assert [r.request_id for r in requests] == ["a", "b"]
    a, b = requests
    assert a.prompt_tokens == 100
    assert a.segments == (
        TraceSegment(20, 1.5, 7),
        TraceSegment(9, 0.0, 3),
        TraceSegment(4, None, 0),
    )
    assert a.num_calls == 2
    assert a.total_tokens == 100 + 20 + 7 + 9 + 3 + 4
    assert b.segments == (TraceSegment(5, None, 0),)


def test_text_form_counts_with_the_callable():
    (t,) = parse_trace(json.loads(TEXT_FORM), count_tokens=words)
    assert t.prompt_tokens == 3
    # The last segment makes no call even though the trace records an api_time.
    assert t.segments == (TraceSegment(2, 2.0, 1), TraceSegment(3, None, 0))


def test_text_form_needs_count_tokens():
    with pytest.raises(ValueError, match="count_tokens"):
        parse_trace(json.loads(TEXT_FORM))


def test_mixed_spellings_in_one_file():
    data = {**json.loads(TOKEN_FORM), **json.loads(TEXT_FORM)}
    requests = parse_trace(data, count_tokens=words)
    assert [r.request_id for r in requests] == ["a", "b", "t"]


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"x": [{"completion_tokens": 3}]}, "prompt_tokens"),
        ({"x": [{"prompt_tokens": 3}]}, "completion_tokens"),
        (
            {"x": [{"prompt_tokens": 3, "completion_tokens": 1}, {"completion_tokens": 1}]},
            "api_time",
        ),
        (
            {
                "x": [
                    {"prompt_tokens": 3, "completion_tokens": 1, "api_time": 1.0},
                    {"completion_tokens": 1},
                ]
            },
            "api_token_length",
        ),
        (
            {
                "x": [
                    {"prompt_tokens": 3, "completion_tokens": 1, "api_time": -1.0},
                    {"completion_tokens": 1},
                ]
            },
            "api_time",
        ),
        ({"x": [{"prompt_tokens": -3, "completion_tokens": 1}]}, "prompt_tokens"),
        ({"x": []}, "non-empty"),
        ({"x": ["not a segment"]}, "object"),
    ],
)
def test_malformed_trace_names_the_field(data, field):
    with pytest.raises(ValueError, match=field):
        parse_trace(data)


def test_trace_must_be_an_object():
    with pytest.raises(ValueError, match="JSON object"):
        parse_trace([1, 2])


def test_load_trace_reads_a_file(tmp_path):
    path = tmp_path / "trace.json"
    path.write_text(TOKEN_FORM)
    assert load_trace(path) == parse_trace(json.loads(TOKEN_FORM))


def test_shipped_traces_parse():
    counter = len  # characters: good enough to exercise the text form
    for name, count in (("single_api", 397), ("multi_api", 397)):
        requests = load_trace(DATA / f"{name}.json", count_tokens=counter)
        assert len(requests) == count
        assert all(r.segments[-1].api_time_s is None for r in requests)
        assert all(s.completion_tokens >= 1 for r in requests for s in r.segments)
    single = load_trace(DATA / "single_api.json", count_tokens=counter)
    assert all(r.num_calls == 1 for r in single)


def test_scaling():
    (a, _) = parse_trace(json.loads(TOKEN_FORM))
    half = scale_request(a, token_scale=0.5, api_scale=10.0)
    assert half.prompt_tokens == 50
    assert half.segments == (
        TraceSegment(10, 15.0, 4),  # round(3.5) == 4 (banker's rounding)
        TraceSegment(4, 0.0, 2),  # round(4.5) == 4, round(1.5) == 2
        TraceSegment(2, None, 0),
    )
    tiny = scale_request(a, token_scale=0.001)
    assert tiny.prompt_tokens == 1
    assert all(s.completion_tokens == 1 for s in tiny.segments)
    assert [s.api_return_tokens for s in tiny.segments] == [1, 1, 0]
    assert scale_request(a) == a


@pytest.mark.parametrize("name", ["token_scale", "api_scale"])
@pytest.mark.parametrize("value", [-1.0, 0.0, float("nan"), float("inf")])
def test_bad_scale_names_the_knob(name, value):
    (a, _) = parse_trace(json.loads(TOKEN_FORM))
    with pytest.raises(ValueError, match=name):
        scale_request(a, **{name: value})


def _requests(n: int) -> list[TraceRequest]:
    return [TraceRequest(f"r{i}", 10 + i, (TraceSegment(5, None, 0),)) for i in range(n)]


def test_sample_is_a_seeded_shuffle():
    requests = _requests(50)
    first = sample(requests, 10, seed=3)
    assert first == sample(requests, 10, seed=3)
    assert len(first) == 10
    assert len({r.request_id for r in first}) == 10
    assert first != sample(requests, 10, seed=4)
    assert first != requests[:10]
    everything = sample(requests, None, seed=3)
    assert everything[:10] == first
    assert sorted(r.request_id for r in everything) == sorted(r.request_id for r in requests)
    assert len(sample(requests, 500, seed=3)) == 50


@pytest.mark.parametrize("value", [0, -2, True])
def test_bad_max_requests(value):
    with pytest.raises(ValueError, match="max_requests"):
        sample(_requests(3), value, seed=0)


def test_build_workload_drops_too_long_then_samples():
    requests = _requests(20)  # total tokens 15 + i
    kept, dropped = build_workload(requests, max_total_tokens=24, max_requests=5, seed=1)
    assert dropped == 10
    assert len(kept) == 5
    assert all(r.total_tokens <= 24 for r in kept)
    again, _ = build_workload(requests, max_total_tokens=24, max_requests=5, seed=1)
    assert again == kept
    with pytest.raises(ValueError, match="max_total_tokens"):
        build_workload(requests, max_total_tokens=0)
    with pytest.raises(ValueError, match="token_scale"):
        build_workload(requests, token_scale=-0.5)


def test_arrivals_deterministic_increasing_and_mean_rate():
    offsets = arrivals(4000, 2.0, seed=7)
    assert offsets == arrivals(4000, 2.0, seed=7)
    assert offsets != arrivals(4000, 2.0, seed=8)
    assert all(b > a for a, b in itertools.pairwise(offsets))
    assert offsets[0] > 0
    gaps = [b - a for a, b in itertools.pairwise([0.0, *offsets])]
    assert statistics.mean(gaps) == pytest.approx(0.5, rel=0.06)
    assert len(offsets) / offsets[-1] == pytest.approx(2.0, rel=0.06)
    assert arrivals(0, 1.0, seed=0) == []


@pytest.mark.parametrize("rate", [0, -1.0, float("nan"), float("inf")])
def test_bad_rate_names_the_field(rate):
    with pytest.raises(ValueError, match="rate_rps"):
        arrivals(5, rate, seed=0)


def test_bad_count():
    with pytest.raises(ValueError, match="n must"):
        arrivals(-1, 1.0, seed=0)


def test_prompt_token_ids_in_range_and_deterministic():
    ids = prompt_token_ids(1000, salt=5)
    assert len(ids) == 1000
    assert all(10 <= i <= 400 for i in ids)
    assert ids == prompt_token_ids(1000, salt=5)
    assert ids != prompt_token_ids(1000, salt=6)
