"""Measure the per-iteration cost of each engine policy's decisions.

MARS.md asks the scheduler to stay cheap. This times, for each registered
engine policy, one scheduler iteration's worth of policy work over `--n`
waiting requests: `order(...)` once, plus `choose_strategy(...)` for every
request (the upper bound: the engine prices only paused ones). Prints mean
and p99 microseconds per iteration and whether each stays under 1 ms.

The cost-model numbers are illustrative; the timings do not depend on them.

    python -m bench.sched_overhead --n 1000 --iters 200
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from policies import (
    BatchView,
    CostModel,
    RequestView,
    Strategy,
    engine_policy_names,
    make_engine_policy,
)

_BUDGET_US = 1000.0


def random_views(n: int, seed: int) -> list[RequestView]:
    """`n` plausible waiting requests: mixed sizes, API calls, resumes, waits."""
    rng = random.Random(seed)
    resumed = (None, None, None, Strategy.DISCARD, Strategy.SWAP)
    views = []
    for i in range(n):
        arrival = rng.uniform(0.0, 1800.0)
        views.append(
            RequestView(
                request_id=f"req-{i}",
                arrival_s=arrival,
                context_tokens=rng.randint(16, 4096),
                predicted_decode_tokens=rng.randint(1, 500),
                predicted_api_s=None if rng.random() < 0.2 else rng.expovariate(1 / 5.0),
                predicted_api_return_tokens=rng.randint(0, 200),
                waited_iterations=rng.randint(0, 150),
                has_run=rng.random() < 0.5,
                resumed_strategy=rng.choice(resumed),
                queued_since_s=arrival + rng.uniform(0.0, 60.0),
            )
        )
    return views


def _mean_p99(samples_us: list[float]) -> tuple[float, float]:
    ordered = sorted(samples_us)
    return statistics.fmean(ordered), ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


@dataclass(frozen=True)
class Timing:
    """Per-iteration timings of one policy, in microseconds."""

    policy: str
    order_mean_us: float
    order_p99_us: float
    strategy_mean_us: float
    """`choose_strategy` for every waiting request, summed per iteration."""
    strategy_p99_us: float
    total_mean_us: float
    total_p99_us: float

    @property
    def under_budget(self) -> bool:
        """Whether the p99 of a whole iteration's policy work is under 1 ms."""
        return self.total_p99_us < _BUDGET_US


def time_policy(
    name: str, views: Sequence[RequestView], batch: BatchView, cost: CostModel, iters: int
) -> Timing:
    """Time `iters` iterations of order + choose_strategy-for-all for policy `name`."""
    policy = make_engine_policy(name)
    order_us, strategy_us, total_us = [], [], []
    clock = time.perf_counter_ns
    for _ in range(iters):
        start = clock()
        policy.order(views, cost, batch)
        mid = clock()
        for view in views:
            policy.choose_strategy(view, batch, cost)
        end = clock()
        order_us.append((mid - start) / 1000.0)
        strategy_us.append((end - mid) / 1000.0)
        total_us.append((end - start) / 1000.0)
    return Timing(name, *_mean_p99(order_us), *_mean_p99(strategy_us), *_mean_p99(total_us))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="waiting requests per iteration")
    parser.add_argument("--iters", type=int, default=200, help="timed iterations per policy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.n < 1 or args.iters < 1:
        parser.error(f"--n and --iters must be >= 1, got {args.n} and {args.iters}")

    cost = CostModel(
        iter_fixed_s=0.01, iter_per_token_s=5e-5, swap_s_per_token=2e-6, kv_bytes_per_token=8e5
    )
    views = random_views(args.n, args.seed)
    batch = BatchView(running_context_tokens=60_000, free_host_tokens=100_000)
    print(f"{args.n} waiting requests, {args.iters} iterations per policy (microseconds)")
    header = ("policy", "order_mean", "order_p99", "strat_mean", "strat_p99", "mean", "p99")
    print(f"{header[0]:<10}" + "".join(f"{h:>11}" for h in header[1:]) + "  under_1ms(p99)")
    for name in engine_policy_names():
        t = time_policy(name, views, batch, cost, args.iters)
        cells = (
            t.order_mean_us,
            t.order_p99_us,
            t.strategy_mean_us,
            t.strategy_p99_us,
            t.total_mean_us,
            t.total_p99_us,
        )
        print(f"{t.policy:<10}" + "".join(f"{c:>11.1f}" for c in cells) + f"  {t.under_budget}")


if __name__ == "__main__":
    main()
