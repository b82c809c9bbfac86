"""Augmented-request workloads from the INFERCEPT traces, for the benchmarks.

Pure Python (no vLLM): parse a trace file (`bench/data/infercept/*.json`, see
the README there), scale it, sample it, and draw Poisson arrivals. Everything
random takes a seed, so every policy in one benchmark run sees the same
requests arriving at the same offsets.

A trace maps request id -> list of segments. Two spellings of a segment:

- token form: ``{"prompt_tokens", "completion_tokens", "api_time", "api_token_length"}``
- text form: ``{"prompt", "completion", "api_token", "api_time"}`` (lengths are
  counted with the caller's ``count_tokens``, i.e. the serving tokenizer).

Only the first segment's prompt is used: later segments restate the context
so far, which the replay rebuilds from the generated tokens and API results.
The last segment never makes a call, even where the trace records an
``api_time`` for it (the request ends there).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

CountTokens = Callable[[str], int]


class TraceSegment(NamedTuple):
    """Generate `completion_tokens`, then call an API for `api_time_s` seconds
    whose result has `api_return_tokens` tokens (`api_time_s` None: the end).
    `tool` names the API when the workload knows it (the INFERCEPT traces
    do not)."""

    completion_tokens: int
    api_time_s: float | None
    api_return_tokens: int
    tool: str | None = None


@dataclass(frozen=True)
class TraceRequest:
    request_id: str
    prompt_tokens: int
    segments: tuple[TraceSegment, ...]
    shared_prefix_tokens: int = 0
    """The first tokens of the prompt that every request of the workload
    shares (a system prompt with tool definitions); 0 for the traces."""

    @property
    def total_tokens(self) -> int:
        """Context length at the end: prompt + all generated + all API results."""
        added = sum(s.completion_tokens + s.api_return_tokens for s in self.segments)
        return self.prompt_tokens + added

    @property
    def num_calls(self) -> int:
        return sum(1 for s in self.segments if s.api_time_s is not None)


# --------------------------------------------------------------------- parsing
def _field(segment: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in segment:
        raise ValueError(f"{where}: missing field {key!r}")
    return segment[key]


def _count(value: Any, key: str, where: str, count_tokens: CountTokens | None) -> int:
    """A token count from the token form (int) or the text form (str)."""
    if isinstance(value, str):
        if count_tokens is None:
            raise ValueError(f"{where}: field {key!r} is text; count_tokens is required")
        return int(count_tokens(value))
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{where}: field {key!r} must be a non-negative count, got {value!r}")
    return int(value)


def _api_time(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{where}: field 'api_time' must be >= 0 seconds, got {value!r}")
    return float(value)


def _parse_segment(
    segment: Any, where: str, last: bool, count_tokens: CountTokens | None
) -> tuple[int | None, TraceSegment]:
    """(prompt tokens, segment) for one raw segment of either spelling."""
    if not isinstance(segment, Mapping):
        raise ValueError(f"{where}: a segment must be an object, got {type(segment).__name__}")
    text_form = "prompt" in segment or "completion" in segment
    if text_form:
        prompt_key, completion_key, result_key = "prompt", "completion", "api_token"
    else:
        prompt_key, completion_key, result_key = (
            "prompt_tokens",
            "completion_tokens",
            "api_token_length",
        )
    prompt = segment.get(prompt_key)
    prompt_tokens = None if prompt is None else _count(prompt, prompt_key, where, count_tokens)
    completion = _count(_field(segment, completion_key, where), completion_key, where, count_tokens)
    if last:
        return prompt_tokens, TraceSegment(completion, None, 0)
    api_time = _api_time(_field(segment, "api_time", where), where)
    returned = _count(_field(segment, result_key, where), result_key, where, count_tokens)
    return prompt_tokens, TraceSegment(completion, api_time, returned)


def parse_trace(
    data: Mapping[str, Any], count_tokens: CountTokens | None = None
) -> list[TraceRequest]:
    """Requests of a trace already loaded from JSON, in file order."""
    if not isinstance(data, Mapping):
        kind = type(data).__name__
        raise ValueError(f"trace must be a JSON object (request id -> segments), got {kind}")
    requests = []
    for request_id, raw in data.items():
        if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
            raise ValueError(f"request {request_id!r}: segments must be a non-empty list")
        prompt_tokens = None
        segments = []
        for i, segment in enumerate(raw):
            where = f"request {request_id!r} segment {i}"
            prompt, parsed = _parse_segment(segment, where, i == len(raw) - 1, count_tokens)
            if i == 0:
                if prompt is None:
                    raise ValueError(f"{where}: missing field 'prompt_tokens' (or 'prompt')")
                prompt_tokens = prompt
            segments.append(parsed)
        requests.append(TraceRequest(str(request_id), prompt_tokens, tuple(segments)))
    return requests


def load_trace(path: str | Path, count_tokens: CountTokens | None = None) -> list[TraceRequest]:
    with open(path, encoding="utf-8") as f:
        return parse_trace(json.load(f), count_tokens)


# --------------------------------------------------------------------- scaling
def _check_scale(name: str, value: float) -> None:
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _scaled(tokens: int, scale: float) -> int:
    return max(1, round(tokens * scale))


def scale_request(
    request: TraceRequest, token_scale: float = 1.0, api_scale: float = 1.0
) -> TraceRequest:
    """Every token count times `token_scale` (at least 1), API times times
    `api_scale`. The last segment keeps zero result tokens (it makes no call)."""
    _check_scale("token_scale", token_scale)
    _check_scale("api_scale", api_scale)
    segments = tuple(
        TraceSegment(
            _scaled(s.completion_tokens, token_scale),
            None if s.api_time_s is None else s.api_time_s * api_scale,
            0 if s.api_time_s is None else _scaled(s.api_return_tokens, token_scale),
            s.tool,
        )
        for s in request.segments
    )
    prompt = _scaled(request.prompt_tokens, token_scale)
    shared = min(prompt, round(request.shared_prefix_tokens * token_scale))
    return TraceRequest(request.request_id, prompt, segments, shared)


def sample(
    requests: Sequence[TraceRequest], max_requests: int | None, seed: int
) -> list[TraceRequest]:
    """The first `max_requests` of a seeded shuffle (all of them, shuffled, if None)."""
    if max_requests is not None and (isinstance(max_requests, bool) or max_requests < 1):
        raise ValueError(f"max_requests must be >= 1 or None, got {max_requests!r}")
    order = list(requests)
    random.Random(seed).shuffle(order)
    return order if max_requests is None else order[:max_requests]


def build_workload(
    requests: Sequence[TraceRequest],
    *,
    token_scale: float = 1.0,
    api_scale: float = 1.0,
    max_requests: int | None = None,
    max_total_tokens: int | None = None,
    seed: int = 0,
) -> tuple[list[TraceRequest], int]:
    """Scale, drop requests whose scaled plan exceeds `max_total_tokens`, then
    sample. Returns (requests, number dropped as too long)."""
    if max_total_tokens is not None and max_total_tokens < 1:
        raise ValueError(f"max_total_tokens must be >= 1 or None, got {max_total_tokens!r}")
    scaled = [scale_request(r, token_scale, api_scale) for r in requests]
    fits = [r for r in scaled if max_total_tokens is None or r.total_tokens <= max_total_tokens]
    return sample(fits, max_requests, seed), len(scaled) - len(fits)


# -------------------------------------------------------------------- arrivals
def arrivals(n: int, rate_rps: float, seed: int) -> list[float]:
    """Offsets (seconds from the start) of `n` Poisson arrivals at `rate_rps`."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if not isinstance(rate_rps, int | float) or not math.isfinite(rate_rps) or rate_rps <= 0:
        raise ValueError(f"rate_rps must be > 0, got {rate_rps!r}")
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(rate_rps)
        offsets.append(t)
    return offsets


def prompt_token_ids(length: int, salt: int = 0) -> list[int]:
    """Deterministic filler prompt ids in 10..400 (inside any vocabulary we build)."""
    return [10 + (7 * i + 13 * salt) % 391 for i in range(length)]
