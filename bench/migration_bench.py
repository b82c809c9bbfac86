"""What moving a paused session costs, and what it saves its next turn.

A real mars-serve application (Ray Serve, two engine instances, Redis) on
this machine. For each context length, each repeat:

- ``migrate``: a session's first turn leaves `context_tokens` of KV on its
  instance; `POST /v1/sessions/{id}/migrate` moves it to the other one
  (``move_ms``: the request's wall time, export, object-store transfer,
  import and commit), and its next turn (16 new tokens, one generated)
  runs there (``next_turn_ms``, with what it loaded and recomputed);
- ``stay``: the same, without the move: the next turn on the instance that
  kept the KV (preserved);
- ``recompute``: the next turn computed from scratch, what a move without
  the KV costs it (a cold session of the same context: the two instances
  are the same engine on the same machine).

Every session has its own random tokens, so no prefix is shared. Rows go to
``docs/results/paused_migration.json`` (``--out``) with the machine; the
table prints the median of the repeats and the spread.

    python -m bench.migration_bench
    python -m bench.migration_bench --contexts 256,1024 --repeats 5

Live migration of running requests (with its decode downtime) is not built
yet: these rows are paused sessions only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.engine_bench import REPO_ROOT, machine_description
from bench.http_bench import (
    DEFAULT_SERVE_CONFIG,
    BenchConfig,
    ray_serve,
    redis_server,
    serving_config,
)
from cluster.config import ServingConfig, load_serving_config
from cluster.local_cluster import logical_cpus
from cluster.ports import free_port
from cluster.serve_env import serve_env

DEFAULT_OUT = REPO_ROOT / "docs" / "results" / "paused_migration.json"
FIRST_TURN_TOKENS = 8
NEW_TOKENS = 16
METHODS = ("migrate", "stay", "recompute")
REQUEST_TIMEOUT_S = 300.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve-config", type=Path, default=DEFAULT_SERVE_CONFIG)
    p.add_argument(
        "--contexts",
        default="256,1024,2048,4000",
        help="context tokens a session holds when it moves, comma-separated "
        "(the tiny model's positions end at 4,096, the next turn's included)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    try:
        args.contexts = [int(c) for c in args.contexts.split(",")]
    except ValueError:
        p.error(f"--contexts must be integers separated by commas, got {args.contexts!r}")
    if any(c <= FIRST_TURN_TOKENS for c in args.contexts):
        p.error(f"--contexts must each be more than {FIRST_TURN_TOKENS} tokens")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def bench_config(base: ServingConfig, contexts: list[int], redis_url: str) -> ServingConfig:
    """Two instances of `base`'s model with room for a session of the
    longest context twice (kept and loaded), and host space for it."""
    longest = max(contexts) + NEW_TOKENS + 1
    max_model_len = -(-longest // 32) * 32
    return serving_config(
        base,
        BenchConfig("mars_aware", "mars"),
        instances=2,
        kv_blocks=2 * max_model_len // 32 + 8,
        max_model_len=max_model_len,
        host_swap_tokens=2 * max_model_len,
        predictor="online",
        redis_url=redis_url,
        port=free_port(),
    )


async def measure(url: str, model: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    import httpx

    rng = random.Random(args.seed)
    rows: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S) as http:
        instances = (await _get(http, "/ready"))["instances"]
        if len(instances) != 2:
            raise RuntimeError(f"expected two ready instances, got {instances}")
        for context in args.contexts:
            for repeat in range(args.repeats):
                for method in METHODS:
                    row = await _one_closed(http, model, method, context, rng, instances)
                    rows.append({"context_tokens": context, "repeat": repeat, **row})
                    print(_progress(rows[-1]), file=sys.stderr, flush=True)
    return rows


async def _one(
    http: Any, model: str, method: str, context: int, rng: random.Random, instances: list[str]
) -> dict[str, Any]:
    session = f"{method}-{context}-{rng.getrandbits(32):08x}"
    prompt = [rng.randrange(10, 400) for _ in range(context - FIRST_TURN_TOKENS + 1)]
    new = [rng.randrange(10, 400) for _ in range(NEW_TOKENS)]
    row: dict[str, Any] = {"method": method, "session_id": session, "move_ms": None, "kv_bytes": 0}
    if method == "recompute":
        # A context of the same length that no instance has seen: no first
        # turn, whose prompt would stay in some instance's prefix cache.
        unseen = [rng.randrange(10, 400) for _ in range(len(prompt) + FIRST_TURN_TOKENS)]
        started = time.perf_counter()
        second = await _complete(http, model, session, [*unseen, *new], 1)
        return {**row, **_next_turn(second, started)}
    first = await _complete(http, model, session, prompt, FIRST_TURN_TOKENS)
    source = first["mars"]["instance_id"]
    if method == "migrate":
        (destination,) = set(instances) - {source}
        started = time.perf_counter()
        moved = await _post(http, f"/v1/sessions/{session}/migrate", {"instance_id": destination})
        row["move_ms"] = 1000 * (time.perf_counter() - started)
        migration = moved["migration"]
        row.update(kv_bytes=migration["kv_bytes"], moved_kv_tokens=migration["kv_tokens"])
        row["move_server_ms"] = 1000 * migration["seconds"]
    started = time.perf_counter()
    second = await _complete(http, model, session, [*prompt, *first["token_ids"], *new], 1)
    return {**row, **_next_turn(second, started)}


async def _one_closed(
    http: Any, model: str, method: str, context: int, rng: random.Random, instances: list[str]
) -> dict[str, Any]:
    """`_one`, then the session ends: the KV of earlier sessions, parked,
    would otherwise fill the instances and be swapped, under the rows that follow."""
    row = await _one(http, model, method, context, rng, instances)
    response = await http.delete(f"/v1/sessions/{row.pop('session_id')}")
    response.raise_for_status()
    return row


def _next_turn(reply: dict[str, Any], started: float) -> dict[str, Any]:
    kv = reply["mars"]["kv"]
    return {
        "next_turn_ms": 1000 * (time.perf_counter() - started),
        "next_turn_instance": reply["mars"]["instance_id"],
        "loaded_tokens": kv["loaded_tokens"],
        "cached_tokens": kv["cached_tokens"],
        "recomputed_tokens": kv["recomputed_tokens"],
        "prompt_tokens": reply["usage"]["prompt_tokens"],
        # Prefilled by the turn: the new tokens, and whatever of the
        # context the instance neither held nor loaded.
        "computed_tokens": reply["usage"]["prompt_tokens"] - kv["cached_tokens"],
    }


async def _complete(
    http: Any, model: str, session: str | None, prompt: list[int], max_tokens: int
) -> dict[str, Any]:
    """One non-streamed completion (a session turn when `session`); its
    generated token ids and `mars` object."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    headers = {"X-Session-Id": session} if session else {}
    reply = await _post(http, "/v1/completions", body, headers)
    reply["token_ids"] = reply["choices"][0]["token_ids"]
    return reply


async def _post(http: Any, path: str, body: dict, headers: dict | None = None) -> dict[str, Any]:
    response = await http.post(path, json=body, headers=headers or {})
    if response.status_code != 200:
        raise RuntimeError(f"POST {path}: {response.status_code} {response.text}")
    return response.json()


async def _get(http: Any, path: str) -> dict[str, Any]:
    response = await http.get(path)
    response.raise_for_status()
    return response.json()


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per context and method: medians of the repeats, and the spread."""
    out = []
    for context in sorted({r["context_tokens"] for r in rows}):
        for method in METHODS:
            group = [r for r in rows if r["context_tokens"] == context and r["method"] == method]
            if not group:
                continue
            turn = [r["next_turn_ms"] for r in group]
            moves = [r["move_ms"] for r in group if r["move_ms"] is not None]
            out.append(
                {
                    "context_tokens": context,
                    "method": method,
                    "repeats": len(group),
                    "next_turn_ms_median": statistics.median(turn),
                    "next_turn_ms_range": [min(turn), max(turn)],
                    "move_ms_median": statistics.median(moves) if moves else None,
                    "move_ms_range": [min(moves), max(moves)] if moves else None,
                    "kv_bytes": group[0]["kv_bytes"],
                    "loaded_tokens": [r["loaded_tokens"] for r in group],
                    "computed_tokens": [r["computed_tokens"] for r in group],
                }
            )
    return out


def format_table(summary: list[dict[str, Any]]) -> str:
    lines = [
        f"{'context':>8} {'method':>10} {'move ms':>16} {'next turn ms':>20} "
        f"{'KV bytes':>10} {'loaded':>8} {'prefilled':>10}",
    ]
    for s in summary:
        move = (
            "-" if s["move_ms_median"] is None else _spread(s["move_ms_median"], s["move_ms_range"])
        )
        lines.append(
            f"{s['context_tokens']:>8} {s['method']:>10} {move:>16} "
            f"{_spread(s['next_turn_ms_median'], s['next_turn_ms_range']):>20} "
            f"{s['kv_bytes']:>10} {max(s['loaded_tokens']):>8} {max(s['computed_tokens']):>10}"
        )
    return "\n".join(lines)


def _spread(median: float, bounds: list[float]) -> str:
    return f"{median:.1f} ({bounds[0]:.1f}-{bounds[1]:.1f})"


def _progress(row: dict[str, Any]) -> str:
    move = "" if row["move_ms"] is None else f" move {row['move_ms']:.1f} ms"
    return (
        f"[migration] {row['context_tokens']} tokens #{row['repeat']} {row['method']}:{move} "
        f"next turn {row['next_turn_ms']:.1f} ms, loaded {row['loaded_tokens']}, "
        f"prefilled {row['computed_tokens']}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.update(serve_env())
    base = load_serving_config(args.serve_config)
    with redis_server(None) as redis_url:
        config = bench_config(base, args.contexts, redis_url)
        with ray_serve(config.http.port, logical_cpus(config)):
            rows = asyncio.run(_run(config, args))
    summary = summarize(rows)
    report = {
        "rows": rows,
        "summary": summary,
        "model": config.model.name,
        "machine": machine_description(config.model.name),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(format_table(summary))
    print(f"wrote {args.out}")
    return 0


async def _run(config: ServingConfig, args: argparse.Namespace) -> list[dict[str, Any]]:
    from ray import serve

    from bench.http_bench import _wait_ready
    from cluster.app import build_from_config

    url = f"http://127.0.0.1:{config.http.port}"
    try:
        await asyncio.to_thread(
            serve.run, build_from_config(config), name="migration", route_prefix="/"
        )
        await asyncio.to_thread(_wait_ready, url, 300.0)
        return await measure(url, config.model.name, args)
    finally:
        await serve.shutdown_async()


if __name__ == "__main__":
    sys.exit(main())
