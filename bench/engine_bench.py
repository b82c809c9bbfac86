"""Engine-level benchmark: replay INFERCEPT traces through `MarsEngine` under
each engine policy and compare end-to-end latency and time to first token.

For each trace x seed x load (requests/s) x policy, one run: a fresh engine
(the policy is fixed at start-up) with a capped KV cache, the seed's sampled
requests arriving at the seed's Poisson offsets (the same for every policy,
so policies compare seed by seed), tools emulated server-side
(`ToolCall(tool="emulated")`: sleep for the scaled API time, return the
scaled number of result tokens). Each run lives in its own spawned process,
so one engine's process-wide vLLM state never leaks into the next and a
crash costs one row, not the sweep. Seeds are the outer loop, so a sweep cut
short still holds whole seeds.

    python -m bench.engine_bench --quick
    python -m bench.engine_bench --traces multi_api --loads 0.5 1 2 --seeds 0 1 2 \\
        --max-requests 24 --token-scale 0.25 --api-scale 0.1 --kv-blocks 40

Writes `docs/results/engine_<trace>.json` (one row per run, every seed),
`engine_<trace>_summary.json` (one row per load x policy: means over seeds,
spread, and MARS against each other policy seed by seed) and `.png`
(`quick_<trace>*` for `--quick`). Sessions still running at `--max-seconds`
are counted as unfinished in the row and the table, never dropped silently.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from bench.generated_workload import TOOL_KINDS, workload_source
from bench.workload import (
    TraceRequest,
    arrivals,
    build_workload,
    prompt_token_ids,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_POLICIES = ("vllm", "infercept", "sjf", "mars")
BLOCK_SIZE = 32
MODEL_MAX_POSITIONS = 4096
"""The tiny model's max_position_embeddings: the longest context vLLM allows."""

REQUIRED_KEYS = (
    "trace",
    "load_rps",
    "policy",
    "e2e_mean_s",
    "e2e_p99_s",
    "ttft_mean_s",
    "ttft_p99_s",
    "completed",
)
LATENCY_KEYS = ("e2e_mean_s", "e2e_p99_s", "ttft_mean_s", "ttft_p99_s")
SPREAD_KEYS = ("e2e_mean_s", "ttft_p99_s")
"""Keys whose min, max and sample std over seeds the summary reports (and plots)."""


@dataclass
class RunSpec:
    """Everything one run needs; picklable, sent to the run's own process."""

    trace: str
    load_rps: float
    policy: str
    requests: list[TraceRequest]
    offsets: list[float]
    model: str
    kv_blocks: int
    max_model_len: int
    host_swap_tokens: int
    predictor: str
    max_seconds: float
    token_scale: float
    api_scale: float
    cost: dict | None = None
    """Cost coefficients shared by every run of a sweep (measured once), so
    that policies are compared under one cost model; None = profile per run."""
    progress: bool = True
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------ one run
_OPENS = {"queued": "queued", "resumed": "queued", "preempted": "queued", "scheduled": "running"}
_CLOSES = {
    "scheduled": ("queued",),
    "paused": ("running",),
    "preempted": ("running",),
    "finished": ("running", "queued", "held"),
    "resumed": ("held",),
}


def time_breakdown(timeline) -> dict[str, float]:
    """Seconds one request spent queued, running, and paused with its KV held
    in device memory (preserved), from its engine timeline: where E2E went."""
    spent = {"queued": 0.0, "running": 0.0, "held": 0.0}
    since: dict[str, float] = {}
    for event in timeline:
        for part in _CLOSES.get(event.event, ()):
            if part in since:
                spent[part] += event.t - since.pop(part)
        if event.event == "demoted" and "held" in since:
            spent["held"] += event.t - since.pop("held")
        if event.event in ("paused", "swap cancelled"):
            since["held"] = event.t
        if event.event in _OPENS:
            since[_OPENS[event.event]] = event.t
    return spent


def _percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _engine_request(request: TraceRequest, index: int):
    from workers.engine import AugmentedRequest, Segment
    from workers.tools import ToolCall

    segments = []
    for seg in request.segments:
        call = None
        if seg.api_time_s is not None:
            call = ToolCall(
                tool=seg.tool or "emulated",
                duration_s=seg.api_time_s,
                return_tokens=seg.api_return_tokens,
            )
        segments.append(Segment(generate_tokens=seg.completion_tokens, call=call))
    shared = request.shared_prefix_tokens
    prompt = [
        *prompt_token_ids(shared, salt=SHARED_PREFIX_SALT),
        *prompt_token_ids(request.prompt_tokens - shared, salt=index),
    ]
    return AugmentedRequest(
        request_id=f"{index:04d}-{request.request_id}",
        prompt_token_ids=prompt,
        segments=segments,
    )


SHARED_PREFIX_SALT = 10_000
"""The salt of the prompt tokens every request of a workload shares (its
system prompt); each request's own tokens are salted with its index."""


def bench_tools():
    """The engine's tools: the built-in ones, and each generated workload's
    tool kind by its name (emulated: the call's own duration and result
    size), so that the online predictor learns each kind apart."""
    from workers.tools import default_registry, emulated_tool

    registry = default_registry()
    for kind in TOOL_KINDS:
        registry.register(kind.name, emulated_tool)
    return registry


def replay(spec: RunSpec) -> dict:
    """Start an engine for `spec.policy`, replay the workload, return one row."""
    from policies import Strategy
    from workers.engine import EngineConfig, MarsEngine, PlanState
    from workers.settings import CostOverride, SchedulerSettings

    started = time.monotonic()
    load_before = os.getloadavg()[0]
    config = EngineConfig(
        model=spec.model,
        block_size=BLOCK_SIZE,
        num_kv_blocks=spec.kv_blocks,
        max_model_len=spec.max_model_len,
        host_swap_tokens=spec.host_swap_tokens,
        scheduler=SchedulerSettings(
            **policy_settings(spec.policy),
            predictor=spec.predictor,
            cost=CostOverride(**spec.cost) if spec.cost else None,
        ),
        profile_costs=spec.cost is None,
    )
    engine = MarsEngine(config, bench_tools())
    startup_s = time.monotonic() - started
    plans = [_engine_request(r, i) for i, r in enumerate(spec.requests)]
    scheduler = engine.scheduler
    preemptions: dict[str, int] = {}
    submitted: list = []
    lags: list[float] = []
    bar = None
    if spec.progress:
        from tqdm import tqdm

        bar = tqdm(
            total=len(plans),
            desc=f"{spec.trace} {spec.load_rps:g} rps {spec.policy}",
            unit="req",
            file=sys.stderr,
            dynamic_ncols=True,
        )
    t0 = time.monotonic()
    next_index = 0
    done = 0
    steps = 0
    while True:
        now = time.monotonic() - t0
        while next_index < len(plans) and spec.offsets[next_index] <= now:
            lags.append(now - spec.offsets[next_index])
            submitted.append(engine.submit(plans[next_index]))
            next_index += 1
        if next_index == len(plans) and all(s.state is PlanState.FINISHED for s in submitted):
            break
        if now > spec.max_seconds:
            break
        if engine.has_work():
            engine.step()
            steps += 1
            for request in scheduler.requests.values():
                if request.num_preemptions:
                    preemptions[request.request_id] = max(
                        preemptions.get(request.request_id, 0), request.num_preemptions
                    )
            finished_now = sum(1 for s in submitted if s.state is PlanState.FINISHED) - done
            done += finished_now
            if bar is not None and (finished_now or steps % 50 == 0):
                bar.set_postfix(submitted=next_index, active=next_index - done, refresh=False)
                bar.update(finished_now)
        elif next_index < len(plans):
            time.sleep(max(0.0, min(0.05, spec.offsets[next_index] - now)))
    replay_s = time.monotonic() - t0
    if bar is not None:
        bar.close()

    completed = [s for s in submitted if s.state is PlanState.FINISHED]
    e2e = [s.e2e_s for s in completed]
    ttft = [s.ttft_s for s in completed if s.ttft_s is not None]
    ours = {s.session_id for s in submitted}
    recompute_tokens = discards = swaps = swapped_tokens = 0
    spent = {"queued": 0.0, "running": 0.0, "held": 0.0}
    for request_id in ours:
        record = scheduler.records.get(request_id)
        if record is None:
            continue
        for part, seconds in time_breakdown(record.timeline).items():
            spent[part] += seconds
        recompute_tokens += record.recomputed_tokens
        swapped_tokens += record.swapped_out_tokens
        for event in record.timeline:
            if event.event != "demoted":
                continue
            if event.strategy is Strategy.DISCARD:
                discards += 1
            elif event.strategy is Strategy.SWAP:
                swaps += 1
    cost = scheduler.cost
    return {
        "trace": spec.trace,
        "load_rps": spec.load_rps,
        "policy": spec.policy,
        "e2e_mean_s": _mean(e2e),
        "e2e_p99_s": _percentile(e2e, 99),
        "ttft_mean_s": _mean(ttft),
        "ttft_p99_s": _percentile(ttft, 99),
        "completed": len(completed),
        "requests": len(plans),
        "unfinished": len(plans) - len(completed),
        "not_submitted": len(plans) - next_index,
        "preemptions": sum(v for k, v in preemptions.items() if k in ours),
        "recompute_tokens": recompute_tokens,
        "discards": discards,
        "swaps": swaps,
        "swapped_out_tokens": swapped_tokens,
        # Per-request means: where the E2E went (held = paused with KV preserved).
        "queued_mean_s": spent["queued"] / len(plans),
        "running_mean_s": spent["running"] / len(plans),
        "held_mean_s": spent["held"] / len(plans),
        "max_submit_lag_s": max(lags) if lags else 0.0,
        "engine_steps": steps,
        # The online predictor's error so far, per tool (mean absolute error
        # of the API duration and of the tokens before each call).
        "predictor_error": scheduler.predictor_report(),
        "replay_s": replay_s,
        "startup_s": startup_s,
        "token_scale": spec.token_scale,
        "api_scale": spec.api_scale,
        "kv_blocks": spec.kv_blocks,
        "kv_tokens": spec.kv_blocks * BLOCK_SIZE,
        "max_model_len": spec.max_model_len,
        "host_swap_tokens": spec.host_swap_tokens,
        "predictor": spec.predictor,
        "max_seconds": spec.max_seconds,
        "cost_model": {
            "iter_fixed_s": cost.iter_fixed_s,
            "iter_per_token_s": cost.iter_per_token_s,
            "swap_s_per_token": cost.swap_s_per_token,
        },
        "machine": machine_description(),
        # 1-min load average before and after: above ~1.2 on 2 CPUs means
        # something else shared the CPUs and the latencies are not comparable.
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg()[0],
        **spec.extra,
    }


def _child(spec: RunSpec, conn) -> None:
    try:
        conn.send(("ok", replay(spec)))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def run_isolated(spec: RunSpec) -> dict:
    """`replay(spec)` in a fresh spawned process; a failure becomes an error row."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(spec, child), daemon=False)
    process.start()
    child.close()
    status, payload = "error", "the run's process exited without a result"
    with contextlib.suppress(EOFError):
        status, payload = parent.recv()
    process.join()
    if status == "ok":
        return payload
    print(f"run failed: {spec.trace} {spec.load_rps} {spec.policy}\n{payload}", file=sys.stderr)
    return {
        "trace": spec.trace,
        "load_rps": spec.load_rps,
        "policy": spec.policy,
        "e2e_mean_s": None,
        "e2e_p99_s": None,
        "ttft_mean_s": None,
        "ttft_p99_s": None,
        "completed": 0,
        "requests": len(spec.requests),
        "unfinished": len(spec.requests),
        "error": payload.splitlines()[0] if payload else "unknown",
        "token_scale": spec.token_scale,
        "api_scale": spec.api_scale,
        "kv_blocks": spec.kv_blocks,
        "machine": machine_description(),
        **spec.extra,
    }


def _measure_costs(model: str, kv_blocks: int, max_model_len: int, conn) -> None:
    try:
        from workers.engine import EngineConfig, MarsEngine

        engine = MarsEngine(
            EngineConfig(
                model=model,
                block_size=BLOCK_SIZE,
                num_kv_blocks=kv_blocks,
                max_model_len=max_model_len,
            )
        )
        cost = engine.scheduler.cost
        conn.send(
            {
                "iter_fixed_s": cost.iter_fixed_s,
                "iter_per_token_s": cost.iter_per_token_s,
                "swap_s_per_token": cost.swap_s_per_token,
            }
        )
    finally:
        conn.close()


def measure_costs(model: str, kv_blocks: int, max_model_len: int) -> dict:
    """Profile one engine (in its own process) and return its cost coefficients."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_measure_costs, args=(model, kv_blocks, max_model_len, child))
    process.start()
    child.close()
    try:
        cost = parent.recv()
    except EOFError:
        raise RuntimeError("cost profiling failed: the profiling process exited") from None
    finally:
        process.join()
    return cost


# ------------------------------------------------------------------ helpers
def machine_description(model: str = "tiny") -> str:
    """The CPU, its count, the engine build and the model a run used."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, vLLM CPU, {model} model"


def tokenizer_counter(model: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict]) -> str:
    """One line per run; a seed column only when the runs span several seeds."""
    several = len({r["seed"] for r in rows}) > 1
    seed_header = f"{'seed':>4} " if several else ""
    header = (
        f"{'load':>5} {seed_header}{'policy':<10} {'done':>7} {'e2e mean':>9} {'e2e p99':>8} "
        f"{'ttft mean':>9} {'ttft p99':>8} {'preempt':>7} {'recomp tok':>10} "
        f"{'discards':>8} {'swaps':>5} {'queued':>6} {'held':>5}"
    )
    lines = [header, "-" * len(header)]
    for r in sorted(rows, key=lambda r: (r["load_rps"], r["seed"], r["policy"])):
        done = f"{r['completed']}/{r.get('requests', '?')}"
        seed = f"{r['seed']:>4} " if several else ""
        lines.append(
            f"{r['load_rps']:>5g} {seed}{r['policy']:<10} {done:>7} {_fmt(r['e2e_mean_s']):>9} "
            f"{_fmt(r['e2e_p99_s']):>8} {_fmt(r['ttft_mean_s']):>9} {_fmt(r['ttft_p99_s']):>8} "
            f"{r.get('preemptions', '-')!s:>7} {r.get('recompute_tokens', '-')!s:>10} "
            f"{r.get('discards', '-')!s:>8} {r.get('swaps', '-')!s:>5} "
            f"{_fmt(r.get('queued_mean_s')):>6} {_fmt(r.get('held_mean_s')):>5}"
            + (f"  ERROR {r['error']}" if r.get("error") else "")
        )
    return "\n".join(lines)


# ------------------------------------------------------------ over seeds
def _measured(row: dict) -> bool:
    """Whether a run has latencies to average: no error and every latency set
    (a run that finished no session has None). Others count as failed runs."""
    return not row.get("error") and all(row.get(key) is not None for key in LATENCY_KEYS)


def paired_reductions(
    rows: list[dict], ours: str = "mars"
) -> dict[tuple[str, float], dict[str, dict]]:
    """`ours`'s mean E2E against every other policy, seed by seed, per (trace,
    load). All policies of one seed replay the same requests at the same
    arrivals, so the per-seed ratio cancels how hard that seed's sample is,
    which dominates the spread of the plain means. Only seeds where both runs
    were measured count.

    Returns {(trace, load_rps): {"e2e_vs_<policy>": {"seeds": [...],
    "per_seed": [ours / other E2E, one per seed], "mean_reduction": 1 - mean
    ratio, "wins": seeds where ours is lower}}}."""
    e2e = {
        (r["trace"], r["load_rps"], r["policy"], r["seed"]): r["e2e_mean_s"]
        for r in rows
        if _measured(r)
    }
    paired: dict[tuple[str, float], dict[str, dict]] = {}
    for (trace, load, policy, seed), theirs in sorted(e2e.items()):
        mine = e2e.get((trace, load, ours, seed))
        if policy == ours or mine is None:
            continue
        entry = paired.setdefault((trace, load), {}).setdefault(
            f"e2e_vs_{policy}", {"seeds": [], "per_seed": []}
        )
        entry["seeds"].append(seed)
        entry["per_seed"].append(mine / theirs)
    for comparisons in paired.values():
        for entry in comparisons.values():
            ratios = entry["per_seed"]
            entry["mean_reduction"] = 1 - sum(ratios) / len(ratios)
            entry["wins"] = sum(ratio < 1 for ratio in ratios)
    return paired


def summarize(rows: list[dict], ours: str = "mars") -> list[dict]:
    """One row per (trace, load_rps, policy) over its seeds, so one lucky or
    unlucky sample no longer decides a comparison.

    Latency keys: means over the measured runs (failed ones, see `_measured`,
    are left out and counted in `failed_runs`); `seeds` and `runs`: the
    measured ones. `completed` and `requests`: totals over every run, failed
    included, so a crash shows as unfinished work. `<key>_min`, `_max`, `_std`
    (sample std, None below two runs) for each of SPREAD_KEYS. `ours`'s rows
    also carry `paired_reductions`' entries for their (trace, load)."""
    cells: dict[tuple[str, float, str], list[dict]] = {}
    for row in rows:
        cells.setdefault((row["trace"], row["load_rps"], row["policy"]), []).append(row)
    paired = paired_reductions(rows, ours)
    summary = []
    for (trace, load, policy), runs in sorted(cells.items()):
        measured = [r for r in runs if _measured(r)]
        row: dict = {"trace": trace, "load_rps": load, "policy": policy}
        row.update({key: _mean([r[key] for r in measured]) for key in LATENCY_KEYS})
        row["completed"] = sum(r["completed"] for r in runs)
        row["requests"] = sum(r["requests"] for r in runs)
        row["seeds"] = sorted(r["seed"] for r in measured)
        row["runs"] = len(measured)
        row["failed_runs"] = len(runs) - len(measured)
        for key in SPREAD_KEYS:
            values = [r[key] for r in measured]
            row[f"{key}_min"] = min(values, default=None)
            row[f"{key}_max"] = max(values, default=None)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
        if policy == ours:
            row.update(paired.get((trace, load), {}))
        summary.append(row)
    return summary


def format_summary(summary: list[dict]) -> str:
    """One line per load x policy: measured/all runs, E2E mean ± std and
    min-max over seeds, mean P99 TTFT, and for MARS its paired E2E change
    against each other policy with the seeds where it is lower."""
    header = (
        f"{'load':>5} {'policy':<10} {'runs':>5} {'done':>9} {'e2e mean ± std':>15} "
        f"{'e2e min-max':>13} {'ttft p99':>8}  paired e2e change (seeds lower)"
    )
    lines = [header, "-" * len(header)]
    for r in sorted(summary, key=lambda r: (r["load_rps"], r["policy"])):
        runs = f"{r['runs']}/{r['runs'] + r['failed_runs']}"
        done = f"{r['completed']}/{r['requests']}"
        std = r["e2e_mean_s_std"]
        e2e = _fmt(r["e2e_mean_s"]) + ("" if std is None else f" ± {std:.2f}")
        spread = f"{_fmt(r['e2e_mean_s_min'])}-{_fmt(r['e2e_mean_s_max'])}"
        paired = ", ".join(
            f"vs {key.removeprefix('e2e_vs_')} {-100 * c['mean_reduction']:+.1f}% "
            f"({c['wins']}/{len(c['seeds'])})"
            for key, c in sorted(r.items())
            if key.startswith("e2e_vs_")
        )
        lines.append(
            f"{r['load_rps']:>5g} {r['policy']:<10} {runs:>5} {done:>9} {e2e:>15} "
            f"{spread:>13} {_fmt(r['ttft_p99_s']):>8}  {paired}".rstrip()
        )
    return "\n".join(lines)


def plot(summary: list[dict], path: Path, title: str) -> None:
    """Summary rows against load; bars span min-max over seeds when a point
    has several runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for policy in sorted({r["policy"] for r in summary}):
        mine = sorted((r for r in summary if r["policy"] == policy), key=lambda r: r["load_rps"])
        for ax, key in zip(axes, SPREAD_KEYS, strict=True):
            points = [r for r in mine if r[key] is not None]
            if not points:
                continue
            ys = [r[key] for r in points]
            yerr = None
            if any(r["runs"] > 1 for r in points):
                yerr = [
                    [y - r[f"{key}_min"] for y, r in zip(ys, points, strict=True)],
                    [r[f"{key}_max"] - y for y, r in zip(ys, points, strict=True)],
                ]
            xs = [r["load_rps"] for r in points]
            ax.errorbar(xs, ys, yerr=yerr, marker="o", capsize=3, label=policy)
    axes[0].set_title("mean end-to-end latency")
    axes[1].set_title("P99 time to first token")
    for ax in axes:
        ax.set_xlabel("load (requests/s)")
        ax.set_ylabel("seconds")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------- main
QUICK = {
    "traces": ["multi_api"],
    "loads": [1.0],
    "max_requests": 16,
    "token_scale": 0.25,
    "api_scale": 0.1,
    "kv_blocks": 40,
    "max_seconds": 90.0,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.engine_bench", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="one small run per policy (minutes)")
    p.add_argument(
        "--traces", nargs="+", default=["multi_api", "single_api"], help="names or .json paths"
    )
    p.add_argument("--loads", nargs="+", type=float, default=[0.5, 1.0, 2.0], help="requests/s")
    p.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES))
    p.add_argument(
        "--predictor",
        choices=("online", "oracle"),
        default="online",
        help="online: what a deployment runs (learned from served sessions; the default); "
        "oracle: the trace's true segment lengths and call durations, an upper bound",
    )
    p.add_argument("--model", default=str(REPO_ROOT / "models" / "tiny"))
    p.add_argument("--kv-blocks", type=int, default=40, help="KV cache blocks (32 tokens each)")
    p.add_argument("--host-swap-tokens", type=int, default=8192, help="host swap space, tokens")
    p.add_argument("--token-scale", type=float, default=0.25)
    p.add_argument("--api-scale", type=float, default=0.1)
    p.add_argument("--max-requests", type=int, default=24)
    p.add_argument(
        "--seeds",
        "--seed",
        nargs="+",
        type=int,
        default=[0],
        help="each seed samples its own requests and arrivals; every cell runs once per seed",
    )
    p.add_argument("--max-seconds", type=float, default=180.0, help="replay cap per run")
    p.add_argument("--out-dir", default=str(REPO_ROOT / "docs" / "results"))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--cost",
        nargs=3,
        type=float,
        metavar=("ITER_FIXED_S", "ITER_PER_TOKEN_S", "SWAP_S_PER_TOKEN"),
        help="fixed cost model for every run (default: measured once at the start)",
    )
    args = p.parse_args(argv)
    if args.cost is not None:
        if any(value < 0 for value in args.cost):
            p.error("--cost values must be >= 0")
        args.cost = dict(
            zip(("iter_fixed_s", "iter_per_token_s", "swap_s_per_token"), args.cost, strict=True)
        )
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.kv_blocks < 3:
        p.error("--kv-blocks must be >= 3 (one is vLLM's null block)")
    if args.max_requests < 1:
        p.error("--max-requests must be >= 1")
    if args.host_swap_tokens < 0:
        p.error("--host-swap-tokens must be >= 0")
    if args.max_seconds <= 0:
        p.error("--max-seconds must be > 0")
    if any(load <= 0 for load in args.loads):
        p.error("--loads must all be > 0")
    if len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds must be distinct")
    from policies import make_engine_policy

    for policy in args.policies:
        try:
            settings = policy_settings(policy)
            make_engine_policy(settings["policy"], **settings["policy_params"])
        except ValueError as exc:
            p.error(f"--policies {policy!r}: {exc}")
    return args


def policy_settings(spec: str) -> dict:
    """`SchedulerSettings` fields of a `--policies` entry: a policy name,
    optionally with parameters, as in ``mars:threshold_iterations=1000``
    (integers, floats and true/false are converted)."""
    name, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"parameter {item!r} is not key=value")
        params[key] = _number(value)
    return {"policy": name, "policy_params": params}


def _number(text: str) -> bool | int | float | str:
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Inherited by each run's process: keep vLLM's per-step logging quiet.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    model = Path(args.model)
    if not (model / "config.json").exists():
        print(
            f"model not found at {model}; build it with `mars-serve model build --out models/tiny`",
            file=sys.stderr,
        )
        return 2
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    count_tokens = tokenizer_counter(str(model))
    # The longest context a request may reach: what the KV cache can hold and
    # the model allows, minus headroom for the session's closing chunk.
    # vLLM keeps one block of the pool as its null block.
    usable_tokens = (args.kv_blocks - 1) * BLOCK_SIZE
    limit = min(usable_tokens, MODEL_MAX_POSITIONS) - BLOCK_SIZE
    prefix = "quick" if args.quick else "engine"
    for trace in args.traces:
        workloads: dict[int, list[TraceRequest]] = {}
        for seed in args.seeds:
            name, source = workload_source(trace, seed, count_tokens)
            # A trace's `dropped` is the same for every seed (the drop comes
            # before sampling); a generated workload's, of its last seed.
            workloads[seed], dropped = build_workload(
                source,
                token_scale=args.token_scale,
                api_scale=args.api_scale,
                max_requests=args.max_requests,
                max_total_tokens=limit,
                seed=seed,
            )
        # One engine shape for every run of the trace: room for the longest
        # request of any seed.
        longest = max(r.total_tokens for requests in workloads.values() for r in requests)
        max_model_len = min(
            MODEL_MAX_POSITIONS,
            usable_tokens,
            math.ceil((longest + BLOCK_SIZE) / BLOCK_SIZE) * BLOCK_SIZE,
        )
        num_requests = len(workloads[args.seeds[0]])
        print(
            f"\n== {name}: {num_requests} requests per seed ({dropped} longer than {limit} "
            f"tokens left out before sampling), KV {args.kv_blocks} blocks = "
            f"{args.kv_blocks * BLOCK_SIZE} tokens, max_model_len {max_model_len}",
            flush=True,
        )
        for seed, requests in workloads.items():
            print(
                f"   seed {seed}: {sum(r.num_calls for r in requests)} API calls, mean context "
                f"{sum(r.total_tokens for r in requests) / len(requests):.0f} tokens",
                flush=True,
            )
        cost = args.cost or measure_costs(str(model), args.kv_blocks, max_model_len)
        print(
            "   cost model for every run: "
            + ", ".join(f"{key} {value:.3g}" for key, value in cost.items())
            + (" (given)" if args.cost else " (measured once, shared by all runs)"),
            flush=True,
        )
        rows = []
        for seed, requests in workloads.items():
            for load in args.loads:
                offsets = arrivals(len(requests), load, seed)
                for policy in args.policies:
                    spec = RunSpec(
                        trace=name,
                        load_rps=load,
                        policy=policy,
                        requests=requests,
                        offsets=offsets,
                        model=str(model),
                        kv_blocks=args.kv_blocks,
                        max_model_len=max_model_len,
                        host_swap_tokens=args.host_swap_tokens,
                        predictor=args.predictor,
                        max_seconds=args.max_seconds,
                        token_scale=args.token_scale,
                        api_scale=args.api_scale,
                        cost=cost,
                        progress=not args.no_progress,
                        extra={"dropped_too_long": dropped, "seed": seed},
                    )
                    t = time.monotonic()
                    row = run_isolated(spec)
                    row["run_wall_s"] = time.monotonic() - t
                    rows.append(row)
                    print(
                        f"   seed {seed} {policy:<10} load {load:g}: "
                        f"{row['completed']}/{len(requests)} done, {row['run_wall_s']:.0f} s wall",
                        flush=True,
                    )
                    _write(out_dir, prefix, name, rows)
        summary = summarize(rows)
        print(f"\n{name} (completed / requests; seconds):\n{format_table(rows)}", flush=True)
        print(
            f"\n{name} over seeds {' '.join(map(str, args.seeds))} (runs: measured / all; "
            "paired: mean over seeds of mars's E2E / the other's - 1, and the seeds where "
            f"mars is lower):\n{format_summary(summary)}",
            flush=True,
        )
        png_path = out_dir / f"{prefix}_{name}.png"
        bars = ", bars min-max over seeds" if len(args.seeds) > 1 else ""
        plot(
            summary,
            png_path,
            f"{name}: {num_requests} requests, KV {args.kv_blocks} blocks, "
            f"seeds {' '.join(map(str, args.seeds))}{bars}",
        )
        print(f"wrote {out_dir / prefix}_{name}.json, _summary.json and .png", flush=True)
    return 0


def _write(out_dir: Path, prefix: str, name: str, rows: list[dict]) -> None:
    """Write the per-run rows and their summary; called after every run, so a
    sweep cut short keeps what it measured."""
    for suffix, content in (("", rows), ("_summary", summarize(rows))):
        path = out_dir / f"{prefix}_{name}{suffix}.json"
        path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
