"""The engine benchmark's pure helpers: time breakdown, policy entries,
`--seeds`, and the summary over seeds with its paired comparison."""

from __future__ import annotations

import math

import pytest

from bench.engine_bench import (
    format_summary,
    format_table,
    paired_reductions,
    parse_args,
    policy_settings,
    summarize,
    time_breakdown,
)
from workers.lifecycle import TimelineEvent


def _timeline(*events: tuple[float, str]) -> list[TimelineEvent]:
    return [TimelineEvent(t, event) for t, event in events]


def test_time_breakdown_splits_queued_running_and_held() -> None:
    timeline = _timeline(
        (0.0, "queued"),
        (1.0, "scheduled"),  # queued 1.0
        (3.0, "paused"),  # running 2.0, then KV held
        (3.5, "demoted"),  # held 0.5
        (6.0, "resumed"),  # queued again
        (6.25, "scheduled"),  # queued 0.25
        (7.0, "preempted"),  # running 0.75
        (8.0, "scheduled"),  # queued 1.0
        (9.0, "paused"),  # running 1.0, held from here
        (9.5, "resumed"),  # held 0.5 (preserved through the whole call)
        (9.5, "scheduled"),
        (10.0, "finished"),  # running 0.5
    )
    assert time_breakdown(timeline) == {"queued": 2.25, "running": 4.25, "held": 1.0}


def test_policy_entries_carry_parameters() -> None:
    assert policy_settings("vllm") == {"policy": "vllm", "policy_params": {}}
    assert policy_settings("mars:threshold_iterations=1000,rerank_every=5") == {
        "policy": "mars",
        "policy_params": {"threshold_iterations": 1000, "rerank_every": 5},
    }
    with pytest.raises(ValueError, match="key=value"):
        policy_settings("mars:threshold_iterations")


def test_seeds_default_to_zero_and_seed_is_an_alias() -> None:
    assert parse_args([]).seeds == [0]
    assert parse_args(["--seeds", "0", "1", "2"]).seeds == [0, 1, 2]
    assert parse_args(["--seed", "1"]).seeds == [1]


def test_seeds_must_be_distinct() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--seeds", "1", "1"])


def _row(policy: str, seed: int, e2e: float | None, ttft_p99: float | None = 1.0, **extra) -> dict:
    return {
        "trace": "multi_api",
        "load_rps": 8.0,
        "policy": policy,
        "seed": seed,
        "e2e_mean_s": e2e,
        "e2e_p99_s": None if e2e is None else 2 * e2e,
        "ttft_mean_s": None if ttft_p99 is None else ttft_p99 / 2,
        "ttft_p99_s": ttft_p99,
        "completed": 10 if e2e is not None else 0,
        "requests": 10,
        **extra,
    }


ROWS = [
    _row("mars", 0, 4.0, 1.0),
    _row("mars", 1, 6.0, 3.0),
    _row("mars", 2, 11.0, 2.0),
    _row("infercept", 0, 5.0),
    _row("infercept", 1, 5.0),
    _row("infercept", 2, 10.0),
    _row("vllm", 0, 8.0),
    _row("vllm", 1, None, error="RuntimeError: boom"),
    _row("vllm", 2, None, None),  # finished no session: no latencies
]


def test_summary_means_spread_and_totals_over_seeds() -> None:
    summary = {r["policy"]: r for r in summarize(ROWS)}
    assert list(summary) == ["infercept", "mars", "vllm"]
    mars = summary["mars"]
    assert mars["e2e_mean_s"] == pytest.approx(7.0)
    assert mars["e2e_p99_s"] == pytest.approx(14.0)
    assert mars["ttft_p99_s"] == pytest.approx(2.0)
    assert mars["ttft_mean_s"] == pytest.approx(1.0)
    assert (mars["e2e_mean_s_min"], mars["e2e_mean_s_max"]) == (4.0, 11.0)
    # Deviations -3, -1, 4: sample variance (9 + 1 + 16) / 2 = 13.
    assert mars["e2e_mean_s_std"] == pytest.approx(math.sqrt(13))
    assert (mars["ttft_p99_s_min"], mars["ttft_p99_s_max"]) == (1.0, 3.0)
    assert mars["ttft_p99_s_std"] == pytest.approx(1.0)
    assert (mars["seeds"], mars["runs"], mars["failed_runs"]) == ([0, 1, 2], 3, 0)
    assert (mars["completed"], mars["requests"]) == (30, 30)


def test_summary_leaves_failed_runs_out_of_the_means() -> None:
    vllm = next(r for r in summarize(ROWS) if r["policy"] == "vllm")
    assert vllm["e2e_mean_s"] == 8.0
    assert (vllm["seeds"], vllm["runs"], vllm["failed_runs"]) == ([0], 1, 2)
    assert vllm["e2e_mean_s_std"] is None  # undefined for one run
    assert (vllm["completed"], vllm["requests"]) == (10, 30)
    assert not any(key.startswith("e2e_vs_") for key in vllm)


def test_paired_reductions_pair_runs_of_the_same_seed() -> None:
    paired = paired_reductions(ROWS)
    assert list(paired) == [("multi_api", 8.0)]
    infercept = paired[("multi_api", 8.0)]["e2e_vs_infercept"]
    assert infercept["seeds"] == [0, 1, 2]
    assert infercept["per_seed"] == pytest.approx([0.8, 1.2, 1.1])
    assert infercept["mean_reduction"] == pytest.approx(1 - 3.1 / 3)
    assert infercept["wins"] == 1
    # vllm's failed seeds 1 and 2 have nothing to pair with.
    vllm = paired[("multi_api", 8.0)]["e2e_vs_vllm"]
    assert (vllm["seeds"], vllm["per_seed"], vllm["wins"]) == ([0], [0.5], 1)
    assert vllm["mean_reduction"] == pytest.approx(0.5)


def test_summary_puts_the_paired_comparison_on_mars_rows() -> None:
    mars = next(r for r in summarize(ROWS) if r["policy"] == "mars")
    assert (
        mars["e2e_vs_infercept"] == paired_reductions(ROWS)[("multi_api", 8.0)]["e2e_vs_infercept"]
    )
    assert mars["e2e_vs_vllm"]["wins"] == 1


def test_tables_show_seeds_and_paired_changes() -> None:
    assert "seed" in format_table(ROWS).splitlines()[0]
    assert "seed" not in format_table([r for r in ROWS if r["seed"] == 0]).splitlines()[0]
    mars_line = next(
        line for line in format_summary(summarize(ROWS)).splitlines() if "mars" in line
    )
    assert "7.00 ± 3.61" in mars_line
    assert "vs infercept +3.3% (1/3)" in mars_line
    assert "vs vllm -50.0% (1/1)" in mars_line
