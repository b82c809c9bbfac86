"""Cluster benchmark: replay INFERCEPT traces through the HTTP endpoint of a
local mars-serve cluster (Ray Serve, engine instances on vLLM CPU) under each
dispatch policy, and measure what the ingress and the global scheduler add
to a request.

Each trace request is one client-driven session, run the way an agent runs
one: at its Poisson arrival the client sends the prompt (streamed `POST
/v1/completions` with `X-Session-Id`) and reads the segment's completion
tokens (`max_tokens`), runs the API call itself (sleeps the scaled API time),
then sends the API's result tokens as the next turn of the same session,
until the last segment. Each turn that ends in an API call carries the
`mars.tool` and `mars.expected_api_s` hints. After the last turn the client
reads the session record (`GET /v1/sessions/{id}`: the instance, the turns
the engine saw, its KV counters) and closes the session (`DELETE`).

Text completions, not chat, so that every turn adds exactly the trace's
token counts: the text is made of words the model's tokenizer encodes as one
token each (a chat template would add role tokens to every turn). The
ingress adds the start token to a session's first turn.

Every configuration is a fresh Ray Serve application (`cluster.app.
build_from_config` on the base serving YAML, with KV capped per instance and
sessions in a Redis of the benchmark's own) replaying the same sessions at
the same offsets. A configuration is `<dispatch>:<engine policy>`; the
default four are MARS-aware, least-load and round-robin placement with MARS
in the engines, and round-robin with vLLM's policy (the baseline). The
least-load and round-robin baselines run as `session_affinity` with that
fallback: they place a session's first turn, and its later turns follow its
KV to its instance (which `mars_aware` does by itself).

The overhead probe (first configuration and load, before its replay) sends
`--overhead-requests` one-token requests at the benchmark's arrival rate,
one at a time, each twice: over HTTP (proxy, ingress, state store, global
scheduler, engine) and straight to the engine deployment the HTTP request
landed on (its `DeploymentHandle`: `generate(close=True)`, the engine work
the ingress does for a one-turn request), alternating which goes first. Both
report the engine replica's own time on the request (`engine_s`), so the
added latency is measured net of the engine's step-to-step jitter (see
`overhead_report`); the raw paired difference is reported beside it.

    python -m bench.http_bench --quick
    python -m bench.http_bench --traces multi_api --loads 2 --max-requests 24 \\
        --token-scale 0.25 --api-scale 0.1 --kv-blocks 32

Writes `docs/results/cluster_<trace>.{json,png}` and `cluster_overhead.json`
(`quick_cluster_*` for `--quick`). Sessions still running at `--max-seconds`
are counted (`timed_out`, `not_submitted`), never dropped silently.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bench.engine_bench import (
    BLOCK_SIZE,
    MODEL_MAX_POSITIONS,
    REPO_ROOT,
    REQUIRED_KEYS,
    _mean,
    _percentile,
    machine_description,
)
from bench.generated_workload import workload_source
from bench.workload import TraceRequest, arrivals, build_workload
from cluster.config import ServingConfig, load_serving_config
from cluster.ports import free_port
from cluster.serve_env import serve_env

CLUSTER_KEYS = (*REQUIRED_KEYS, "dispatch")
"""Keys every row has: the engine benchmark's, plus the dispatch policy."""

DISPATCH: dict[str, tuple[str, dict[str, Any]]] = {
    "mars_aware": ("mars_aware", {}),
    "least_load": ("session_affinity", {"fallback": "least_load"}),
    "round_robin": ("session_affinity", {"fallback": "round_robin"}),
}
"""Benchmark dispatch name -> the serving config's (policy, params). The
ingress sends every turn where the global scheduler says; plain least_load
and round_robin ignore affinity and would send a session's later turns to an
instance that does not hold it."""

DEFAULT_CONFIGS = ("mars_aware:mars", "least_load:mars", "round_robin:mars", "round_robin:vllm")
DEFAULT_SERVE_CONFIG = REPO_ROOT / "configs" / "serve" / "local-cpu-tiny.yaml"
TOOL_HINT = "infercept_api"
"""`mars.tool` of every API call (the traces do not name their APIs)."""
OVERHEAD_GOAL_MS = 10.0
PROBE_SAMPLES = {
    "http": "HTTP request",
    "direct": "engine handle",
    "http_engine": "engine (HTTP)",
    "direct_engine": "engine (direct)",
    "outside_ingress": "before/after ingress",
    "ingress_own": "ingress own work",
    "ingress_engine_hop": "ingress->engine hop",
    "direct_engine_hop": "driver->engine hop",
    "health": "GET /health",
    "place": "scheduler.place",
    "store": "store GET",
}
"""What the overhead probe times, and the printed names. The HTTP request's
`Server-Timing` splits it: before/after the ingress handler (client, HAProxy,
the replica's HTTP server), the handler's own work outside the engine call,
and the Ray hop to the engine net of the engine's own time; the driver's hop
to the engine is its direct counterpart."""
PROBE_PROMPT_TOKENS = 8
"""Probe prompts stay under one KV block, so no probe hits the prefix cache."""
PROBE_WARMUP = 5
PROBE_SETTLE_S = 0.1
"""Pause between the two halves of a probe pair: the first half's session
close is one more engine step, which the second half must not queue behind
(that would be the engine's time, not the ingress's)."""
WARMUP_REQUESTS = 2
READY_TIMEOUT_S = 180.0


class TurnError(RuntimeError):
    """A turn failed: an HTTP error status, an in-band stream error, or a
    stream that ended without a finish reason."""


# ------------------------------------------------------------ workload text
def single_token_words(tokenizer: Any) -> list[str]:
    """Words that the tokenizer encodes as one token each, after a space.

    Byte-level BPE splits text into space-led words before merging, so a
    text of N such words, each led by a space, is exactly N tokens.
    """
    words = []
    for token_id in range(len(tokenizer)):
        piece = tokenizer.decode([token_id])
        word = piece[1:]
        if (
            piece.startswith(" ")
            and word.isascii()
            and word.isalpha()
            and tokenizer.encode(piece, add_special_tokens=False) == [token_id]
        ):
            words.append(word)
    if len(words) < 8:
        raise RuntimeError(
            f"the tokenizer has only {len(words)} single-token words (need 8); "
            "the benchmark cannot build texts of exact token counts for this model"
        )
    return words


def filler_text(tokens: int, salt: str, words: Sequence[str]) -> str:
    """`tokens` space-led words drawn with seed `salt`: distinct salts give
    distinct texts, so sessions never share a prefix-cache block."""
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens!r}")
    rng = random.Random(salt)
    return "".join(" " + rng.choice(words) for _ in range(tokens))


@dataclass(frozen=True)
class Turn:
    """One HTTP request of a session: append `text` (`tokens` tokens, whose
    ids are `token_ids`; the first turn's start with the model's start
    token) to the context, generate up to `max_tokens`; then, unless
    `api_s` is None, the client runs the API call for `api_s` seconds
    before the next turn."""

    text: str
    tokens: int
    max_tokens: int
    api_s: float | None
    token_ids: tuple[int, ...] = ()
    tool: str | None = None
    """The API called after this turn (`mars.tool`), when there is one."""


def session_turns(
    request: TraceRequest,
    salt: str,
    words: Sequence[str],
    encode: Callable[[str], list[int]],
    start_ids: Sequence[int] = (),
) -> list[Turn]:
    """The turns of one trace request: its prompt (after `start_ids`, the
    model's start token), then each API result. The prompt's first
    `request.shared_prefix_tokens` are the same text for every request (a
    shared system prompt); the rest is drawn with `salt`.

    Raises ValueError if a text does not encode to its token count (the
    words were not single tokens after all)."""
    shared = request.shared_prefix_tokens
    prefix = filler_text(shared, "shared-system-prompt", words) if shared else ""
    sends = [request.prompt_tokens - shared, *(s.api_return_tokens for s in request.segments[:-1])]
    turns = []
    for k, (tokens, segment) in enumerate(zip(sends, request.segments, strict=True)):
        text = filler_text(tokens, f"{salt}:{k}", words) if tokens else ""
        if k == 0:
            text, tokens = prefix + text, tokens + shared
        ids = encode(text)
        if len(ids) != tokens:
            raise ValueError(
                f"request {request.request_id!r} turn {k}: text for {tokens} tokens "
                f"encodes to {len(ids)}"
            )
        start = tuple(start_ids) if k == 0 else ()
        turns.append(
            Turn(
                text,
                tokens,
                segment.completion_tokens,
                segment.api_time_s,
                (*start, *ids),
                (segment.tool or TOOL_HINT) if segment.api_time_s is not None else None,
            )
        )
    return turns


# ---------------------------------------------------------- configurations
@dataclass(frozen=True)
class BenchConfig:
    """One compared configuration: a dispatch policy and an engine policy."""

    dispatch: str
    policy: str

    @property
    def label(self) -> str:
        return f"{self.dispatch}:{self.policy}"


def parse_config(text: str) -> BenchConfig:
    """`<dispatch>:<engine policy>`, e.g. ``mars_aware:mars``; ValueError names
    the bad part and lists the known names."""
    from policies import engine_policy_names

    dispatch, sep, policy = text.partition(":")
    if not sep:
        raise ValueError(
            f"config {text!r} must be <dispatch>:<engine policy>, e.g. mars_aware:mars"
        )
    if dispatch not in DISPATCH:
        raise ValueError(f"config {text!r}: unknown dispatch {dispatch!r}; known: {list(DISPATCH)}")
    if policy not in engine_policy_names():
        raise ValueError(
            f"config {text!r}: unknown engine policy {policy!r}; "
            f"known: {list(engine_policy_names())}"
        )
    return BenchConfig(dispatch, policy)


def serving_config(
    base: ServingConfig,
    bench: BenchConfig,
    *,
    instances: int,
    kv_blocks: int,
    max_model_len: int,
    host_swap_tokens: int,
    predictor: str,
    redis_url: str,
    port: int,
) -> ServingConfig:
    """`base` with this configuration's policies, the KV cap and the
    benchmark's Redis and port; validated again as a whole.

    The base's engine-policy params are kept only for the same policy (they
    are that policy's parameters); another policy runs with its defaults."""
    data = base.model_dump()
    data["engine"] = {
        **data["engine"],
        "block_size": BLOCK_SIZE,
        "num_kv_blocks": kv_blocks,
        "max_model_len": max_model_len,
        "host_swap_tokens": host_swap_tokens,
    }
    same_policy = base.policy.name == bench.policy
    data["policy"] = {
        "name": bench.policy,
        "params": base.policy.params if same_policy else {},
        "predictor": predictor,
    }
    policy, params = DISPATCH[bench.dispatch]
    data["dispatch"] = {"policy": policy, "params": params}
    data["instances"], data["pools"] = instances, None
    data["state_store"] = {**data["state_store"], "url": redis_url}
    data["http"] = {**data["http"], "port": port}
    return ServingConfig.model_validate(data)


# ------------------------------------------------------------------ client
def parse_sse_line(line: bytes) -> dict[str, Any] | None:
    """The JSON payload of one `data:` line of an event stream; None for
    anything else (blank separators, comments, the closing ``[DONE]``)."""
    text = line.decode("utf-8").strip()
    if not text.startswith("data:"):
        return None
    data = text[len("data:") :].strip()
    if data == "[DONE]":
        return None
    try:
        payload = json.loads(data)
    except json.JSONDecodeError as exc:
        raise TurnError(f"malformed event-stream line {text[:80]!r}: {exc}") from None
    if not isinstance(payload, dict):
        raise TurnError(f"event-stream payload is not an object: {text[:80]!r}")
    return payload


def _error_message(body: str) -> str:
    """The `error.message` of an OpenAI-shaped error body, else the body."""
    with contextlib.suppress(ValueError, TypeError, KeyError):
        return json.loads(body)["error"]["message"]
    return body[:200]


@dataclass(frozen=True)
class ClientMode:
    """How the client talks to the server under test. mars-serve is given
    a session id (and its record is read and closed after the last turn);
    stock vLLM has no sessions. `hints`: what a turn that ends in an API
    call tells mars-serve of it: nothing, the tool's name (which a client
    knows), or the name and the call's true duration (an oracle's hint)."""

    sessions: bool = True
    hints: str = "tool+duration"
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.hints not in HINT_MODES:
            raise ValueError(f"hints must be one of {HINT_MODES}, got {self.hints!r}")


HINT_MODES = ("none", "tool", "tool+duration")


def _hints(turn: Turn, mode: ClientMode) -> dict[str, Any] | None:
    if turn.api_s is None or mode.hints == "none" or not mode.sessions:
        return None
    hints: dict[str, Any] = {"tool": turn.tool or TOOL_HINT}
    if mode.hints == "tool+duration":
        hints["expected_api_s"] = turn.api_s
    return hints


async def _turn(
    http: Any,
    url: str,
    model: str,
    session_id: str,
    turn: Turn,
    context: list[int],
    mode: ClientMode,
) -> TurnResult:
    """Send one turn, streamed, as an OpenAI client sends it: the whole
    context so far as token ids (`context`, to which the turn's text was
    appended), with the session id if `mode` has sessions."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": context,
        "max_tokens": turn.max_tokens,
        "stream": True,
        "return_token_ids": True,
    }
    if mode.ignore_eos:
        body["ignore_eos"] = True
    hints = _hints(turn, mode)
    if hints is not None:
        body["mars"] = hints
    headers = {"X-Session-Id": session_id} if mode.sessions else {}
    first = None
    finish = None
    engine_s = None
    phases_ms: dict[str, float] = {}
    generated: list[int] = []
    async with http.post(f"{url}/v1/completions", json=body, headers=headers) as response:
        if response.status != 200:
            raise TurnError(f"HTTP {response.status}: {_error_message(await response.text())}")
        async for line in response.content:
            payload = parse_sse_line(line)
            if payload is not None and "engine_s" in (payload.get("mars") or {}):
                engine_s = payload["mars"]["engine_s"]
                phases_ms = payload["mars"].get("phases_ms", {})
            if payload is None or (not payload.get("choices") and "error" not in payload):
                continue
            if first is None:
                first = time.monotonic()
            if "error" in payload:
                raise TurnError(f"stream error: {payload['error'].get('message')}")
            choice = payload["choices"][0]
            generated.extend(choice.get("token_ids") or ())
            if choice.get("finish_reason") is not None:
                finish = choice["finish_reason"]
    if first is None or finish is None:
        raise TurnError("the stream ended without a finish_reason")
    return TurnResult(first, time.monotonic(), finish, generated, engine_s, phases_ms)


@dataclass(frozen=True)
class TurnResult:
    """What the client saw of one turn (monotonic times)."""

    first_s: float
    """The first streamed chunk."""
    ended_s: float
    finish_reason: str
    token_ids: list[int]
    engine_s: float | None
    """The engine's own time on the turn, from mars-serve's `mars` chunk
    (None from a server without one)."""
    phases_ms: dict[str, float] = field(default_factory=dict)
    """The ingress's steps of the turn (`cluster.turn.TURN_PHASES`), from the
    same chunk (empty from a server without one)."""


@dataclass
class SessionOutcome:
    """What the client saw of one session. `status`: ``not_submitted`` (its
    arrival came after the time cap), ``running`` (cut by the cap),
    ``completed`` or ``failed``."""

    request_id: str
    turns: int
    status: str = "not_submitted"
    submit_lag_s: float | None = None
    ttft_s: float | None = None
    """First turn: from the scheduled arrival to the first streamed chunk."""
    e2e_s: float | None = None
    """From the scheduled arrival to the end of the last turn (API time included)."""
    resume_ttft_s: list[float] = field(default_factory=list)
    """Later turns: from sending the API result to the first streamed chunk."""
    finish_reasons: list[str] = field(default_factory=list)
    instance_id: str | None = None
    engine: dict[str, Any] | None = None
    """The engine's view at the end (`GET /v1/sessions/{id}`'s `engine`)."""
    error: str | None = None
    outside_engine_s: list[float] = field(default_factory=list)
    """Each turn's time from the client's send to its end, less the engine's
    own time on it (where the server reports it): the serving stack's share."""
    phases_ms: list[dict[str, float]] = field(default_factory=list)
    """Each turn's ingress steps, where the server reports them."""


async def run_session(
    http: Any,
    url: str,
    model: str,
    session_id: str,
    turns: Sequence[Turn],
    arrival: float,
    outcome: SessionOutcome,
    mode: ClientMode,
) -> None:
    """Run one session from its arrival (a monotonic time) to its close,
    recording into `outcome`; a failure is recorded, never raised."""
    import aiohttp

    await asyncio.sleep(max(0.0, arrival - time.monotonic()))
    outcome.status = "running"
    outcome.submit_lag_s = time.monotonic() - arrival
    k = 0
    context: list[int] = []
    try:
        for k, turn in enumerate(turns):
            context.extend(turn.token_ids)
            sent = time.monotonic()
            result = await _turn(http, url, model, session_id, turn, context, mode)
            context.extend(result.token_ids)
            if k == 0:
                outcome.ttft_s = result.first_s - arrival
            else:
                outcome.resume_ttft_s.append(result.first_s - sent)
            if result.engine_s is not None:
                outcome.outside_engine_s.append(result.ended_s - sent - result.engine_s)
            if result.phases_ms:
                outcome.phases_ms.append(result.phases_ms)
            outcome.finish_reasons.append(result.finish_reason)
            if turn.api_s is not None:
                await asyncio.sleep(turn.api_s)
        outcome.e2e_s = time.monotonic() - arrival
        outcome.status = "completed"
    except (TurnError, aiohttp.ClientError, asyncio.TimeoutError, KeyError, IndexError) as exc:
        outcome.status = "failed"
        outcome.error = f"turn {k}: {type(exc).__name__}: {exc}"
    if not mode.sessions:
        return
    if outcome.status == "completed":
        try:
            async with http.get(f"{url}/v1/sessions/{session_id}") as response:
                record = await response.json()
            outcome.instance_id = record["instance_id"]
            outcome.engine = record["engine"]
        except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError) as exc:
            outcome.error = f"session record: {type(exc).__name__}: {exc}"
    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
        async with http.delete(f"{url}/v1/sessions/{session_id}") as response:
            await response.read()


def _client_session() -> Any:
    """An aiohttp session with no connection cap (every session may have a
    turn in flight) and no overall timeout (`--max-seconds` bounds a replay).
    Every request on a connection of its own: a pooled connection that the
    server closes as idle (uvicorn after 5 s, longer than many API calls)
    while the client reuses it fails the turn with "Server disconnected",
    a failure of the benchmark's client, not of the server."""
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
    )


async def replay(
    url: str,
    model: str,
    plans: Sequence[list[Turn]],
    request_ids: Sequence[str],
    offsets: Sequence[float],
    *,
    prefix: str,
    max_seconds: float,
    desc: str,
    progress: bool,
    mode: ClientMode = ClientMode(),
) -> tuple[list[SessionOutcome], float]:
    """Replay every session against `url`; sessions unfinished at
    `max_seconds` are cancelled and left in their status. Returns the
    outcomes (in plan order) and the replay's wall time."""
    from tqdm import tqdm

    outcomes = [
        SessionOutcome(request_id, len(turns))
        for request_id, turns in zip(request_ids, plans, strict=True)
    ]
    async with _client_session() as http:
        for i in range(WARMUP_REQUESTS):  # an app's first requests set up its paths
            body = {"model": model, "prompt": f"warm up {i}", "max_tokens": 1}
            async with http.post(f"{url}/v1/completions", json=body) as response:
                reply = await response.text()
            if response.status != 200:
                raise TurnError(f"warm-up: HTTP {response.status}: {_error_message(reply)}")
        bar = tqdm(
            total=len(plans), desc=desc, unit="session", file=sys.stderr, disable=not progress
        )
        t0 = time.monotonic()
        tasks = []
        for i, (turns, offset) in enumerate(zip(plans, offsets, strict=True)):
            session_id = f"{prefix}-{i:03d}-{request_ids[i]}"
            task = asyncio.create_task(
                run_session(http, url, model, session_id, turns, t0 + offset, outcomes[i], mode)
            )
            task.add_done_callback(lambda _: bar.update(1))
            tasks.append(task)
        _, pending = await asyncio.wait(tasks, timeout=max_seconds)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        replay_s = time.monotonic() - t0
        bar.close()
    return outcomes, replay_s


# ------------------------------------------------------------------- rows
def kv_counters(engines: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Recomputed and swapped tokens, and demotions to discard / swap, summed
    over the engine session records."""
    demoted = Counter(
        event.get("strategy")
        for engine in engines
        for event in engine.get("timeline", [])
        if event.get("event") == "demoted"
    )
    return {
        "recompute_tokens": sum(e.get("recomputed_tokens", 0) for e in engines),
        "swapped_out_tokens": sum(e.get("swapped_out_tokens", 0) for e in engines),
        "discards": demoted["discard"],
        "swaps": demoted["swap"],
    }


def summarize(
    outcomes: Sequence[SessionOutcome], *, trace: str, load_rps: float, config: BenchConfig
) -> dict[str, Any]:
    """One row: latency over completed sessions, and every other session
    counted by how it ended."""
    completed = [o for o in outcomes if o.status == "completed"]
    e2e = [o.e2e_s for o in completed]
    ttft = [o.ttft_s for o in completed]
    resume = [t for o in completed for t in o.resume_ttft_s]
    status = Counter(o.status for o in outcomes)
    verified = [o for o in completed if o.engine is not None]
    lags = [o.submit_lag_s for o in outcomes if o.submit_lag_s is not None]
    errors = [o.error for o in outcomes if o.error]
    return {
        "trace": trace,
        "load_rps": load_rps,
        "policy": config.policy,
        "dispatch": config.dispatch,
        "e2e_mean_s": _mean(e2e),
        "e2e_p99_s": _percentile(e2e, 99),
        "ttft_mean_s": _mean(ttft),
        "ttft_p99_s": _percentile(ttft, 99),
        "completed": len(completed),
        "requests": len(outcomes),
        "unfinished": len(outcomes) - len(completed),
        "failed": status["failed"],
        "timed_out": status["running"],
        "not_submitted": status["not_submitted"],
        "errors": errors[:5],
        "resume_ttft_mean_s": _mean(resume),
        "resume_ttft_p99_s": _percentile(resume, 99),
        "turns": sum(len(o.finish_reasons) for o in outcomes),
        "early_stop_turns": sum(r != "length" for o in outcomes for r in o.finish_reasons),
        "split_sessions": sum(o.engine.get("segments") != o.turns for o in verified),
        "unverified_sessions": len(completed) - len(verified),
        "placement": dict(sorted(Counter(o.instance_id for o in verified).items())),
        **kv_counters([o.engine for o in verified]),
        "max_submit_lag_s": max(lags) if lags else 0.0,
    }


def error_row(workload: Workload, load_rps: float, config: BenchConfig, error: str) -> dict:
    """The row of a configuration that could not run: every session unfinished."""
    requests = len(workload.requests)
    return {
        "trace": workload.name,
        "load_rps": load_rps,
        "policy": config.policy,
        "dispatch": config.dispatch,
        "e2e_mean_s": None,
        "e2e_p99_s": None,
        "ttft_mean_s": None,
        "ttft_p99_s": None,
        "completed": 0,
        "requests": requests,
        "unfinished": requests,
        "error": error[:300],
        "machine": machine_description(),
        "loadavg_after": os.getloadavg()[0],
    }


def parse_server_timing(header: str) -> dict[str, float]:
    """The ``name;dur=<ms>`` entries of a `Server-Timing` header, in seconds.

    Raises TurnError when the header is missing or malformed: the probe's
    split needs it, and a silent zero would hide where the time went."""
    timing = {}
    for entry in filter(None, (part.strip() for part in header.split(","))):
        name, _, params = entry.partition(";")
        duration = dict(p.strip().split("=", 1) for p in params.split(";") if "=" in p)
        if "dur" not in duration:
            raise TurnError(f"Server-Timing entry {entry!r} has no dur")
        timing[name.strip()] = float(duration["dur"]) / 1000.0
    missing = {"ingress", "engine_call", "engine"} - timing.keys()
    if missing:
        raise TurnError(f"Server-Timing {header!r} lacks {sorted(missing)}")
    return timing


def latency_summary_ms(values: Sequence[float]) -> dict[str, float | None]:
    """p50 / p99 / mean / max of seconds, in milliseconds."""
    ms = [v * 1000.0 for v in values]
    top = max(ms) if ms else None
    return {"p50": _percentile(ms, 50), "p99": _percentile(ms, 99), "mean": _mean(ms), "max": top}


def overhead_report(samples: dict[str, list[float]], goal_ms: float) -> dict[str, Any]:
    """Summaries of the probe's timings (seconds in, ms out), the added latency
    and whether its p99 meets `goal_ms`.

    Three measures of what the HTTP path adds to a request:

    - ``added_raw``: the paired difference HTTP - direct. Its tail mixes in
      the engine's own jitter: the two halves of a pair are different engine
      steps, and a slow one on the HTTP side counts as overhead.
    - ``added``: the same difference with each request's own engine time (the
      engine replica's `engine_s`: from its `generate` call to the chunk's
      end) taken out of both halves: ``(http - http_engine) - (direct -
      direct_engine)``. What is left is the path around the engine: HAProxy,
      the ingress, placement, and the hops. The goal is judged on its p99,
      reported with a 95% bootstrap interval (`P99_BOOTSTRAP_RESAMPLES`):
      a p99 of a few hundred pairs rests on their few largest values.
    - ``added_p99_of_paths_ms``: p99 of the HTTP path around the engine minus
      p99 of the direct path around it, the service-mesh convention ("adds
      N ms at p99"). The paired measure is stricter: the direct hop's own
      jitter, independent of the HTTP half's, widens its tail.
    """
    raw = [h - d for h, d in zip(samples["http"], samples["direct"], strict=True)]
    http_path = [h - he for h, he in zip(samples["http"], samples["http_engine"], strict=True)]
    direct_path = [
        d - de for d, de in zip(samples["direct"], samples["direct_engine"], strict=True)
    ]
    net = [h - d for h, d in zip(http_path, direct_path, strict=True)]
    report = {name: latency_summary_ms(values) for name, values in samples.items()}
    report["added_raw"] = latency_summary_ms(raw)
    report["added"] = latency_summary_ms(net)
    p99 = report["added"]["p99"]
    paths_p99 = latency_summary_ms(http_path)["p99"], latency_summary_ms(direct_path)["p99"]
    return {
        "summary_ms": report,
        "added_p50_ms": report["added"]["p50"],
        "added_p99_ms": p99,
        "added_p99_ci95_ms": p99_interval_ms(net),
        "added_p99_of_paths_ms": None if None in paths_p99 else paths_p99[0] - paths_p99[1],
        "added_raw_p50_ms": report["added_raw"]["p50"],
        "added_raw_p99_ms": report["added_raw"]["p99"],
        "goal_p99_added_ms": goal_ms,
        "goal_met": p99 is not None and p99 < goal_ms,
    }


P99_BOOTSTRAP_RESAMPLES = 2000


def p99_interval_ms(values: Sequence[float], seed: int = 0) -> list[float] | None:
    """A 95% percentile-bootstrap interval of the p99 of `values` (seconds in,
    ms out); None for fewer than two values. Seeded: a report is reproducible."""
    if len(values) < 2:
        return None
    rng = random.Random(seed)
    n = len(values)
    estimates = sorted(
        _percentile([values[rng.randrange(n)] for _ in range(n)], 99) * 1000.0
        for _ in range(P99_BOOTSTRAP_RESAMPLES)
    )
    return [_percentile(estimates, 2.5), _percentile(estimates, 97.5)]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The printed comparison: one line per configuration, in run order."""

    def fmt(value: Any) -> str:
        return "-" if value is None else f"{value:.2f}"

    header = (
        f"{'load':>5} {'dispatch':<11} {'policy':<9} {'done':>7} {'e2e mean':>9} "
        f"{'e2e p99':>8} {'ttft mean':>9} {'ttft p99':>8} {'resume p99':>10} "
        f"{'recomp tok':>10} {'discards':>8} {'swaps':>5} {'split':>5}  placement"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        done = f"{r['completed']}/{r['requests']}"
        placement = " ".join(f"{k}:{v}" for k, v in r.get("placement", {}).items())
        lines.append(
            f"{r['load_rps']:>5g} {r['dispatch']:<11} {r['policy']:<9} {done:>7} "
            f"{fmt(r['e2e_mean_s']):>9} {fmt(r['e2e_p99_s']):>8} {fmt(r['ttft_mean_s']):>9} "
            f"{fmt(r['ttft_p99_s']):>8} {fmt(r.get('resume_ttft_p99_s')):>10} "
            f"{r.get('recompute_tokens', '-')!s:>10} {r.get('discards', '-')!s:>8} "
            f"{r.get('swaps', '-')!s:>5} {r.get('split_sessions', '-')!s:>5}  {placement}"
            + (f"  ERROR {r['error']}" if r.get("error") else "")
        )
    return "\n".join(lines)


def format_overhead(report: dict[str, Any]) -> str:
    """The printed overhead table and the verdict on the p99 goal."""
    names = {**PROBE_SAMPLES, "added_raw": "added, raw", "added": "added, net"}
    lines = [f"{'':<22} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'max ms':>8}"]
    for key, name in names.items():
        s = report["summary_ms"].get(key)
        if s is None:  # a report written before the probe timed this
            continue
        cells = " ".join("       -" if s[q] is None else f"{s[q]:>8.2f}" for q in s)
        lines.append(f"{name:<22} {cells}")
    verdict = "MET" if report["goal_met"] else "NOT MET"
    interval = report.get("added_p99_ci95_ms")
    if interval is not None:
        lines.append(
            f"p99 added, net: 95% bootstrap interval {interval[0]:.2f}-{interval[1]:.2f} ms"
        )
    paths = report.get("added_p99_of_paths_ms")
    if paths is not None:
        lines.append(
            f"p99 of the HTTP path - p99 of the direct path (around the engine): {paths:.2f} ms"
        )
    lines.append(
        f"goal: p99 added (net of each request's engine time) < "
        f"{report['goal_p99_added_ms']:g} ms -> {verdict}"
    )
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Mean E2E and P99 TTFT per configuration: lines over load when the run
    has several loads (as the engine benchmark), bars for a single load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = sorted({r["load_rps"] for r in rows})
    configs = list(dict.fromkeys(f"{r['dispatch']}:{r['policy']}" for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    panels = (("e2e_mean_s", "mean end-to-end latency"), ("ttft_p99_s", "P99 time to first token"))
    for ax, (key, name) in zip(axes, panels, strict=True):
        for index, config in enumerate(configs):
            mine = {
                r["load_rps"]: r[key] for r in rows if f"{r['dispatch']}:{r['policy']}" == config
            }
            values = [math.nan if mine.get(load) is None else mine[load] for load in loads]
            if len(loads) > 1:
                ax.plot(loads, values, marker="o", label=config)
            else:
                ax.bar(index, values[0], label=config)
        if len(loads) > 1:
            ax.set_xlabel("load (sessions/s)")
        else:
            ax.set_xticks([])
            ax.set_xlabel(f"load {loads[0]:g} sessions/s")
        ax.set_ylabel("seconds")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------- workload
@dataclass
class Workload:
    """One trace's sessions, shared by every configuration."""

    name: str
    requests: list[TraceRequest]
    plans: list[list[Turn]]
    dropped: int
    max_model_len: int


def build_trace_workload(
    trace: str, args: argparse.Namespace, tokenizer: Any, words: Sequence[str]
) -> Workload:
    """Scale and sample `trace` as the engine benchmark does, and turn each
    request into its session's turns; `max_model_len` fits the longest."""

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    name, source = workload_source(trace, args.seed, count)
    # The longest context a session may reach: what one instance's KV holds
    # (vLLM keeps one block of the pool as its null block) and the model
    # allows, minus headroom for the closing chunk and the start token the
    # ingress adds.
    usable = (args.kv_blocks - 1) * BLOCK_SIZE
    limit = min(usable, MODEL_MAX_POSITIONS) - BLOCK_SIZE - 1
    requests, dropped = build_workload(
        source,
        token_scale=args.token_scale,
        api_scale=args.api_scale,
        max_requests=args.max_requests,
        max_total_tokens=limit,
        seed=args.seed,
    )

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    start = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    plans = [
        session_turns(r, f"{args.seed}:{i}", words, encode, start) for i, r in enumerate(requests)
    ]
    longest = max(r.total_tokens for r in requests) + 1
    max_model_len = min(
        MODEL_MAX_POSITIONS, usable, math.ceil((longest + BLOCK_SIZE) / BLOCK_SIZE) * BLOCK_SIZE
    )
    return Workload(name, requests, plans, dropped, max_model_len)


@dataclass(frozen=True)
class Probe:
    """What the overhead probe needs besides the application."""

    tokenizer: Any
    words: Sequence[str]
    redis_url: str
    requests: int


# ----------------------------------------------------------- infrastructure


@contextlib.contextmanager
def redis_server(url: str | None) -> Iterator[str]:
    """`url` as given, or a redis-server of our own on a free port (never the
    machine's 6379), stopped on exit. The ingress and the global scheduler
    are separate processes: only a shared store lets the scheduler see a
    session's instance."""
    if url is not None:
        yield url
        return
    from cluster.local_redis import RedisUnavailable, local_redis_server

    with tempfile.TemporaryDirectory(prefix="http-bench-redis-") as workdir:
        try:
            with local_redis_server(Path(workdir)) as started:
                yield started
        except RedisUnavailable as exc:
            raise RuntimeError(f"{exc}; or pass --redis-url redis://host:port/db") from None


def _wait_ready(url: str, timeout_s: float) -> list[str]:
    """Poll `/ready` until the ingress sees healthy instances; return their ids."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=10) as response:
                return json.loads(response.read())["instances"]
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}/ready did not answer after {timeout_s:.0f} s") from exc
            time.sleep(1.0)


async def _engine_loads(app_name: str, instance_ids: Sequence[str]) -> dict[str, dict]:
    """Each engine's load snapshot (its `total_blocks` shows the KV cap took)."""
    from ray import serve

    loads = {}
    for instance_id in instance_ids:
        handle = serve.get_deployment_handle(f"engine-{instance_id}", app_name=app_name)
        loads[instance_id] = await handle.load.remote()
    return loads


async def measure_overhead(
    url: str,
    model: str,
    app_name: str,
    probe: Probe,
    *,
    load_rps: float,
    seed: int,
    progress: bool,
) -> dict[str, Any]:
    """Time `probe.requests` one-token requests over HTTP and straight to the
    engine they landed on (see the module docstring), plus the ingress's
    building blocks: `/health` (proxy and ingress, no work), the global
    scheduler's `place` and one state-store read, each from this process."""
    import redis
    from ray import serve
    from tqdm import tqdm
    from vllm import SamplingParams

    from workers.turns import TurnRequest

    scheduler = serve.get_deployment_handle("global-scheduler", app_name=app_name)
    engines: dict[str, Any] = {}
    store = redis.Redis.from_url(probe.redis_url)
    samples: dict[str, list[float]] = {k: [] for k in PROBE_SAMPLES}

    async def timed(call: Callable[[], Any]) -> float:
        """Seconds to issue and await `call()` (Serve sends on `.remote()`)."""
        start = time.perf_counter()
        await call()
        return time.perf_counter() - start

    async def over_http(http: Any, text: str) -> tuple[float, dict[str, float], str]:
        """(seconds, the ingress's `Server-Timing` in seconds, the instance)."""
        body = {"model": model, "prompt": text, "max_tokens": 1}
        start = time.perf_counter()
        async with http.post(f"{url}/v1/completions", json=body) as response:
            reply = await response.json()
        elapsed = time.perf_counter() - start
        if response.status != 200:
            raise TurnError(f"probe HTTP {response.status}: {reply}")
        timing = parse_server_timing(response.headers.get("Server-Timing", ""))
        return elapsed, timing, reply["mars"]["instance_id"]

    async def direct(
        instance_id: str, token_ids: list[int], session_id: str
    ) -> tuple[float, float]:
        """(seconds, the engine's own seconds)."""
        if instance_id not in engines:
            engines[instance_id] = serve.get_deployment_handle(
                f"engine-{instance_id}", app_name=app_name
            )
        engine = engines[instance_id]
        turn = TurnRequest(session_id, token_ids, SamplingParams(max_tokens=1))
        start = time.perf_counter()
        async for batch in engine.options(stream=True).generate.remote(turn):
            end = batch[-1]
        return time.perf_counter() - start, end.engine_s

    async def health(http: Any) -> None:
        async with http.get(f"{url}/health") as response:
            await response.read()

    async def pair(
        http: Any, name: str, first_http: bool, guess: str
    ) -> tuple[dict[str, float], str]:
        """The pair's timings (`samples` keys) and the HTTP request's instance.
        Direct-first pairs go to `guess`, where the previous HTTP request landed."""
        text = filler_text(PROBE_PROMPT_TOKENS, f"probe:{seed}:{name}", probe.words)
        token_ids = probe.tokenizer.encode(text)  # as the ingress: start token + text
        if first_http:
            http_s, server, instance = await over_http(http, text)
            await asyncio.sleep(PROBE_SETTLE_S)
            direct_s, direct_engine_s = await direct(instance, token_ids, f"probe-direct-{name}")
        else:
            direct_s, direct_engine_s = await direct(guess, token_ids, f"probe-direct-{name}")
            await asyncio.sleep(PROBE_SETTLE_S)
            http_s, server, instance = await over_http(http, text)
        timings = {
            "http": http_s,
            "direct": direct_s,
            "http_engine": server["engine"],
            "direct_engine": direct_engine_s,
            "outside_ingress": http_s - server["ingress"],
            "ingress_own": server["ingress"] - server["engine_call"],
            "ingress_engine_hop": server["engine_call"] - server["engine"],
            "direct_engine_hop": direct_s - direct_engine_s,
        }
        return timings, instance

    instance = "default-0"
    mismatched = 0
    started_at: list[float] = []
    with _collector_between_pairs() as collect_garbage:
        async with _client_session() as http:
            for i in range(PROBE_WARMUP):
                _, instance = await pair(http, f"warmup-{i}", i % 2 == 0, instance)
            bar = tqdm(
                total=probe.requests,
                desc="overhead probe",
                unit="pair",
                file=sys.stderr,
                disable=not progress,
            )
            t0 = time.monotonic()
            for i, offset in enumerate(arrivals(probe.requests, load_rps, seed + 1)):
                await asyncio.sleep(max(0.0, t0 + offset - time.monotonic()))
                guess = instance
                started_at.append(round(time.time(), 3))
                timings, instance = await pair(http, str(i), i % 2 == 0, guess)
                if i % 2 == 1 and instance != guess:
                    mismatched += 1
                for key, value in timings.items():
                    samples[key].append(value)
                samples["health"].append(await timed(partial(health, http)))
                place = partial(scheduler.place.remote, f"probe-{i}", PROBE_PROMPT_TOKENS)
                samples["place"].append(await timed(place))
                key = f"mars:session:probe-{i}"  # a miss, as for a new session
                samples["store"].append(await timed(partial(asyncio.to_thread, store.get, key)))
                collect_garbage()
                bar.update(1)
            bar.close()
    store.close()
    return {
        **overhead_report(samples, OVERHEAD_GOAL_MS),
        "pairs": probe.requests,
        "direct_on_other_instance": mismatched,
        "pair_started_at": started_at,
        "samples_ms": {k: [round(v * 1000, 3) for v in vs] for k, vs in samples.items()},
    }


@contextlib.contextmanager
def _collector_between_pairs() -> Iterator[Callable[[], None]]:
    """This process's garbage collector kept out of the probe's timings: the
    heap built so far is frozen (a full collection of a process that has
    imported Ray and transformers takes tens of milliseconds), automatic
    collection is off, and the probe collects the young generations between
    pairs with the function this yields. A pause of the measuring client is
    not latency the server added."""
    gc.freeze()
    gc.disable()
    try:
        yield partial(gc.collect, 1)
    finally:
        gc.enable()
        gc.unfreeze()


# --------------------------------------------------------------------- main
QUICK = {
    "traces": ["multi_api"],
    "loads": [2.0],
    "max_requests": 8,
    "max_seconds": 90.0,
    "overhead_requests": 40,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.http_bench", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="8 sessions per config, short probe")
    p.add_argument("--traces", nargs="+", default=["multi_api"], help="names or .json paths")
    p.add_argument("--loads", nargs="+", type=float, default=[2.0], help="sessions/s")
    p.add_argument(
        "--configs",
        nargs="+",
        default=list(DEFAULT_CONFIGS),
        help=f"<dispatch>:<engine policy>; dispatch one of {list(DISPATCH)}",
    )
    p.add_argument("--serve-config", default=str(DEFAULT_SERVE_CONFIG), help="base serving YAML")
    p.add_argument("--instances", type=int, default=2, help="engine instances")
    p.add_argument("--kv-blocks", type=int, default=32, help="KV blocks per instance (32 tokens)")
    p.add_argument("--host-swap-tokens", type=int, default=8192, help="host swap space, tokens")
    p.add_argument("--predictor", choices=("oracle", "online"), default="online")
    p.add_argument("--token-scale", type=float, default=0.25)
    p.add_argument("--api-scale", type=float, default=0.1)
    p.add_argument("--max-requests", type=int, default=24, help="sessions per configuration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=240.0, help="replay cap per config")
    p.add_argument("--overhead-requests", type=int, default=1000, help="probe pairs (0: no probe)")
    p.add_argument("--redis-url", help="an existing Redis (default: start one on a free port)")
    p.add_argument("--port", type=int, default=0, help="HTTP port (default: a free one)")
    p.add_argument("--out-dir", default=str(REPO_ROOT / "docs" / "results"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    for name in ("kv_blocks", "max_requests", "instances"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("host_swap_tokens", "overhead_requests", "port"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.max_seconds <= 0:
        p.error(f"--max-seconds must be > 0, got {args.max_seconds}")
    if any(load <= 0 for load in args.loads):
        p.error(f"--loads must all be > 0, got {args.loads}")
    try:
        args.configs = [parse_config(text) for text in args.configs]
    except ValueError as exc:
        p.error(f"--configs: {exc}")
    return args


@contextlib.contextmanager
def ray_serve(port: int, logical_cpus: int) -> Iterator[None]:
    """A local Ray instance with Serve's HTTP port `port`, shut down on exit.

    The body must shut Serve down itself (`serve.shutdown_async`), on the event
    loop its deployment handles were bound to (see `run_config`)."""
    import ray
    from ray import serve

    ray.init(num_cpus=logical_cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield
    finally:
        ray.shutdown()


async def run_config(
    config: ServingConfig,
    bench: BenchConfig,
    workload: Workload,
    load_rps: float,
    args: argparse.Namespace,
    index: int,
    probe: Probe | None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Deploy `config` as a fresh application, run the probe (if given) and
    the replay, delete the application; return its row and the probe's report.

    A coroutine on the benchmark's one event loop: Ray Serve's throughput mode
    binds the driver's deployment handles to the loop they were first used
    on, so every phase and every configuration must share it. The blocking
    Serve calls run in threads."""
    from ray import serve

    from cluster.app import build_from_config

    app_name = f"bench-{index}"
    url = f"http://127.0.0.1:{config.http.port}"
    model = config.model.name
    loadavg_before = os.getloadavg()[0]
    started = time.monotonic()
    overhead = None
    try:
        application = build_from_config(config)
        await asyncio.to_thread(serve.run, application, name=app_name, route_prefix="/")
        ready = await asyncio.to_thread(_wait_ready, url, READY_TIMEOUT_S)
        startup_s = time.monotonic() - started
        loads = await _engine_loads(app_name, config.instance_ids())
        engine_blocks = {k: v["total_blocks"] for k, v in loads.items()}
        if any(blocks != args.kv_blocks for blocks in engine_blocks.values()):
            print(f"   warning: KV blocks per engine {engine_blocks}, asked for {args.kv_blocks}")
        if probe is not None:
            overhead = await measure_overhead(
                url,
                model,
                app_name,
                probe,
                load_rps=load_rps,
                seed=args.seed,
                progress=not args.no_progress,
            )
            overhead.update(
                config=bench.label,
                load_rps=load_rps,
                machine=machine_description(),
                loadavg_after=os.getloadavg()[0],
            )
        loadavg_replay = os.getloadavg()[0]
        outcomes, replay_s = await replay(
            url,
            model,
            workload.plans,
            [r.request_id for r in workload.requests],
            arrivals(len(workload.requests), load_rps, args.seed),
            prefix=f"{workload.name}-{load_rps:g}-{index}",
            max_seconds=args.max_seconds,
            desc=f"{workload.name} {load_rps:g} rps {bench.label}",
            progress=not args.no_progress,
        )
    finally:
        with contextlib.suppress(Exception):  # a failed deploy may have left nothing
            await asyncio.to_thread(serve.delete, app_name)
    row = summarize(outcomes, trace=workload.name, load_rps=load_rps, config=bench)
    row.update(
        {
            "dispatch_policy": config.dispatch.policy,
            "dispatch_params": config.dispatch.params,
            "instances": len(ready),
            "engine_kv_blocks": engine_blocks,
            "replay_s": replay_s,
            "startup_s": startup_s,
            "token_scale": args.token_scale,
            "api_scale": args.api_scale,
            "kv_blocks": args.kv_blocks,
            "kv_tokens": args.kv_blocks * BLOCK_SIZE,
            "max_model_len": workload.max_model_len,
            "host_swap_tokens": args.host_swap_tokens,
            "predictor": args.predictor,
            "max_seconds": args.max_seconds,
            "seed": args.seed,
            "dropped_too_long": workload.dropped,
            "machine": machine_description(),
            # 1-min load averages: before the deploy, when the replay starts
            # (engine start-up has just used both CPUs) and after it. Well
            # above the engines' own share means something else ran too.
            "loadavg_before": loadavg_before,
            "loadavg_replay_start": loadavg_replay,
            "loadavg_after": os.getloadavg()[0],
        }
    )
    return row, overhead


def _describe(workload: Workload, args: argparse.Namespace) -> str:
    """The workload's one-line header, printed before its runs."""
    requests = workload.requests
    mean_context = sum(r.total_tokens for r in requests) / len(requests)
    return (
        f"== {workload.name}: {len(requests)} sessions ({workload.dropped} too long left out "
        f"before sampling), {sum(r.num_calls for r in requests)} API calls, mean context "
        f"{mean_context:.0f} tokens; {args.instances} instances x KV {args.kv_blocks} blocks "
        f"= {args.kv_blocks * BLOCK_SIZE} tokens each, max_model_len {workload.max_model_len}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Inherited by every Ray worker: keep vLLM's per-step logging quiet, and
    # run Ray Serve as mars-serve deploys it (`cluster.serve_env`).
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.update(serve_env())
    # Each configuration's application is deleted after its replay; with no
    # external load balancer in front, its ingress needs no 30 s drain.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    from transformers import AutoTokenizer

    from cluster.local_cluster import logical_cpus

    base = load_serving_config(args.serve_config)
    if base.model.recipe is not None:
        from workers.model_builder import build_model, load_recipe

        build_model(load_recipe(base.model.recipe), base.model.path)  # reused if built
    tokenizer = AutoTokenizer.from_pretrained(base.model.path)
    words = single_token_words(tokenizer)
    workloads = [build_trace_workload(trace, args, tokenizer, words) for trace in args.traces]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = "quick_cluster" if args.quick else "cluster"
    overhead_path = out_dir / f"{prefix}_overhead.json"
    port = args.port or free_port()
    overhead: dict[str, Any] | None = None
    index = 0

    with redis_server(args.redis_url) as redis_url:

        def config_for(bench: BenchConfig, workload: Workload) -> ServingConfig:
            return serving_config(
                base,
                bench,
                instances=args.instances,
                kv_blocks=args.kv_blocks,
                max_model_len=workload.max_model_len,
                host_swap_tokens=args.host_swap_tokens,
                predictor=args.predictor,
                redis_url=redis_url,
                port=port,
            )

        configs = {(b, w.name): config_for(b, w) for b in args.configs for w in workloads}
        probe = None
        if args.overhead_requests:
            probe = Probe(tokenizer, words, redis_url, args.overhead_requests)

        async def run_all() -> None:
            nonlocal overhead, index
            for workload in workloads:
                print(f"\n{_describe(workload, args)}", flush=True)
                rows = []
                json_path = out_dir / f"{prefix}_{workload.name}.json"
                for load in args.loads:
                    for bench in args.configs:
                        started = time.monotonic()
                        try:
                            row, report = await run_config(
                                configs[bench, workload.name],
                                bench,
                                workload,
                                load,
                                args,
                                index,
                                probe if overhead is None else None,
                            )
                        except Exception as exc:
                            print(f"config {bench.label} failed: {exc!r}", file=sys.stderr)
                            row, report = error_row(workload, load, bench, f"{exc!r}"), None
                        row["run_wall_s"] = time.monotonic() - started
                        index += 1
                        rows.append(row)
                        print(
                            f"   {bench.label:<18} load {load:g}: {row['completed']}/"
                            f"{row['requests']} done, {row['run_wall_s']:.0f} s wall",
                            flush=True,
                        )
                        _write_json(json_path, rows)
                        if report is not None:
                            overhead = report
                            _write_json(overhead_path, overhead)
                print(f"\n{workload.name} (completed / sessions; seconds):\n{format_table(rows)}")
                png = json_path.with_suffix(".png")
                title = (
                    f"{workload.name} over HTTP: {len(workload.requests)} sessions, "
                    f"{args.instances} instances x {args.kv_blocks} KV blocks"
                )
                plot(rows, png, title)
                print(f"wrote {json_path} and {png}", flush=True)

        async def run_all_then_shut_down() -> None:
            from ray import serve

            try:
                await run_all()
            finally:
                await serve.shutdown_async()  # stops Serve's HAProxy too

        with ray_serve(port, logical_cpus(next(iter(configs.values())))):
            asyncio.run(run_all_then_shut_down())
    if overhead is not None:
        print(
            f"\ningress + global scheduler overhead ({overhead['pairs']} one-token requests at "
            f"{overhead['load_rps']:g} req/s, {overhead['config']}):\n{format_overhead(overhead)}"
        )
        print(f"wrote {overhead_path}", flush=True)
    return 0


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
