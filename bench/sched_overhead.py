"""Measure the per-iteration cost of each engine policy's decisions.

MARS.md asks the scheduler to stay cheap: ranking and strategy choice for
1,000 waiting requests in under 1 ms per iteration. This times, for each
registered engine policy, one scheduler iteration's worth of policy work over
`--n` waiting requests, starting from the `RequestView`s the engine builds:

- ``engine`` (default): what `MarsScheduler` does on a re-rank: each waiting
  request's packed row, priced under the cost model (`PricedRows.row`: the
  request's batch-independent waste and memory-area terms ride along), is
  cached on its record until the request changes, so an iteration joins the
  cached rows with this iteration's waited counts (`PricedRows.columns`),
  then `order(columns)`, then `choose_strategies(columns)` for every request
  (the upper bound: the engine prices only paused ones). Packing a row is
  paid once per request change, not per iteration; it is timed apart and
  printed below the table;
- ``columns``: `RequestColumns.from_views` every iteration, then the same
  calls: the policies compute every term from the columns (no cached rows);
- ``per-request``: `order(views)` plus `choose_strategy(view)` called once per
  request, the scalar path (for comparison).

Prints mean and p99 microseconds per iteration of each part and of the
whole, and whether the whole iteration's p99 stays under 1 ms.

The cost-model numbers are illustrative; the timings do not depend on them.

    python -m bench.sched_overhead --n 1000 --iters 200
"""

from __future__ import annotations

import argparse
import enum
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from policies import (
    BatchView,
    CostModel,
    EnginePolicy,
    PricedRows,
    RequestColumns,
    RequestView,
    Strategy,
    engine_policy_names,
    make_engine_policy,
)

_BUDGET_US = 1000.0


class Mode(str, enum.Enum):
    """How one iteration's policy work is done (see the module docstring)."""

    ENGINE = "engine"
    COLUMNS = "columns"
    PER_REQUEST = "per-request"


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
    """Per-iteration timings of one policy, in microseconds (mean, p99)."""

    policy: str
    columns: tuple[float, float]
    """Building the columns: `PricedRows.columns` in engine mode,
    `RequestColumns.from_views` in columns mode, 0 in per-request mode."""
    order: tuple[float, float]
    strategy: tuple[float, float]
    """Strategy choice for every waiting request."""
    total: tuple[float, float]

    @property
    def under_budget(self) -> bool:
        """Whether the p99 of a whole iteration's policy work is under 1 ms."""
        return self.total[1] < _BUDGET_US


def _iteration(
    policy: EnginePolicy,
    views: Sequence[RequestView],
    batch: BatchView,
    cost: CostModel,
    mode: Mode,
    ids: Sequence[str],
    priced: PricedRows,
    rows: Sequence[bytes],
) -> tuple[int, int, int, int]:
    """One iteration's policy work; perf_counter_ns at its start and after each part."""
    clock = time.perf_counter_ns
    start = clock()
    if mode is Mode.ENGINE:
        columns = priced.columns(ids, rows, [v.waited_iterations for v in views])
        built = clock()
        policy.order(columns, cost, batch)
        ordered = clock()
        policy.choose_strategies(columns, batch, cost)
    elif mode is Mode.COLUMNS:
        columns = RequestColumns.from_views(views)
        built = clock()
        policy.order(columns, cost, batch)
        ordered = clock()
        policy.choose_strategies(columns, batch, cost)
    else:
        built = clock()
        policy.order(views, cost, batch)
        ordered = clock()
        for view in views:
            policy.choose_strategy(view, batch, cost)
    return start, built, ordered, clock()


def time_policy(
    name: str,
    views: Sequence[RequestView],
    batch: BatchView,
    cost: CostModel,
    iters: int,
    mode: Mode = Mode.ENGINE,
) -> Timing:
    """Time `iters` iterations of policy `name`'s work over `views` in `mode`."""
    policy = make_engine_policy(name)
    ids = [v.request_id for v in views]
    priced = PricedRows(cost)
    rows = [priced.row(v) for v in views]  # cached on the records in the engine
    args = (policy, views, batch, cost, mode, ids, priced, rows)
    _iteration(*args)  # warm-up: first-call costs
    parts: list[list[float]] = [[], [], [], []]
    for _ in range(iters):
        start, built, ordered, end = _iteration(*args)
        for samples, ns in zip(
            parts, (built - start, ordered - built, end - ordered, end - start), strict=True
        ):
            samples.append(ns / 1000.0)
    return Timing(name, *(_mean_p99(samples) for samples in parts))


def row_packing_us(views: Sequence[RequestView], cost: CostModel) -> float:
    """Mean microseconds to pack one request's priced row (`PricedRows.row`):
    what the engine pays once per request change, outside the iteration."""
    priced = PricedRows(cost)
    start = time.perf_counter_ns()
    for view in views:
        priced.row(view)
    return (time.perf_counter_ns() - start) / 1000.0 / len(views)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="waiting requests per iteration")
    parser.add_argument("--iters", type=int, default=200, help="timed iterations per policy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--mode",
        choices=[m.value for m in Mode],
        default=Mode.ENGINE.value,
        help="columns: vectorized, as the policies run; per-request: the scalar path",
    )
    args = parser.parse_args(argv)
    if args.n < 1 or args.iters < 1:
        parser.error(f"--n and --iters must be >= 1, got {args.n} and {args.iters}")

    cost = CostModel(
        iter_fixed_s=0.01, iter_per_token_s=5e-5, swap_s_per_token=2e-6, kv_bytes_per_token=8e5
    )
    views = random_views(args.n, args.seed)
    batch = BatchView(running_context_tokens=60_000, free_host_tokens=100_000)
    mode = Mode(args.mode)
    print(
        f"{args.n} waiting requests, {args.iters} iterations per policy, mode {mode.value} "
        "(microseconds per iteration)"
    )
    header = ("policy", "cols_mean", "order_mean", "order_p99", "strat_mean", "strat_p99")
    header += ("mean", "p99")
    print(f"{header[0]:<10}" + "".join(f"{h:>11}" for h in header[1:]) + "  under_1ms(p99)")
    for name in engine_policy_names():
        t = time_policy(name, views, batch, cost, args.iters, mode)
        cells = (t.columns[0], *t.order, *t.strategy, *t.total)
        print(f"{t.policy:<10}" + "".join(f"{c:>11.1f}" for c in cells) + f"  {t.under_budget}")
    if mode is Mode.ENGINE:
        print(
            f"packing a request's priced row (once per request change): "
            f"{row_packing_us(views, cost):.1f} us"
        )


if __name__ == "__main__":
    main()
