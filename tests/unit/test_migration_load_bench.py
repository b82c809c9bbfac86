"""The migration-under-load benchmark's arguments, configs and summary
(`bench.migration_load`); the runs themselves need a cluster."""

from __future__ import annotations

import pytest

from bench.migration_load import format_table, p99_verdict, parse_args, with_migration
from cluster.config import ServingConfig


def _row(seed: int, mode: str, p99: float | None, **extra) -> dict:
    return {
        "seed": seed,
        "migration": mode,
        "e2e_mean_s": None if p99 is None else p99 / 2,
        "e2e_p99_s": p99,
        "ttft_p99_s": 0.5,
        "completed": 12,
        "requests": 12,
        "failed": 0,
        **extra,
    }


def test_the_verdict_compares_on_with_off_seed_by_seed() -> None:
    rows = [
        _row(0, "off", 10.0),
        _row(0, "on", 8.0, relocations={"committed": 3}),
        _row(1, "off", 10.0),
        _row(1, "on", 12.0),
        _row(
            1,
            "drain",
            11.0,
            drained=True,
            drain_s=2.5,
            drain_rounds=3,
            drain_moved=4,
            drain_moved_live=1,
        ),
        _row(2, "off", None),  # a run with no completed session has no ratio
        _row(2, "on", 9.0),
    ]
    verdict = p99_verdict(rows)
    assert "seed 0: 0.80x, seed 1: 1.20x;" in verdict
    assert verdict.endswith("lower with migration in 1 of 2 seeds")
    table = format_table(rows)
    assert "{'committed': 3}" in table
    assert "drained=True in 2.5 s, 3 rounds, 4 moved (1 live)" in table
    assert " - " in table  # the run without a P99


def test_the_policy_is_set_only_when_on() -> None:
    base = ServingConfig.model_validate(
        {"model": {"path": "m", "recipe": "r.yaml"}, "state_store": {"url": "redis://x"}}
    )
    on = with_migration(base, "on", "relocate_paused", {"min_gap": 2}, 0.5)
    assert on.migration.policy == "relocate_paused" and on.migration.params == {"min_gap": 2}
    off = with_migration(base, "off", "relocate_paused", {"min_gap": 2}, 0.5)
    assert off.migration.policy is None
    live = with_migration(base, "on", "balance_running", {"max_moves": 2}, 0.5)
    assert live.migration.policy == "balance_running"
    with pytest.raises(ValueError, match="min_gap"):
        with_migration(base, "on", "relocate_paused", {"min_gap": -1}, 0.5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--kv-blocks", "0"], "--kv-blocks must be >= 1"),
        (["--load", "0"], "--load must be > 0"),
        (["--policy-params", "{"], "--policy-params: not JSON"),
        (["--policy-params", "[1]"], "--policy-params must be a JSON object"),
        (["--modes", "sideways"], "--modes: invalid choice"),
    ],
)
def test_bad_arguments_are_named(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_a_skewed_order_alternates_heavy_and_light_sessions() -> None:
    from types import SimpleNamespace

    from bench.http_bench import Workload
    from bench.migration_load import skewed

    sizes = [10, 50, 20, 40, 30]
    workload = Workload(
        "w", [SimpleNamespace(total_tokens=n) for n in sizes], [[n] for n in sizes], 0, 64
    )
    reordered = skewed(workload)
    # heavy 50, 40, 30 and light 20, 10, interleaved: round robin puts
    # every heavy one on the first instance
    assert [r.total_tokens for r in reordered.requests] == [50, 20, 40, 10, 30]
    assert reordered.plans == [[50], [20], [40], [10], [30]]
