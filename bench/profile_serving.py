"""Where a decode batch's time goes in mars-serve: the engine alone against
the served path, and a py-spy profile of the served path's processes.

`bench.stock_latency` shows mars-serve decoding a batch at a fraction of
stock vLLM's rate. This separates the engine from the serving path around it:

1. the engine alone: `MarsEngine` stepped directly in a child process (no
   Ray, no HTTP), the decode rate of a batch of `--batch` requests;
2. the served path: one mars-serve instance (a Ray Serve application, as
   `bench.stock_latency` deploys it) decoding the same batches over HTTP
   while py-spy samples the engine replica and the ingress processes.

    python -m bench.profile_serving
    python -m bench.profile_serving --batch 8 --seconds 20 --policy vllm

Prints the decode rates and each process's busiest frames (share of its
samples, inclusive), and writes them to `--out` (JSON); py-spy's raw stacks
go beside it (`<out stem>_<process>.txt`) for a flame graph.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.engine_bench import REPO_ROOT, machine_description
from bench.http_bench import DEFAULT_SERVE_CONFIG, _wait_ready, ray_serve, redis_server
from bench.openai_conformance import engine_replica_pid
from bench.stock_latency import _prompt, stream_one
from bench.stock_vllm import MARS_PREFIX, EngineShape, mars_config, require_at_least_one
from cluster.config import load_serving_config
from cluster.local_cluster import logical_cpus
from cluster.ports import free_port
from cluster.serve_env import serve_env

APP = "profile"
PY_SPY = str(Path(sys.executable).with_name("py-spy"))
"""py-spy of this environment (Ray's `serve` extra installs it)."""
PROMPT_TOKENS = 64


def engine_alone(model: str, policy: str, batch: int, max_tokens: int, kv_blocks: int) -> float:
    """Decode tokens per second of `batch` concurrent requests on `MarsEngine`
    stepped directly (the second of two rounds: the first warms it up)."""
    from vllm import SamplingParams

    from workers.engine import EngineConfig, MarsEngine
    from workers.settings import CostOverride, SchedulerSettings
    from workers.turns import TurnRequest

    config = EngineConfig(
        model=model,
        num_kv_blocks=kv_blocks,
        max_model_len=2048,
        max_num_batched_tokens=2048,
        max_num_seqs=128,
        profile_costs=False,  # fixed costs: the rate, not the policy's choices, is measured
        scheduler=SchedulerSettings(
            policy=policy,
            cost=CostOverride(iter_fixed_s=0.005, iter_per_token_s=1e-4, swap_s_per_token=1e-7),
        ),
    )
    engine = MarsEngine(config)
    try:
        rate = 0.0
        for round_ in range(2):
            for k in range(batch):
                engine.add_turn(
                    TurnRequest(
                        request_id=f"r{round_}-{k}",
                        prompt_token_ids=_prompt(PROMPT_TOKENS, 1000 * round_ + k),
                        sampling=SamplingParams(
                            max_tokens=max_tokens, temperature=0.0, ignore_eos=True
                        ),
                    )
                )
            started = time.perf_counter()
            engine.run_until_idle(timeout_s=600)
            rate = batch * max_tokens / (time.perf_counter() - started)
        return rate
    finally:
        engine.shutdown()


def hottest_frames(raw: Path, top: int) -> dict[str, Any]:
    """The frames with the largest inclusive share of py-spy's raw samples."""
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        total += int(count)
        for frame in {re.sub(r":\d+\)$", ")", f) for f in stack.split(";")}:
            inclusive[frame] += int(count)
    return {
        "samples": total,
        "frames": [{"frame": frame, "share": n / total} for frame, n in inclusive.most_common(top)],
    }


async def _decode_batches(url: str, model: str, args: argparse.Namespace, seconds: float) -> float:
    """Batches of `args.batch` streamed completions for `seconds`; tokens per second."""
    import aiohttp

    tokens, started, n = 0, time.monotonic(), 0
    async with aiohttp.ClientSession() as http:
        while time.monotonic() - started < seconds:
            await asyncio.gather(
                *(
                    stream_one(
                        http,
                        url,
                        model,
                        _prompt(PROMPT_TOKENS, 5000 + 100 * n + k),
                        args.max_tokens,
                    )
                    for k in range(args.batch)
                )
            )
            tokens += args.batch * args.max_tokens
            n += 1
    return tokens / (time.monotonic() - started)


def _py_spy(pid: int, raw: Path, seconds: float) -> subprocess.Popen:
    """py-spy sampling `pid` for `seconds` (200 Hz, raw stacks into `raw`)."""
    return subprocess.Popen(
        [
            PY_SPY,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "200",
            "--nonblocking",
            "--format",
            "raw",
            "-o",
            str(raw),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _cpu_seconds() -> dict[int, tuple[str, float]]:
    """Every process's CPU seconds so far (user + system), by pid, with its title."""
    import psutil

    seen: dict[int, tuple[str, float]] = {}
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            times = proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        title = " ".join(proc.info["cmdline"] or [proc.info["name"] or "?"])
        seen[proc.info["pid"]] = (title, times.user + times.system)
    return seen


def _cpu_shares(
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    elapsed_s: float,
    pids: dict[str, int],
) -> list[dict[str, Any]]:
    """The processes that used the CPU between the two readings, in cores
    (CPU seconds per second), busiest first; ours by role."""
    roles = {pid: role for role, pid in pids.items()} | {os.getpid(): "client (this benchmark)"}
    rows = []
    for pid, (title, seconds) in after.items():
        used = seconds - before.get(pid, (title, 0.0))[1]
        if used > 0.01 * elapsed_s:
            rows.append({"process": roles.get(pid, title[:80]), "cores": used / elapsed_s})
    return sorted(rows, key=lambda row: -row["cores"])


def _replica_pid(name_part: str) -> int:
    import ray

    (actor,) = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if f"{APP}#{name_part}#" in a["name"]
    ]
    replica = ray.get_actor(actor["name"], namespace=actor["namespace"])
    return ray.get(replica.__ray_call__.remote(lambda _: os.getpid()), timeout=30)


async def served(config, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The served decode rate, every process's CPU meanwhile, and (with
    `args.profile`) py-spy's samples of the engine replica and the ingress."""
    from ray import serve

    from cluster.app import build_from_config

    url = f"http://127.0.0.1:{config.http.port}"
    try:
        await asyncio.to_thread(serve.run, build_from_config(config), name=APP, route_prefix="/")
        await asyncio.to_thread(_wait_ready, url, 300.0)
        await _decode_batches(url, config.model.name, args, 3.0)  # warm-up
        pids = {"engine": engine_replica_pid("default-0", APP), "ingress": _replica_pid("ingress")}
        raws = {name: out.with_name(f"{out.stem}_{name}.txt") for name in pids}
        spies = [_py_spy(pid, raws[n], args.seconds) for n, pid in pids.items() if args.profile]
        before = _cpu_seconds()
        started = time.monotonic()
        rate = await _decode_batches(url, config.model.name, args, args.seconds)
        cpu = _cpu_shares(before, _cpu_seconds(), time.monotonic() - started, pids)
        for spy in spies:
            _, err = spy.communicate(timeout=60)
            if spy.returncode != 0:
                raise RuntimeError(f"py-spy failed: {err.decode()[-2000:]}")
        profiles = {n: hottest_frames(raw, args.top) for n, raw in raws.items() if args.profile}
        return {"decode_tokens_per_s": rate, "cpu_cores": cpu, "profiles": profiles}
    finally:
        await serve.shutdown_async()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.profile_serving", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--serve-config", default=str(DEFAULT_SERVE_CONFIG))
    p.add_argument("--policy", default="mars", help="engine policy of both parts")
    p.add_argument("--batch", type=int, default=32, help="concurrent requests")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per request")
    p.add_argument("--seconds", type=float, default=12.0, help="profiled decode time")
    p.add_argument("--kv-blocks", type=int, default=256)
    p.add_argument("--top", type=int, default=40, help="frames kept per process")
    p.add_argument("--out", default=str(REPO_ROOT / "docs" / "results" / "profile_serving.json"))
    p.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="measure the served rate without py-spy (which takes CPU of its own)",
    )
    p.add_argument("--engine-alone", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    require_at_least_one(p, args, ("batch", "max_tokens", "kv_blocks", "top"))
    if args.seconds < 1:
        p.error("--seconds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    base = load_serving_config(args.serve_config)
    if args.engine_alone:  # the child of part 1
        rate = engine_alone(
            str(base.model.path), args.policy, args.batch, args.max_tokens, args.kv_blocks
        )
        print("ENGINE_ALONE " + json.dumps(rate))
        return 0

    child = subprocess.run(
        [sys.executable, "-m", "bench.profile_serving", "--engine-alone", *(argv or sys.argv[1:])],
        capture_output=True,
        text=True,
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        cwd=REPO_ROOT,
        timeout=900,
    )
    lines = [line for line in child.stdout.splitlines() if line.startswith("ENGINE_ALONE ")]
    if child.returncode != 0 or not lines:
        raise RuntimeError(f"the engine-alone run failed:\n{child.stderr[-4000:]}")
    alone = json.loads(lines[-1].removeprefix("ENGINE_ALONE "))

    os.environ.update(serve_env())
    shape = EngineShape(str(base.model.path), base.model.name, 32, args.kv_blocks, 2048, 2048, 128)
    out = Path(args.out)
    with redis_server(None) as redis_url:
        bench_args = argparse.Namespace(instances=1, host_swap_tokens=8192, predictor="online")
        system = f"{MARS_PREFIX}{args.policy}"
        config = mars_config(base, system, shape, redis_url, free_port(), bench_args)
        with ray_serve(config.http.port, logical_cpus(config)):
            path = asyncio.run(served(config, args, out))

    report = {
        "batch": args.batch,
        "policy": args.policy,
        "engine_alone_tokens_per_s": alone,
        "served_tokens_per_s": path["decode_tokens_per_s"],
        "profiled": args.profile,
        "cpu_cores": path["cpu_cores"],
        "profiles": path["profiles"],
        "machine": machine_description(),
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "engine_alone")},
    }
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    profiled = " while profiled" if args.profile else ""
    print(
        f"batch {args.batch}, policy {args.policy}: engine alone {alone:.0f} tok/s, "
        f"served {path['decode_tokens_per_s']:.0f} tok/s{profiled} "
        f"({path['decode_tokens_per_s'] / alone:.2f}x)"
    )
    print("\nCPU used while decoding, in cores (of " + str(os.cpu_count()) + "):")
    for row in path["cpu_cores"][:12]:
        print(f"  {row['cores']:5.2f}  {row['process']}")
    for name, profile in path["profiles"].items():
        print(f"\n{name} ({profile['samples']} samples), busiest frames, inclusive:")
        for row in profile["frames"][:25]:
            print(f"  {100 * row['share']:5.1f}%  {row['frame'][:110]}")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
