"""Side by side with stock vLLM: the same sessions against vLLM 0.32's own
OpenAI server and against mars-serve, on the same model and KV, in one run.

What a user would pick instead of mars-serve is `vllm serve` (here `python -m
vllm.entrypoints.openai.api_server`, which the benchmark starts itself): same
model, same KV blocks, block size, context length, token budget and
sequence cap, prefix caching at its default (on), vLLM's own scheduler, and
a stateless client that sends the whole context as token ids on every turn.
mars-serve gets the same client with a session id (`X-Session-Id`) and the
tool's name as a hint (`mars.tool`, which a client knows; never the call's
duration unless `--hints tool+duration`), the same number of engine
instances (a Ray Serve application, sessions in Redis) and the same engine
shape. With several instances, stock vLLM gets one server per instance and
the client spreads sessions over them round-robin, a session staying on its
server (what a user would put a sticky load balancer for).

Every turn generates exactly the trace's tokens (`ignore_eos` on both sides).
Workloads: the INFERCEPT traces (`multi_api`, `single_api`) and generated
agent sessions (`agent_mix`, `bench.generated_workload`), scaled and
sampled per seed as the HTTP benchmark does; the systems of one seed replay
the same sessions at the same Poisson offsets, one after the other, each on
a freshly started server (nothing else of ours runs meanwhile).

    python -m bench.stock_vllm --quick
    python -m bench.stock_vllm --workloads multi_api single_api agent_mix \\
        --seeds 0 1 2 3 4 --load 16 --max-requests 96 --kv-blocks 40

Writes `docs/results/stock_vllm_<workload>.json` (one row per workload, seed
and system, with the keys of `ROW_KEYS` first), `stock_vllm_summary.json`
(mean, spread and the ratio to stock vLLM seed by seed) and
`stock_vllm.png`; `--quick` writes `quick_stock_vllm_*`. Rows are written
after every run, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.engine_bench import (
    REPO_ROOT,
    _mean,
    _percentile,
    machine_description,
    policy_settings,
)
from bench.generated_workload import GENERATED_WORKLOADS
from bench.http_bench import (
    DEFAULT_SERVE_CONFIG,
    HINT_MODES,
    BenchConfig,
    ClientMode,
    SessionOutcome,
    Workload,
    build_trace_workload,
    kv_counters,
    ray_serve,
    redis_server,
    replay,
    serving_config,
    single_token_words,
)
from bench.workload import arrivals
from cluster.config import ServingConfig, load_serving_config
from cluster.local_cluster import logical_cpus
from cluster.ports import free_port
from cluster.serve_env import serve_env

STOCK = "stock_vllm"
MARS_PREFIX = "mars-serve:"
ROW_KEYS = (
    "workload",
    "seed",
    "load",
    "system",
    "instances",
    "e2e_mean_s",
    "e2e_p99_s",
    "ttft_mean_s",
    "ttft_p99_s",
    "completed",
    "failed",
)
"""Keys every row has, first (issue 12)."""
DEFAULT_SYSTEMS = (STOCK, "mars-serve:mars", "mars-serve:infercept")
SERVER_START_TIMEOUT_S = 300.0
STOCK_GPU_MEMORY_UTILIZATION = 0.2
"""vLLM's default of 0.92 fails on these CPUs (it is a share of RAM there);
the KV size is fixed by `--kv-blocks` anyway."""
QUICK = {
    "workloads": ["agent_mix"],
    "seeds": [0],
    "max_requests": 12,
    "load": 2.0,
    "max_seconds": 120.0,
}


@dataclass(frozen=True)
class EngineShape:
    """What both systems' engines are given, so that they differ only in
    the serving stack and the scheduling."""

    model_path: str
    model_name: str
    block_size: int
    kv_blocks: int
    max_model_len: int
    max_num_batched_tokens: int
    max_num_seqs: int

    def stock_args(self) -> list[str]:
        """`vllm serve`'s arguments for this shape (prefix caching, the
        scheduler and everything else at vLLM's defaults)."""
        return [
            "--model",
            self.model_path,
            "--served-model-name",
            self.model_name,
            "--block-size",
            str(self.block_size),
            "--num-gpu-blocks-override",
            str(self.kv_blocks),
            "--max-model-len",
            str(self.max_model_len),
            "--max-num-batched-tokens",
            str(self.max_num_batched_tokens),
            "--max-num-seqs",
            str(self.max_num_seqs),
            "--enforce-eager",
            "--gpu-memory-utilization",
            str(STOCK_GPU_MEMORY_UTILIZATION),
        ]


class ServerFailed(RuntimeError):
    """A server under test did not start (its log's tail says why)."""


# ------------------------------------------------------------ stock vLLM
@contextlib.contextmanager
def stock_vllm_servers(shape: EngineShape, count: int, log_dir: Path) -> Iterator[list[str]]:
    """`count` stock vLLM OpenAI servers of `shape`, each in its own process
    group on a free port; yields their base URLs once all answer
    `/v1/models`, and stops them (SIGTERM, then SIGKILL) on exit."""
    processes: list[subprocess.Popen] = []
    urls = []
    try:
        for index in range(count):
            port = free_port()
            log = open(log_dir / f"stock_vllm_{index}.log", "wb")  # noqa: SIM115 (closed below)
            command = [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                *shape.stock_args(),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ]
            processes.append(
                subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
            log.close()
            urls.append(f"http://127.0.0.1:{port}")
        for index, (process, url) in enumerate(zip(processes, urls, strict=True)):
            _wait_for_models(process, url, log_dir / f"stock_vllm_{index}.log")
        yield urls
    finally:
        for process in processes:
            _stop(process)


def _wait_for_models(process: subprocess.Popen, url: str, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise ServerFailed(
                f"stock vLLM exited with {process.returncode} before serving:\n{_tail(log_path)}"
            )
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise ServerFailed(
                f"stock vLLM at {url} did not serve within {SERVER_START_TIMEOUT_S:.0f} s:\n"
                f"{_tail(log_path)}"
            )
        time.sleep(0.5)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


async def replay_spread(
    urls: Sequence[str], workload: Workload, offsets: Sequence[float], args: argparse.Namespace
) -> tuple[list[SessionOutcome], float]:
    """Replay the workload over several stock servers, session i on server
    i mod n; one replay per server, all at once, on their shared clock."""
    mode = ClientMode(sessions=False, hints="none", ignore_eos=True)
    groups = [list(range(i, len(workload.plans), len(urls))) for i in range(len(urls))]
    results = await asyncio.gather(
        *(
            replay(
                url,
                args.model_name,
                [workload.plans[i] for i in group],
                [workload.requests[i].request_id for i in group],
                [offsets[i] for i in group],
                prefix=f"{workload.name}-stock-{n}",
                max_seconds=args.max_seconds,
                desc=f"{workload.name} {STOCK}",
                progress=not args.no_progress,
                mode=mode,
            )
            for n, (url, group) in enumerate(zip(urls, groups, strict=True))
            if group
        )
    )
    outcomes: list[SessionOutcome | None] = [None] * len(workload.plans)
    for group, (mine, _) in zip([g for g in groups if g], results, strict=True):
        for index, outcome in zip(group, mine, strict=True):
            outcomes[index] = outcome
    return [o for o in outcomes if o is not None], max(wall for _, wall in results)


# ------------------------------------------------------------ mars-serve
def mars_config(
    base: ServingConfig, system: str, shape: EngineShape, redis_url: str, port: int, args
) -> ServingConfig:
    """The serving config mars-serve runs under as `system`
    (``mars-serve:<policy>[:key=value,...]``): `base` with the engine shape,
    the engine policy and its parameters (over the base's, for the same
    policy), MARS-aware placement and the benchmark's Redis and port."""
    settings = policy_settings(system.removeprefix(MARS_PREFIX))
    config = serving_config(
        base,
        BenchConfig("mars_aware", settings["policy"]),
        instances=args.instances,
        kv_blocks=shape.kv_blocks,
        max_model_len=shape.max_model_len,
        host_swap_tokens=args.host_swap_tokens,
        predictor=args.predictor,
        redis_url=redis_url,
        port=port,
    )
    data = config.model_dump()
    data["engine"].update(
        max_num_batched_tokens=shape.max_num_batched_tokens, max_num_seqs=shape.max_num_seqs
    )
    data["policy"]["params"] = {**data["policy"]["params"], **settings["policy_params"]}
    return ServingConfig.model_validate(data)


async def run_mars(
    config: ServingConfig, workload: Workload, offsets: Sequence[float], args, label: str
) -> tuple[list[SessionOutcome], float]:
    """Deploy `config`, replay the workload through its endpoint, shut Serve
    down (on this event loop, which its handles are bound to)."""
    from ray import serve

    from bench.http_bench import _wait_ready
    from cluster.app import build_from_config

    url = f"http://127.0.0.1:{config.http.port}"
    try:
        await asyncio.to_thread(
            serve.run, build_from_config(config), name="bench", route_prefix="/"
        )
        await asyncio.to_thread(_wait_ready, url, SERVER_START_TIMEOUT_S)
        return await replay(
            url,
            config.model.name,
            workload.plans,
            [r.request_id for r in workload.requests],
            offsets,
            prefix=f"{workload.name}-{label}",
            max_seconds=args.max_seconds,
            desc=f"{workload.name} {label}",
            progress=not args.no_progress,
            mode=ClientMode(sessions=True, hints=args.hints, ignore_eos=True),
        )
    finally:
        await serve.shutdown_async()


# ------------------------------------------------------------------ rows
def make_row(
    outcomes: Sequence[SessionOutcome],
    *,
    workload: Workload,
    seed: int,
    load: float,
    system: str,
    instances: int,
    replay_s: float,
    offsets: Sequence[float],
    window: tuple[float, float],
) -> dict[str, Any]:
    """One run's row: `ROW_KEYS` first, then what explains them. Latencies
    are over the completed sessions that arrived inside `window` (seconds
    from the start; the warm-up and cool-down around it run but are not
    measured); `completed` and `failed` count every session."""
    measured = [
        o
        for o, t in zip(outcomes, offsets, strict=True)
        if window[0] <= t <= window[1] and o.status == "completed"
    ]
    e2e = [o.e2e_s for o in measured]
    ttft = [o.ttft_s for o in measured]
    resume = [t for o in measured for t in o.resume_ttft_s]
    status = Counter(o.status for o in outcomes)
    engines = [o.engine for o in outcomes if o.status == "completed" and o.engine is not None]
    row: dict[str, Any] = {
        "workload": workload.name,
        "seed": seed,
        "load": load,
        "system": system,
        "instances": instances,
        "e2e_mean_s": _mean(e2e),
        "e2e_p99_s": _percentile(e2e, 99),
        "ttft_mean_s": _mean(ttft),
        "ttft_p99_s": _percentile(ttft, 99),
        "completed": status["completed"],
        "failed": status["failed"],
        "sessions": len(outcomes),
        "measured": len(measured),
        "measured_window_s": list(window),
        "e2e_drift": e2e_drift(outcomes, offsets, window),
        "timed_out": status["running"],
        "not_submitted": status["not_submitted"],
        "errors": [o.error for o in outcomes if o.error][:5],
        "resume_ttft_mean_s": _mean(resume),
        "resume_ttft_p99_s": _percentile(resume, 99),
        "turns": sum(len(o.finish_reasons) for o in outcomes),
        "turn_outside_engine_mean_s": _mean([t for o in measured for t in o.outside_engine_s]),
        "ingress_phases_mean_ms": phase_means([p for o in measured for p in o.phases_ms]),
        "replay_s": replay_s,
    }
    if system != STOCK:
        row.update(kv_counters(engines))
    return row


def phase_means(turns: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean milliseconds of each ingress step over the turns that report it."""
    names = sorted({name for phases in turns for name in phases})
    return {name: _mean([p[name] for p in turns if name in p]) for name in names}


def measured_window(
    offsets: Sequence[float], warmup_s: float, cooldown_s: float
) -> tuple[float, float]:
    """The arrival times whose sessions are measured: after the warm-up,
    and before the last `cooldown_s` seconds of arrivals (those sessions
    run on an emptying server). Raises ValueError when none is left."""
    last = max(offsets, default=0.0)
    window = (warmup_s, last - cooldown_s)
    if not any(window[0] <= t <= window[1] for t in offsets):
        raise ValueError(
            f"--warmup-s {warmup_s:g} and --cooldown-s {cooldown_s:g} leave no session to "
            f"measure: arrivals span {last:.1f} s (raise --max-requests or lower them)"
        )
    return window


def e2e_drift(
    outcomes: Sequence[SessionOutcome], offsets: Sequence[float], window: tuple[float, float]
) -> float | None:
    """Mean E2E of the measured sessions that arrived in the window's second
    half over that of its first half: near 1 in a steady state, well above 1
    when the load exceeds what the server sustains (its queue grows, and
    the mean then depends on how long arrivals last, not on the system)."""
    middle = (window[0] + window[1]) / 2
    halves: tuple[list[float], list[float]] = ([], [])
    for outcome, offset in zip(outcomes, offsets, strict=True):
        if outcome.status == "completed" and window[0] <= offset <= window[1]:
            halves[offset > middle].append(outcome.e2e_s)
    if not halves[0] or not halves[1]:
        return None
    return _mean(halves[1]) / _mean(halves[0])


def error_row(workload: Workload, seed: int, load: float, system: str, instances: int, error):
    """The row of a run that could not happen: every session unfinished."""
    return {
        **dict.fromkeys(ROW_KEYS),
        "workload": workload.name,
        "seed": seed,
        "load": load,
        "system": system,
        "instances": instances,
        "completed": 0,
        "failed": len(workload.requests),
        "sessions": len(workload.requests),
        "error": str(error)[:400],
    }


def merge_rows(kept: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]) -> list[dict]:
    """`kept` rows, less those whose (seed, system) a `new` row has, then
    `new`, ordered by seed (then as they came)."""
    replaced = {(r["seed"], r["system"]) for r in new}
    rows = [r for r in kept if (r["seed"], r["system"]) not in replaced] + list(new)
    return sorted(rows, key=lambda r: r["seed"])


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per workload and system: the mean over seeds of each latency, its
    spread, and the ratio to stock vLLM's mean E2E in the same seed."""
    stock = {(r["workload"], r["seed"]): r for r in rows if r["system"] == STOCK}
    out = []
    for workload, system in dict.fromkeys((r["workload"], r["system"]) for r in rows):
        mine = [r for r in rows if r["workload"] == workload and r["system"] == system]
        e2e = [r["e2e_mean_s"] for r in mine if r["e2e_mean_s"] is not None]
        ratios = []
        for r in mine:
            base = stock.get((workload, r["seed"]))
            if base and base["e2e_mean_s"] and r["e2e_mean_s"] is not None:
                ratios.append(r["e2e_mean_s"] / base["e2e_mean_s"])
        ttft_worse = [
            r["seed"]
            for r in mine
            if (base := stock.get((workload, r["seed"])))
            and r["ttft_p99_s"] is not None
            and base["ttft_p99_s"] is not None
            and r["ttft_p99_s"] > base["ttft_p99_s"]
        ]
        out.append(
            {
                "workload": workload,
                "system": system,
                "seeds": [r["seed"] for r in mine],
                "e2e_mean_s": _mean(e2e),
                "e2e_mean_min_s": min(e2e, default=None),
                "e2e_mean_max_s": max(e2e, default=None),
                "e2e_p99_s": _mean([r["e2e_p99_s"] for r in mine if r["e2e_p99_s"] is not None]),
                "ttft_mean_s": _mean([r["ttft_mean_s"] for r in mine if r["ttft_mean_s"]]),
                "ttft_p99_s": _mean([r["ttft_p99_s"] for r in mine if r["ttft_p99_s"]]),
                "e2e_ratio_to_stock": ratios,
                "e2e_ratio_to_stock_max": max(ratios, default=None),
                "ttft_p99_worse_than_stock_in_seeds": ttft_worse,
                "completed": sum(r["completed"] for r in mine),
                "failed": sum(r["failed"] for r in mine),
                "sessions": sum(r["sessions"] for r in mine),
            }
        )
    return out


def format_summary(summary: Sequence[dict[str, Any]]) -> str:
    def fmt(value: Any, spec: str = ".2f") -> str:
        return "-" if value is None else format(value, spec)

    header = (
        f"{'workload':<11} {'system':<22} {'done':>9} {'failed':>6} {'e2e mean':>9} "
        f"{'(min-max)':>13} {'e2e p99':>8} {'ttft mean':>9} {'ttft p99':>8}  x stock, per seed"
    )
    lines = [header, "-" * len(header)]
    for s in summary:
        spread = f"{fmt(s['e2e_mean_min_s'])}-{fmt(s['e2e_mean_max_s'])}"
        ratios = (
            " ".join(f"{r:.2f}" for r in s["e2e_ratio_to_stock"]) if s["system"] != STOCK else ""
        )
        lines.append(
            f"{s['workload']:<11} {s['system']:<22} {s['completed']:>4}/{s['sessions']:<4} "
            f"{s['failed']:>6} {fmt(s['e2e_mean_s']):>9} {spread:>13} {fmt(s['e2e_p99_s']):>8} "
            f"{fmt(s['ttft_mean_s']):>9} {fmt(s['ttft_p99_s']):>8}  {ratios}"
        )
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Mean E2E and P99 TTFT per workload and system: a bar at the mean over
    seeds, a dot per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    width = 0.8 / max(1, len(systems))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = (("e2e_mean_s", "mean end-to-end latency (s)"), ("ttft_p99_s", "P99 TTFT (s)"))
    for ax, (key, name) in zip(axes, panels, strict=True):
        for k, system in enumerate(systems):
            for w, workload in enumerate(workloads):
                values = [
                    r[key]
                    for r in rows
                    if r["system"] == system and r["workload"] == workload and r[key] is not None
                ]
                x = w + (k - (len(systems) - 1) / 2) * width
                mean = _mean(values)
                ax.bar(
                    x,
                    math.nan if mean is None else mean,
                    width,
                    color=f"C{k}",
                    label=system if w == 0 else None,
                )
                ax.scatter([x] * len(values), values, color="black", s=8, zorder=3)
        ax.set_xticks(range(len(workloads)), workloads)
        ax.set_title(name)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.stock_vllm", description=__doc__.split("\n\n")[0]
    )
    known = ["multi_api", "single_api", *GENERATED_WORKLOADS]
    p.add_argument("--quick", action="store_true", help="one small run per system")
    p.add_argument("--workloads", nargs="+", default=known, help=f"of {known}, or a trace .json")
    p.add_argument(
        "--systems",
        nargs="+",
        default=list(DEFAULT_SYSTEMS),
        help=f"{STOCK} or {MARS_PREFIX}<engine policy>[:key=value,...] (policy parameters)",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--load", type=float, default=6.0, help="session arrivals per second")
    p.add_argument("--max-requests", type=int, default=96, help="sessions per run")
    p.add_argument(
        "--serve-config",
        default=str(DEFAULT_SERVE_CONFIG),
        help="mars-serve's base serving YAML; its model is served by both",
    )
    p.add_argument("--instances", type=int, default=1, help="engine instances of each system")
    p.add_argument("--kv-blocks", type=int, default=40, help="KV blocks per instance")
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="iteration token budget of both (vLLM's CPU server default)",
    )
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=128,
        help="running sequences cap of both (vLLM's CPU server default)",
    )
    p.add_argument("--host-swap-tokens", type=int, default=8192, help="mars-serve's host swap")
    p.add_argument("--predictor", choices=("online", "oracle"), default="online")
    p.add_argument(
        "--hints",
        choices=HINT_MODES,
        default="tool",
        help="what mars-serve is told of each call (tool+duration is an oracle)",
    )
    p.add_argument("--token-scale", type=float, default=0.25)
    p.add_argument("--api-scale", type=float, default=0.1)
    p.add_argument("--max-seconds", type=float, default=600.0, help="cap per replay")
    p.add_argument(
        "--warmup-s",
        type=float,
        default=0.0,
        help="sessions arriving in the first seconds run but are not measured",
    )
    p.add_argument(
        "--cooldown-s",
        type=float,
        default=0.0,
        help="nor those arriving in the last seconds of arrivals",
    )
    p.add_argument("--out-dir", default=str(REPO_ROOT / "docs" / "results"))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--replace",
        action="store_true",
        help="keep the workload files' rows of other seeds and systems (rerun some of them)",
    )
    p.add_argument(
        "--report-only", action="store_true", help="run nothing: summary and plot from the files"
    )
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    from policies import engine_policy_names

    for system in args.systems:
        policy = system.removeprefix(MARS_PREFIX).partition(":")[0]
        if system != STOCK and (
            not system.startswith(MARS_PREFIX) or policy not in engine_policy_names()
        ):
            p.error(
                f"--systems: {system!r} is not {STOCK} nor {MARS_PREFIX}<one of "
                f"{list(engine_policy_names())}>"
            )
    require_at_least_one(
        p,
        args,
        ("kv_blocks", "max_requests", "instances", "max_num_batched_tokens", "max_num_seqs"),
    )
    if args.load <= 0 or args.max_seconds <= 0:
        p.error("--load and --max-seconds must be > 0")
    if args.warmup_s < 0 or args.cooldown_s < 0:
        p.error("--warmup-s and --cooldown-s must be >= 0")
    return args


def require_at_least_one(
    parser: argparse.ArgumentParser, args: argparse.Namespace, names: Sequence[str]
) -> None:
    """`parser.error` naming the first of the integer options `names` under 1."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Inherited by every process of both systems: vLLM's per-step logging
    # quiet, and Ray Serve run as mars-serve deploys it (`cluster.serve_env`).
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.update(serve_env())
    from transformers import AutoTokenizer

    base = load_serving_config(args.serve_config)
    if base.model.recipe is not None:
        from workers.model_builder import build_model, load_recipe

        build_model(load_recipe(base.model.recipe), base.model.path)  # reused if built
    args.model_name = base.model.name
    tokenizer = AutoTokenizer.from_pretrained(base.model.path)
    words = single_token_words(tokenizer)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = "quick_stock_vllm" if args.quick else "stock_vllm"
    paths = [out_dir / f"{prefix}_{_file_name(name)}.json" for name in args.workloads]
    if not args.report_only:
        _run_all(args, base, tokenizer, words, paths)
    all_rows = [row for path in paths if path.exists() for row in _read_rows(path)]
    if not all_rows:
        print(f"no rows in {[str(p) for p in paths]}", file=sys.stderr)
        return 1
    summary = summarize(all_rows)
    _write_json(out_dir / f"{prefix}_summary.json", summary)
    print(f"\n{format_summary(summary)}")
    png = out_dir / f"{prefix}.png"
    seeds = sorted({row["seed"] for row in all_rows})
    plot(
        all_rows,
        png,
        f"stock vLLM vs mars-serve: {args.instances} instance(s) x "
        f"{args.kv_blocks} KV blocks, {args.load:g} sessions/s, {args.max_requests} sessions, "
        f"seeds {seeds}",
    )
    print(f"wrote {out_dir}/{prefix}_*.json and {png}", flush=True)
    return 0


def _read_rows(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text(encoding="utf-8"))


def _run_all(args, base, tokenizer, words, paths: list[Path]) -> None:
    """Every workload, seed and system; each workload's rows written to its
    file after every run (with `--replace`, over the file's rows of the same
    seed and system, the others kept)."""
    with redis_server(None) as redis_url, tempfile.TemporaryDirectory(prefix="stock-vllm-") as tmp:
        for workload_name, json_path in zip(args.workloads, paths, strict=True):
            kept = _read_rows(json_path) if args.replace and json_path.exists() else []
            rows: list[dict[str, Any]] = []
            for seed in args.seeds:
                run_args = argparse.Namespace(**{**vars(args), "seed": seed})
                workload = build_trace_workload(workload_name, run_args, tokenizer, words)
                shape = EngineShape(
                    str(base.model.path),
                    base.model.name,
                    32,
                    args.kv_blocks,
                    workload.max_model_len,
                    args.max_num_batched_tokens,
                    args.max_num_seqs,
                )
                offsets = arrivals(len(workload.requests), args.load, seed)
                window = measured_window(offsets, args.warmup_s, args.cooldown_s)
                print(
                    f"\n== {workload.name} seed {seed}: {len(workload.requests)} sessions at "
                    f"{args.load:g}/s, {args.instances} instance(s) x {args.kv_blocks} KV blocks, "
                    f"max_model_len {workload.max_model_len}",
                    flush=True,
                )
                for system in args.systems:
                    started = time.monotonic()
                    row = _run_system(
                        system,
                        workload,
                        offsets,
                        window,
                        shape,
                        base,
                        redis_url,
                        Path(tmp),
                        run_args,
                    )
                    row.update(_context(args, shape, time.monotonic() - started))
                    rows.append(row)
                    print(
                        f"   {system:<24} {row['completed']}/{row['sessions']} done, "
                        f"e2e mean {row['e2e_mean_s'] or float('nan'):.2f} s, "
                        f"ttft p99 {row['ttft_p99_s'] or float('nan'):.2f} s, "
                        f"drift {row.get('e2e_drift') or float('nan'):.2f}, "
                        f"{row['run_wall_s']:.0f} s wall"
                        + (f"  ERROR {row['error']}" if row.get("error") else ""),
                        flush=True,
                    )
                    _write_json(json_path, merge_rows(kept, rows))


def _run_system(system, workload, offsets, window, shape, base, redis_url, tmp: Path, args) -> dict:
    """One system's run on a fresh server: its row (an error row if it failed)."""
    try:
        if system == STOCK:
            with stock_vllm_servers(shape, args.instances, tmp) as urls:
                outcomes, replay_s = asyncio.run(replay_spread(urls, workload, offsets, args))
        else:
            config = mars_config(base, system, shape, redis_url, free_port(), args)
            with ray_serve(config.http.port, logical_cpus(config)):
                outcomes, replay_s = asyncio.run(run_mars(config, workload, offsets, args, system))
    except Exception as exc:  # one system's failure is its row, not the run's end
        print(f"   {system} failed: {exc!r}", file=sys.stderr, flush=True)
        return error_row(workload, args.seed, args.load, system, args.instances, exc)
    return make_row(
        outcomes,
        workload=workload,
        seed=args.seed,
        load=args.load,
        system=system,
        instances=args.instances,
        replay_s=replay_s,
        offsets=offsets,
        window=window,
    )


def _context(args, shape: EngineShape, wall_s: float) -> dict[str, Any]:
    return {
        "kv_blocks": shape.kv_blocks,
        "block_size": shape.block_size,
        "max_model_len": shape.max_model_len,
        "max_num_batched_tokens": shape.max_num_batched_tokens,
        "max_num_seqs": shape.max_num_seqs,
        "model": shape.model_name,
        "sessions_asked": args.max_requests,
        "token_scale": args.token_scale,
        "api_scale": args.api_scale,
        "predictor": args.predictor,
        "hints": args.hints,
        "host_swap_tokens": args.host_swap_tokens,
        "machine": machine_description(shape.model_name),
        "run_wall_s": wall_s,
        "loadavg_after": os.getloadavg()[0],
    }


def _file_name(workload: str) -> str:
    return Path(workload).stem if workload.endswith(".json") else workload


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
