"""Per-turn cost at low load, side by side with stock vLLM: the time to first
token of one request at a time, the gap between its streamed tokens, and
the decode rate of a batch of concurrent requests.

Each system runs alone on the machine, on the same model and engine shape
(`bench.stock_vllm.EngineShape`): stock vLLM's OpenAI server (started here),
then mars-serve with one engine instance (a Ray Serve application). Both get
the same streamed `/v1/completions` requests with token-id prompts and
`ignore_eos`, so that every request generates exactly `--max-tokens`.

    python -m bench.stock_latency
    python -m bench.stock_latency --requests 20 --batches 8

Writes `docs/results/stock_latency.json`: per system, the TTFT and
inter-token gaps of `--requests` sequential requests per prompt length, and
per batch size the decode tokens per second (tokens after each request's
first, over the time from the last first token to the last end) and the
batch's tokens per second (every token, over the time from sending the
batch to its last token: prefill included, and blind to how a server
groups tokens into chunks).
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
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.engine_bench import REPO_ROOT, _percentile, machine_description
from bench.http_bench import DEFAULT_SERVE_CONFIG, parse_sse_line, ray_serve, redis_server
from bench.stock_vllm import (
    STOCK,
    EngineShape,
    mars_config,
    require_at_least_one,
    stock_vllm_servers,
)
from cluster.config import load_serving_config
from cluster.local_cluster import logical_cpus
from cluster.ports import free_port
from cluster.serve_env import serve_env

MARS = "mars-serve:mars"


async def stream_one(http: Any, url: str, model: str, prompt: list[int], max_tokens: int):
    """(seconds to the first token, the gaps between token chunks, the
    chunk times) of one streamed completion."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    started = time.monotonic()
    times: list[float] = []
    async with http.post(f"{url}/v1/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
        async for line in response.content:
            payload = parse_sse_line(line)
            if payload and payload.get("choices") and payload["choices"][0].get("token_ids"):
                times.append(time.monotonic())
    if len(times) < 2:
        raise RuntimeError(f"only {len(times)} token chunks streamed")
    return times[0] - started, [b - a for a, b in itertools.pairwise(times)], times


def _prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 400) for _ in range(length)]


async def measure(url: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    """The system's figures: sequential TTFT and gaps per prompt length, then
    the decode rate per batch size."""
    import aiohttp

    result: dict[str, Any] = {"sequential": {}, "batches": {}}
    async with aiohttp.ClientSession() as http:
        for warm in range(3):
            await stream_one(http, url, model, _prompt(16, 10_000 + warm), 4)
        for length in args.prompt_tokens:
            ttfts, gaps = [], []
            for i in range(args.requests):
                ttft, gap, _ = await stream_one(
                    http, url, model, _prompt(length, length * 1000 + i), args.max_tokens
                )
                ttfts.append(ttft)
                gaps.extend(gap)
            result["sequential"][str(length)] = {
                "ttft_median_ms": 1000 * statistics.median(ttfts),
                "ttft_mean_ms": 1000 * statistics.mean(ttfts),
                "ttft_p90_ms": 1000 * _percentile(ttfts, 90),
                "itl_median_ms": 1000 * statistics.median(gaps),
                "itl_mean_ms": 1000 * statistics.mean(gaps),
                "itl_p99_ms": 1000 * _percentile(gaps, 99),
            }
        for batch in args.batches:
            rates, wall_rates = [], []
            for rep in range(args.batch_repeats):
                sent = time.monotonic()
                runs = await asyncio.gather(
                    *(
                        stream_one(
                            http, url, model, _prompt(64, 90_000 + 100 * rep + k), args.max_tokens
                        )
                        for k in range(batch)
                    )
                )
                start = max(times[0] for _, _, times in runs)
                end = max(times[-1] for _, _, times in runs)
                after = sum(sum(1 for t in times if t > start) for _, _, times in runs)
                rates.append(after / (end - start))
                wall_rates.append(batch * args.max_tokens / (end - sent))
            result["batches"][str(batch)] = {
                "decode_tokens_per_s": statistics.median(rates),
                "repeats": rates,
                "batch_tokens_per_s": statistics.median(wall_rates),
                "batch_repeats": wall_rates,
            }
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.stock_latency", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--serve-config", default=str(DEFAULT_SERVE_CONFIG))
    p.add_argument("--requests", type=int, default=30, help="sequential requests per length")
    p.add_argument("--prompt-tokens", nargs="+", type=int, default=[100, 1000])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    p.add_argument("--batch-repeats", type=int, default=3)
    p.add_argument("--kv-blocks", type=int, default=256)
    p.add_argument("--out", default=str(REPO_ROOT / "docs" / "results" / "stock_latency.json"))
    args = p.parse_args(argv)
    require_at_least_one(p, args, ("requests", "max_tokens", "batch_repeats", "kv_blocks"))
    if args.max_tokens < 2:
        p.error("--max-tokens must be >= 2 (a gap needs two tokens)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.update(serve_env())
    base = load_serving_config(args.serve_config)
    shape = EngineShape(str(base.model.path), base.model.name, 32, args.kv_blocks, 2048, 2048, 128)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="stock-latency-") as tmp:
        with stock_vllm_servers(shape, 1, Path(tmp)) as (url,):
            results[STOCK] = asyncio.run(measure(url, base.model.name, args))
        with redis_server(None) as redis_url:
            bench_args = argparse.Namespace(instances=1, host_swap_tokens=8192, predictor="online")
            config = mars_config(base, MARS, shape, redis_url, free_port(), bench_args)
            with ray_serve(config.http.port, logical_cpus(config)):
                results[MARS] = asyncio.run(_measure_mars(config, args))
    report = {
        "systems": results,
        "comparison": compare(results),
        "machine": machine_description(base.model.name),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(format_report(report))
    print(f"wrote {args.out}")
    return 0


async def _measure_mars(config, args: argparse.Namespace) -> dict[str, Any]:
    from ray import serve

    from bench.http_bench import _wait_ready
    from cluster.app import build_from_config

    url = f"http://127.0.0.1:{config.http.port}"
    try:
        await asyncio.to_thread(
            serve.run, build_from_config(config), name="latency", route_prefix="/"
        )
        await asyncio.to_thread(_wait_ready, url, 300.0)
        return await measure(url, config.model.name, args)
    finally:
        await serve.shutdown_async()


def compare(results: dict[str, Any]) -> dict[str, Any]:
    """mars-serve against stock vLLM: TTFT difference (ms, median) per
    prompt length, gap ratio, and decode-rate ratio per batch."""
    stock, mars = results[STOCK], results[MARS]
    out: dict[str, Any] = {
        "ttft_median_diff_ms": {},
        "itl_median_ratio": {},
        "decode_ratio": {},
        "batch_ratio": {},
    }
    for length, theirs in stock["sequential"].items():
        ours = mars["sequential"][length]
        out["ttft_median_diff_ms"][length] = ours["ttft_median_ms"] - theirs["ttft_median_ms"]
        out["itl_median_ratio"][length] = ours["itl_median_ms"] / theirs["itl_median_ms"]
    for batch, theirs in stock["batches"].items():
        ours = mars["batches"][batch]
        out["decode_ratio"][batch] = ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"]
        out["batch_ratio"][batch] = ours["batch_tokens_per_s"] / theirs["batch_tokens_per_s"]
    return out


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'':<26} {'ttft med':>9} {'ttft p90':>9} {'itl med':>8} {'itl p99':>8} (ms)"]
    for system, result in report["systems"].items():
        for length, s in result["sequential"].items():
            lines.append(
                f"{system + ' ' + length + ' tok':<26} {s['ttft_median_ms']:>9.1f} "
                f"{s['ttft_p90_ms']:>9.1f} {s['itl_median_ms']:>8.2f} {s['itl_p99_ms']:>8.2f}"
            )
        for batch, b in result["batches"].items():
            lines.append(
                f"{system + ' batch ' + batch:<26} {b['decode_tokens_per_s']:>9.0f} tokens/s "
                f"after the last first token, {b['batch_tokens_per_s']:>6.0f} over the batch"
            )
    c = report["comparison"]
    lines.append(f"mars-serve - stock, TTFT median (ms): {_fmt(c['ttft_median_diff_ms'])}")
    lines.append(f"mars-serve / stock, gap median: {_fmt(c['itl_median_ratio'])}")
    lines.append(f"mars-serve / stock, decode tokens/s: {_fmt(c['decode_ratio'])}")
    lines.append(f"mars-serve / stock, tokens/s over the batch: {_fmt(c['batch_ratio'])}")
    return "\n".join(lines)


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{key}: {value:.2f}" for key, value in values.items())


if __name__ == "__main__":
    sys.exit(main())
