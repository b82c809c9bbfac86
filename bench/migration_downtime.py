"""Live migration of a running request, measured on two real engines: the
decode downtime of a multi-stage move (Llumnix's), of a blocking copy and
of a recompute, at several context lengths.

A spike for issue 13's live migration, before it is wired into the serving
path: two MARS engines, each in its own Ray actor (vLLM holds one KV
connector per process), the driver moving one greedy request from the
first to the second while it decodes:

- ``migrate``: up to `--stages` copies of the request's finished blocks
  while it keeps decoding on the source, each copying the blocks written
  since the last, which the destination writes into device blocks as they
  come; then the request stops, its last blocks are copied, and the
  destination continues it, finding the early stages in its prefix cache
  and loading the last one;
- ``blocking_copy``: the request stops at once, all its KV is copied, and
  the destination continues it;
- ``recompute``: the request stops and the destination continues it from
  its tokens alone (a prefill of the whole context).

Downtime: from the source's last token to the destination's first. The
continuation must produce the tokens the uninterrupted request produced
(temperature 0); a row that does not is reported as such. Rows go to
``docs/results/migration_downtime.json`` (``--out``), a list with the keys
the issue asks for (``context_tokens``, ``method``, ``downtime_ms``,
``stages``, ``bytes``) and the rest of what was measured; the medians and
the issue's two goals go to ``..._summary.json`` beside it.

    python -m bench.migration_downtime
    python -m bench.migration_downtime --model models/smollm2 --contexts 256,1024,2048,4096

The serving path's live moves (`cluster.live_migration`) make the same
engine calls; this measures the engines alone, without Ray Serve's hops,
the session record or the client's stream.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.engine_bench import REPO_ROOT, machine_description

DEFAULT_OUT = REPO_ROOT / "docs" / "results" / "migration_downtime.json"
DEFAULT_MODEL = REPO_ROOT / "models" / "tiny"
METHODS = ("migrate", "blocking_copy", "recompute")
BLOCK_SIZE = 32
GENERATED_BEFORE_MOVE = 8
"""Tokens the request decodes on the source before the move starts."""
TOTAL_TOKENS = 256
"""Tokens the request generates in all, on the source and then the
destination (compared with an uninterrupted run of it): enough that the
tiny model, at a token every 1-2 ms, is still decoding when the move's
calls reach it."""
STOP_BELOW_BLOCKS = 2
"""The multi-stage move stops the request once fewer new finished blocks
than this are left to copy (Llumnix: 16 blocks of 16 tokens on GPUs; a
CPU engine of this size writes about one block per 32 steps)."""
CALL_TIMEOUT_S = 600.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="local model directory")
    p.add_argument(
        "--contexts",
        default="256,1024,2048,3840",
        help="tokens of context when the move starts (the tiny model's positions end at "
        "4,096, the request's 256 tokens included)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stages", type=int, default=3, help="most copies before the stop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    try:
        args.contexts = [int(c) for c in args.contexts.split(",")]
    except ValueError:
        p.error(f"--contexts must be integers separated by commas, got {args.contexts!r}")
    if any(c <= GENERATED_BEFORE_MOVE + BLOCK_SIZE for c in args.contexts):
        p.error(f"--contexts must each be more than {GENERATED_BEFORE_MOVE + BLOCK_SIZE} tokens")
    if args.repeats < 1 or args.stages < 1:
        p.error("--repeats and --stages must be >= 1")
    return args


def engine_config(model: Path, context: int) -> dict[str, Any]:
    """One engine with room for the request (twice, for the reference run's
    prefix in the cache) and host space for its imported KV."""
    longest = context - GENERATED_BEFORE_MOVE + TOTAL_TOKENS  # the prompt and every token
    max_model_len = -(-longest // BLOCK_SIZE) * BLOCK_SIZE
    return {
        "model": str(model),
        "block_size": BLOCK_SIZE,
        "num_kv_blocks": 2 * max_model_len // BLOCK_SIZE + 8,
        "max_model_len": max_model_len,
        "max_num_batched_tokens": 2048,
        "host_swap_tokens": 2 * max_model_len,
        "scheduler": {"policy": "mars"},
        "profile_costs": False,  # one request at a time: no policy choice to price
    }


class EngineHost:
    """A MARS engine in a Ray actor of its own, recording when each token of
    the turns it runs arrived (`time.monotonic`, one clock for the machine)."""

    def __init__(self, config: dict[str, Any]) -> None:
        from workers.async_engine import AsyncMarsEngine
        from workers.engine import EngineConfig

        self._engine = AsyncMarsEngine(EngineConfig.model_validate(config))
        self._engine.wait_started(timeout_s=CALL_TIMEOUT_S)
        self._tokens: dict[str, list[tuple[float, int]]] = {}
        self._changed = asyncio.Condition()
        self._ended: set[str] = set()

    async def call(self, fn):
        return await self._engine.call(fn)

    async def start(self, turn) -> None:
        from workers.async_engine import TurnFeed

        feed = TurnFeed()
        self._tokens[turn.request_id] = []
        await self._engine.start(turn, feed)
        asyncio.get_running_loop().create_task(self._collect(turn.request_id, feed))

    async def wait(self, request_id: str, tokens: int | None) -> list[tuple[float, int]]:
        """The turn's (arrival, token) pairs once it has `tokens` of them
        (None: once it ended)."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: (
                    request_id in self._ended
                    or (tokens is not None and len(self._tokens[request_id]) >= tokens)
                )
            )
        return list(self._tokens[request_id])

    async def _collect(self, request_id: str, feed) -> None:
        from workers.turns import TurnEnd, TurnOutput

        try:
            while request_id not in self._ended:
                batch = await feed.next_batch()
                now = time.monotonic()
                async with self._changed:
                    for event in batch:
                        if isinstance(event, TurnOutput):
                            for completion in event.output.outputs:
                                if completion.index == 0:
                                    self._tokens[request_id] += [
                                        (now, t) for t in completion.token_ids
                                    ]
                        elif isinstance(event, TurnEnd):
                            self._ended.add(request_id)
                    self._changed.notify_all()
        finally:
            async with self._changed:
                self._ended.add(request_id)
                self._changed.notify_all()

    async def tokens(self, request_id: str) -> list[tuple[float, int]]:
        return list(self._tokens[request_id])


def _turn(request_id: str, prompt: list[int], max_tokens: int, session_id: str | None = None):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from workers.hints import SegmentHints
    from workers.turns import SessionAction, TurnRequest

    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0,
        ignore_eos=True,
        output_kind=RequestOutputKind.DELTA,
    )
    action = SessionAction.END if session_id else SessionAction.NONE
    return TurnRequest(request_id, prompt, sampling, session_id, action, SegmentHints())


class FinishedBeforeMove(Exception):
    """The request finished on the source while its stages were copied
    (Llumnix's ABORTED_SRC): nothing to measure; the move is tried again."""


ATTEMPTS = 3
"""Tries per move: on a 2-core machine the source can finish the request
while the first stage is on its way (seen once on the tiny model)."""


async def move_once(
    source: Any, destination: Any, method: str, prompt: list[int], tag: str, stages_max: int
) -> dict[str, Any]:
    """Start a greedy request on `source`, move it to `destination` by
    `method` after `GENERATED_BEFORE_MOVE` tokens, let it finish there."""
    from workers.kv_transport import ParkedState

    request_id = f"{tag}-src"
    await source.start.remote(_turn(request_id, prompt, TOTAL_TOKENS))
    await source.wait.remote(request_id, GENERATED_BEFORE_MOVE)
    stages, first_block = [], 0
    if method == "migrate":
        # Each stage goes on to the destination while the request decodes.
        while len(stages) < stages_max:
            try:
                stage = await source.call.remote(
                    lambda e, b=first_block: e.running_kv(request_id, b, stop=False)
                )
            except Exception as exc:
                if "is not running" not in str(exc):
                    raise
                await destination.call.remote(lambda e: e.drop_incoming(tag))
                raise FinishedBeforeMove(tag) from exc
            await destination.call.remote(lambda e, s=stage: e.stage_in(tag, s))
            stages.append(stage)
            first_block = stage.first_block + stage.num_blocks
            if stage.num_blocks < STOP_BELOW_BLOCKS:
                break
    copy = method != "recompute"
    stopping_s = time.monotonic()
    last = await source.call.remote(
        lambda e, b=first_block: e.running_kv(request_id, b, stop=True, copy=copy)
    )
    stopped_s = time.monotonic()
    stages.append(last)
    generated = list(last.token_ids[len(prompt) :])
    remaining = TOTAL_TOKENS - len(generated)
    if remaining < 1:
        raise FinishedBeforeMove(tag)
    continuation = f"{tag}-dst"
    written = 0
    if copy:
        state = ParkedState(None, None, 0.0, remaining, 0, 1)
        committed = await destination.call.remote(lambda e: e.commit_incoming(tag, last, state))
        written = committed["written_tokens"]
    committed_s = time.monotonic()
    session = tag if copy else None
    await destination.start.remote(_turn(continuation, list(last.token_ids), remaining, session))
    started_s = time.monotonic()
    moved = await destination.wait.remote(continuation, None)
    before = await source.tokens.remote(request_id)
    return {
        "downtime_ms": 1000 * (moved[0][0] - before[-1][0]),
        # Where the move's critical path went (driver's clock, the same machine's).
        "phases_ms": {
            "stop_and_read_last_stage": 1000 * (stopped_s - stopping_s),
            "transfer_and_commit": 1000 * (committed_s - stopped_s),
            "start_continuation": 1000 * (started_s - committed_s),
            "to_first_token": 1000 * (moved[0][0] - started_s),
        },
        "stages": sum(1 for stage in stages if stage.shards is not None),
        "bytes": sum(stage.nbytes for stage in stages),
        "last_stage_bytes": last.nbytes,
        "written_ahead_tokens": written,
        "context_at_stop": last.computed_tokens,
        "tokens": generated + [t for _, t in moved],
        "source_gap_ms": _median_gap_ms(before),
        "destination_gap_ms": _median_gap_ms(moved),
        "generated_before_stop": len(generated),
    }


def _median_gap_ms(tokens: list[tuple[float, int]]) -> float | None:
    times = sorted({t for t, _ in tokens})
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return 1000 * statistics.median(gaps) if gaps else None


async def measure_context(
    model: Path, context: int, args: argparse.Namespace, rng: random.Random
) -> list[dict[str, Any]]:
    import ray

    host = ray.remote(num_cpus=0)(EngineHost)
    config = engine_config(model, context)
    source, destination = host.remote(config), host.remote(config)
    rows = []
    try:
        for repeat in range(args.repeats):
            for method in METHODS:
                for attempt in range(1, ATTEMPTS + 1):
                    # A prompt of its own for each move: the destination's
                    # prefix cache keeps what an earlier continuation computed,
                    # loaded or was written.
                    prompt = [
                        rng.randrange(10, 400) for _ in range(context - GENERATED_BEFORE_MOVE)
                    ]
                    tag = f"{method}-{context}-{repeat}-{attempt}"
                    reference = f"ref-{tag}"
                    await source.start.remote(_turn(reference, prompt, TOTAL_TOKENS))
                    expected = [t for _, t in await source.wait.remote(reference, None)]
                    try:
                        row = await move_once(source, destination, method, prompt, tag, args.stages)
                        break
                    except FinishedBeforeMove:
                        print(f"[downtime] {tag}: finished before the move", file=sys.stderr)
                        if attempt == ATTEMPTS:
                            raise
                tokens = row.pop("tokens")
                row.update(
                    context_tokens=context,
                    method=method,
                    repeat=repeat,
                    attempts=attempt,
                    identical=tokens == expected,
                )
                rows.append(row)
                print(_progress(row), file=sys.stderr, flush=True)
    finally:
        for actor in (source, destination):
            ray.kill(actor)
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median downtime per context and method, and the issue's two goals."""
    table: dict[str, dict[str, float]] = {}
    for context in sorted({r["context_tokens"] for r in rows}):
        for method in METHODS:
            times = [
                r["downtime_ms"]
                for r in rows
                if r["context_tokens"] == context and r["method"] == method
            ]
            if times:
                table.setdefault(str(context), {})[method] = statistics.median(times)
    contexts = sorted(int(c) for c in table)
    goals: dict[str, Any] = {}
    if len(contexts) > 1:
        small, large = table[str(contexts[0])], table[str(contexts[-1])]
        goals["migrate_large_over_small"] = large["migrate"] / small["migrate"]
        goals["migrate_over_recompute_at_largest"] = large["migrate"] / large["recompute"]
        goals["met"] = (
            goals["migrate_large_over_small"] <= 1.5
            and goals["migrate_over_recompute_at_largest"] <= 1 / 3
        )
    return {
        "median_downtime_ms": table,
        "goals": goals,
        "all_identical": all(r["identical"] for r in rows),
    }


def _progress(row: dict[str, Any]) -> str:
    same = "same tokens" if row["identical"] else "DIFFERENT TOKENS"
    return (
        f"[downtime] {row['context_tokens']} tokens #{row['repeat']} {row['method']}: "
        f"{row['downtime_ms']:.1f} ms, {row['stages']} stages, {row['bytes']} bytes, {same}"
    )


def main(argv: list[str] | None = None) -> int:
    import ray

    args = parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    rng = random.Random(args.seed)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = []
        for context in args.contexts:
            rows += asyncio.run(measure_context(args.model.resolve(), context, args, rng))
    finally:
        ray.shutdown()
    summary = summarize(rows)
    machine = machine_description(args.model.name)
    for row in rows:
        row["machine"] = machine
    report = {
        "summary": summary,
        "model": args.model.name,
        "machine": machine,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    summary_out = args.out.with_name(args.out.stem + "_summary.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    summary_out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out} and {summary_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
