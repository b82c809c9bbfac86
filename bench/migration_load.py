"""Migration under load: the same sessions, placed round robin on two
engine instances, with the global scheduler's migration policy off and on;
and an instance drained while the sessions run.

Round robin places each new session on the next instance whatever it holds,
so with sessions of very different lengths (an INFERCEPT trace, or the
generated `agent_mix`) one instance can run out of KV blocks while the
other has room. By default (`--order skewed`) heavy and light sessions
alternate, so that every heavy one lands on the same instance. With
`migration: {policy: relocate_paused}` the global scheduler moves sessions
paused on a tool call off the instance under pressure
(`policies.migration.RelocatePaused`); their next turns run where the room
is. With `--policy balance_running` it moves running turns live instead
(`policies.migration.BalanceRunning`, Llumnix's load balancing).
Everything else is `bench.http_bench`'s: the workload, the client
(streamed text completions with tool hints, the API call slept by the
client), the rows' latency figures.

    python -m bench.migration_load --serve-config configs/serve/local-cpu.yaml \
        --seeds 0 1 2 --max-requests 24 --load 1 --kv-blocks 24 \
        --host-swap-tokens 2048 --modes off on drain

Writes `docs/results/migration_load.json`: one row per seed and `migration`
("on" or "off") with `e2e_p99_s`, the other latency figures, the sessions
completed and failed and, when on, the moves by outcome; with `--modes
... drain`, one more row per seed (`migration` "drain", policy off) in
which `default-0` is drained once a third of the sessions have arrived,
with the drain's rounds, moves (paused and live) and seconds. A table goes to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import replace
from itertools import zip_longest
from pathlib import Path
from typing import Any

from bench.engine_bench import BLOCK_SIZE, REPO_ROOT, machine_description
from bench.http_bench import (
    DEFAULT_SERVE_CONFIG,
    READY_TIMEOUT_S,
    BenchConfig,
    Workload,
    _wait_ready,
    build_trace_workload,
    ray_serve,
    redis_server,
    replay,
    serving_config,
    single_token_words,
    summarize,
)
from bench.workload import arrivals
from cluster.config import ServingConfig, load_serving_config
from cluster.ports import free_port
from cluster.serve_env import serve_env
from policies import migration_policy_names

PLACEMENT = BenchConfig("round_robin", "mars")
"""Round robin places first turns; later turns follow their KV."""
DRAINED = "default-0"
DRAIN_ROUND_TIMEOUT_S = 120.0
DRAIN_DEADLINE_S = 300.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.migration_load", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--trace", default="multi_api", help="a trace name or .json path")
    p.add_argument("--load", type=float, default=2.0, help="sessions/s")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--max-requests", type=int, default=48, help="sessions per run")
    p.add_argument("--kv-blocks", type=int, default=24, help="KV blocks per instance (32 tokens)")
    p.add_argument("--host-swap-tokens", type=int, default=8192)
    p.add_argument("--token-scale", type=float, default=0.25)
    p.add_argument("--api-scale", type=float, default=0.1)
    p.add_argument("--max-seconds", type=float, default=300.0, help="replay cap per run")
    p.add_argument(
        "--policy-params",
        default="{}",
        help="the policy's parameters as JSON (default: its defaults)",
    )
    p.add_argument(
        "--policy",
        choices=migration_policy_names(),
        default="relocate_paused",
        help="the migration policy of the 'on' runs",
    )
    p.add_argument("--interval-s", type=float, default=0.5, help="seconds between rounds")
    p.add_argument(
        "--modes",
        nargs="+",
        choices=("off", "on", "drain"),
        default=["off", "on"],
        help="runs per seed: the policy off, on, and default-0 drained under load (policy off)",
    )
    p.add_argument(
        "--order",
        choices=("skewed", "trace"),
        default="skewed",
        help="skewed: heavy and light sessions alternate, so round robin puts the heavy "
        "ones on one instance (default); trace: the trace's own order",
    )
    p.add_argument("--serve-config", default=str(DEFAULT_SERVE_CONFIG))
    p.add_argument("--out", default=str(REPO_ROOT / "docs" / "results" / "migration_load.json"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("max_requests", "kv_blocks"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("load", "max_seconds", "interval_s"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    try:
        args.policy_params = json.loads(args.policy_params)
    except json.JSONDecodeError as exc:
        p.error(f"--policy-params: not JSON: {exc}")
    if not isinstance(args.policy_params, dict):
        p.error(f"--policy-params must be a JSON object, got {args.policy_params!r}")
    # the fields `bench.http_bench`'s workload builder reads
    args.seed, args.predictor, args.instances = args.seeds[0], "online", 2
    return args


def skewed(workload: Workload) -> Workload:
    """`workload` with its sessions reordered heavy, light, heavy, light...
    (by total context tokens; the arrival offsets stay as they were): round
    robin then places every heavy session on one instance. The skewed
    placement the migration policy has to repair, made on purpose."""
    order = sorted(
        range(len(workload.requests)), key=lambda i: (-workload.requests[i].total_tokens, i)
    )
    half = (len(order) + 1) // 2
    heavy, light = order[:half], order[half:]
    interleaved = [i for pair in zip_longest(heavy, light) for i in pair if i is not None]
    return replace(
        workload,
        requests=[workload.requests[i] for i in interleaved],
        plans=[workload.plans[i] for i in interleaved],
    )


def with_migration(
    config: ServingConfig, mode: str, policy: str, params: dict[str, Any], interval_s: float
) -> ServingConfig:
    """`config` with the migration `policy` on (`mode` "on") or off."""
    data = config.model_dump()
    if mode == "on":
        data["migration"] = {
            "policy": policy,
            "params": params,
            "interval_s": interval_s,
        }
    else:
        data["migration"] = {"policy": None, "params": {}, "interval_s": interval_s}
    return ServingConfig.model_validate(data)


def _post(url: str, timeout_s: float) -> dict[str, Any]:
    request = urllib.request.Request(url, data=b"{}", method="POST")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


async def drain_when(url: str, start_at: float) -> dict[str, Any]:
    """At monotonic `start_at`, drain `DRAINED` in rounds until a round
    reports it drained (or `DRAIN_DEADLINE_S` passes); what it took."""
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    began = time.monotonic()
    rounds, moved, live, failed = 0, 0, 0, 0
    drained, error = False, None
    while not drained and time.monotonic() - began < DRAIN_DEADLINE_S:
        try:
            body = await asyncio.to_thread(
                _post, f"{url}/v1/instances/{DRAINED}/drain", DRAIN_ROUND_TIMEOUT_S
            )
        except urllib.error.HTTPError as exc:
            error = f"round {rounds + 1}: HTTP {exc.code}: {exc.read().decode()[:300]}"
            break
        rounds += 1
        outcomes = [m["outcome"] for m in body["migrations"]]
        moved += outcomes.count("committed")
        live += sum(m["live"] and m["outcome"] == "committed" for m in body["migrations"])
        failed += len(outcomes) - outcomes.count("committed")
        drained = body["drained"]
        if not drained:
            await asyncio.sleep(0.2)  # between rounds: the running turns need time to pause
    return {
        "drained": drained,
        "drain_rounds": rounds,
        "drain_moved": moved,
        "drain_moved_live": live,
        "drain_failed_moves": failed,
        "drain_s": time.monotonic() - began,
        "drain_error": error,
    }


async def run_once(
    config: ServingConfig, workload: Any, mode: str, seed: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Deploy `config`, replay the workload (draining `DRAINED` in the
    "drain" mode), delete the application; the run's row."""
    from ray import serve

    from cluster.app import build_from_config

    app_name = f"migration-{mode}-{seed}"
    url = f"http://127.0.0.1:{config.http.port}"
    offsets = arrivals(len(workload.requests), args.load, seed)
    extra: dict[str, Any] = {}
    try:
        application = build_from_config(config)
        await asyncio.to_thread(serve.run, application, name=app_name, route_prefix="/")
        await asyncio.to_thread(_wait_ready, url, READY_TIMEOUT_S)
        drain = None
        if mode == "drain":
            third = offsets[len(offsets) // 3]
            drain = asyncio.create_task(drain_when(url, time.monotonic() + third))
        outcomes, replay_s = await replay(
            url,
            config.model.name,
            workload.plans,
            [r.request_id for r in workload.requests],
            offsets,
            prefix=f"{app_name}",
            max_seconds=args.max_seconds,
            desc=f"{workload.name} {mode} seed {seed}",
            progress=not args.no_progress,
        )
        if drain is not None:
            extra.update(await drain)
        if mode == "on":
            scheduler = serve.get_deployment_handle("global-scheduler", app_name=app_name)
            extra["relocations"] = await scheduler.relocations.remote()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(serve.delete, app_name)
    row = summarize(outcomes, trace=workload.name, load_rps=args.load, config=PLACEMENT)
    row.update(
        {
            "migration": mode,
            "seed": seed,
            "instances": 2,
            "migration_policy": args.policy if mode == "on" else None,
            "policy_params": args.policy_params if mode == "on" else None,
            "replay_s": replay_s,
            "order": args.order,
            "kv_blocks": args.kv_blocks,
            "host_swap_tokens": args.host_swap_tokens,
            "token_scale": args.token_scale,
            "api_scale": args.api_scale,
            "model": config.model.name,
            "machine": machine_description(config.model.name),
            **extra,
        }
    )
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'seed':>4} {'migration':<9} {'e2e mean s':>10} {'e2e p99 s':>9} {'ttft p99 s':>10} "
        f"{'done':>7} {'failed':>6}  moves / drain",
    ]
    for row in rows:
        moves = row.get("relocations", "")
        if row["migration"] == "drain":
            moves = (
                f"drained={row.get('drained')} in {row.get('drain_s', 0):.1f} s, "
                f"{row.get('drain_rounds')} rounds, {row.get('drain_moved')} moved "
                f"({row.get('drain_moved_live', 0)} live)"
            )

        def fmt(value: Any) -> str:
            return "-" if value is None else f"{value:.2f}"

        lines.append(
            f"{row['seed']:>4} {row['migration']:<9} {fmt(row['e2e_mean_s']):>10} "
            f"{fmt(row['e2e_p99_s']):>9} {fmt(row['ttft_p99_s']):>10} "
            f"{row['completed']:>3}/{row['requests']:<3} {row.get('failed', 0):>6}  {moves}"
        )
    return "\n".join(lines)


def p99_verdict(rows: list[dict[str, Any]]) -> str:
    """Whether migration on had the lower P99 E2E in every seed."""
    by_seed: dict[int, dict[str, float | None]] = {}
    for row in rows:
        by_seed.setdefault(row["seed"], {})[row["migration"]] = row["e2e_p99_s"]
    ratios = {
        seed: runs["on"] / runs["off"]
        for seed, runs in sorted(by_seed.items())
        if runs.get("on") is not None and runs.get("off")
    }
    text = ", ".join(f"seed {seed}: {ratio:.2f}x" for seed, ratio in ratios.items())
    wins = sum(ratio < 1 for ratio in ratios.values())
    return f"P99 E2E, on / off: {text}; lower with migration in {wins} of {len(ratios)} seeds"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.update(serve_env())
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    from transformers import AutoTokenizer

    from cluster.local_cluster import logical_cpus

    base = load_serving_config(args.serve_config)
    if base.model.recipe is not None:
        from workers.model_builder import build_model, load_recipe

        build_model(load_recipe(base.model.recipe), base.model.path)  # reused if built
    tokenizer = AutoTokenizer.from_pretrained(base.model.path)
    words = single_token_words(tokenizer)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    rows: list[dict[str, Any]] = []
    with redis_server(None) as redis_url, ray_serve(port, logical_cpus(base)):

        async def run_all() -> None:
            from ray import serve

            for seed in args.seeds:
                args.seed = seed
                workload = build_trace_workload(args.trace, args, tokenizer, words)
                if args.order == "skewed":
                    workload = skewed(workload)
                config = serving_config(
                    base,
                    PLACEMENT,
                    instances=2,
                    kv_blocks=args.kv_blocks,
                    max_model_len=workload.max_model_len,
                    host_swap_tokens=args.host_swap_tokens,
                    predictor="online",
                    redis_url=redis_url,
                    port=port,
                )
                for mode in args.modes:
                    started = time.monotonic()
                    live = with_migration(
                        config,
                        "on" if mode == "on" else "off",
                        args.policy,
                        args.policy_params,
                        args.interval_s,
                    )
                    row = await run_once(live, workload, mode, seed, args)
                    row["run_wall_s"] = time.monotonic() - started
                    rows.append(row)
                    out.write_text(json.dumps(rows, indent=1) + "\n")
                    print(format_table([row]).splitlines()[-1], flush=True)
            await serve.shutdown_async()

        asyncio.run(run_all())
    print(
        f"\n{args.trace}: {args.max_requests} sessions at {args.load:g}/s, 2 instances x "
        f"{args.kv_blocks} KV blocks ({args.kv_blocks * BLOCK_SIZE} tokens), round robin, "
        f"{args.order} order"
    )
    print(format_table(rows))
    print(p99_verdict(rows))
    print(f"rows: {out}")
    return 1 if any(row["unfinished"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
