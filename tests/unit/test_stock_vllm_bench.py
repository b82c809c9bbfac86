"""bench.stock_vllm's pure parts: the engine shape both systems get, rows
and the summary against stock vLLM. The benchmark itself starts servers and
is not run here."""

from __future__ import annotations

import pytest

from bench.http_bench import SessionOutcome, Workload
from bench.stock_vllm import (
    ROW_KEYS,
    STOCK,
    EngineShape,
    e2e_drift,
    error_row,
    make_row,
    measured_window,
    parse_args,
    summarize,
)

SHAPE = EngineShape("models/tiny", "tiny", 32, 40, 928, 2048, 128)


def test_stock_vllm_gets_the_same_engine_shape() -> None:
    args = SHAPE.stock_args()
    given = dict(zip(args[::2], args[1::2], strict=False))
    assert given["--num-gpu-blocks-override"] == "40"
    assert given["--block-size"] == "32"
    assert given["--max-model-len"] == "928"
    assert given["--max-num-batched-tokens"] == "2048"
    assert given["--max-num-seqs"] == "128"
    # Prefix caching and the scheduler stay at vLLM's defaults.
    assert not any("prefix" in a or "scheduler" in a for a in args)


def _workload(n: int) -> Workload:
    return Workload("multi_api", [object()] * n, [[]] * n, 0, 928)


def _done(e2e: float, ttft: float, resume=(0.1,)) -> SessionOutcome:
    return SessionOutcome("r", 2, "completed", 0.0, ttft, e2e, list(resume), ["length"] * 2)


def test_a_row_has_the_issue_keys_first_and_counts_every_session() -> None:
    outcomes = [
        _done(2.0, 0.1),
        _done(4.0, 0.3),
        SessionOutcome("r", 2, "failed", error="turn 0: HTTP 503"),
        SessionOutcome("r", 2, "running"),
    ]
    row = make_row(
        outcomes,
        workload=_workload(4),
        seed=3,
        load=6.0,
        system=STOCK,
        instances=1,
        replay_s=10.0,
        offsets=[0.0, 1.0, 2.0, 3.0],
        window=(0.0, 3.0),
    )
    assert tuple(row)[: len(ROW_KEYS)] == ROW_KEYS
    assert row["e2e_mean_s"] == pytest.approx(3.0)
    assert (row["completed"], row["failed"], row["timed_out"]) == (2, 1, 1)
    assert row["errors"] == ["turn 0: HTTP 503"]
    assert "recompute_tokens" not in row  # stock vLLM reports no MARS counters


def test_latencies_count_only_the_sessions_that_arrived_in_the_window() -> None:
    outcomes = [_done(9.0, 0.9), _done(2.0, 0.1), _done(4.0, 0.3), _done(7.0, 0.7)]
    offsets = [0.0, 10.0, 20.0, 30.0]
    window = measured_window(offsets, warmup_s=5.0, cooldown_s=5.0)
    assert window == (5.0, 25.0)
    row = make_row(
        outcomes,
        workload=_workload(4),
        seed=0,
        load=0.1,
        system=STOCK,
        instances=1,
        replay_s=40.0,
        offsets=offsets,
        window=window,
    )
    assert row["e2e_mean_s"] == pytest.approx(3.0)  # the warm-up's 9 s and the cool-down's 7 s out
    assert (row["completed"], row["measured"]) == (4, 2)
    assert row["e2e_drift"] == pytest.approx(2.0)  # 4 s in the second half against 2 s


def test_ingress_steps_are_averaged_over_the_turns_that_report_them() -> None:
    from bench.stock_vllm import phase_means

    turns = [{"record_start": 2.0, "engine_call_ack": 4.0}, {"engine_call_ack": 8.0}]
    assert phase_means(turns) == {"engine_call_ack": 6.0, "record_start": 2.0}
    assert phase_means([]) == {}


def test_a_window_that_leaves_no_session_is_refused() -> None:
    with pytest.raises(ValueError, match="--warmup-s 30 and --cooldown-s 0 leave no session"):
        measured_window([0.0, 10.0, 20.0], warmup_s=30.0, cooldown_s=0.0)


def test_drift_needs_both_halves() -> None:
    assert e2e_drift([_done(2.0, 0.1)], [1.0], (0.0, 10.0)) is None


def test_the_summary_compares_each_seed_with_stock_vllm() -> None:
    def row(system: str, seed: int, e2e: float, ttft_p99: float) -> dict:
        return {
            "workload": "w",
            "system": system,
            "seed": seed,
            "e2e_mean_s": e2e,
            "e2e_p99_s": e2e * 2,
            "ttft_mean_s": ttft_p99 / 2,
            "ttft_p99_s": ttft_p99,
            "completed": 10,
            "failed": 0,
            "sessions": 10,
        }

    rows = [
        row(STOCK, 0, 10.0, 1.0),
        row("mars-serve:mars", 0, 6.0, 0.5),
        row(STOCK, 1, 8.0, 1.0),
        row("mars-serve:mars", 1, 8.0, 2.0),
    ]
    stock, mars = summarize(rows)
    assert stock["system"] == STOCK and stock["e2e_mean_s"] == pytest.approx(9.0)
    assert mars["e2e_ratio_to_stock"] == pytest.approx([0.6, 1.0])
    assert mars["e2e_ratio_to_stock_max"] == pytest.approx(1.0)
    assert mars["ttft_p99_worse_than_stock_in_seeds"] == [1]
    assert (mars["e2e_mean_min_s"], mars["e2e_mean_max_s"]) == (6.0, 8.0)


def test_an_error_row_counts_every_session_as_failed() -> None:
    row = error_row(_workload(5), 2, 6.0, "mars-serve:mars", 1, RuntimeError("no start"))
    assert row["failed"] == 5 and row["completed"] == 0 and row["e2e_mean_s"] is None
    assert set(ROW_KEYS) <= set(row)


def test_parse_args_names_a_bad_system(capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--systems", "mars-serve:fastest"])
    assert "mars-serve:fastest" in capsys.readouterr().err
    args = parse_args(["--quick"])
    assert args.workloads == ["agent_mix"] and args.seeds == [0]


def test_a_mars_system_carries_its_policy_parameters() -> None:
    from bench.stock_vllm import mars_config
    from cluster.config import load_serving_config

    args = parse_args(["--quick"])
    base = load_serving_config("configs/serve/local-cpu-tiny.yaml")
    system = "mars-serve:mars:count_only_after_first_run=false,threshold_iterations=50"
    config = mars_config(base, system, SHAPE, "redis://127.0.0.1:1/0", 8123, args)
    assert config.policy.name == "mars"
    assert config.policy.params == {"threshold_iterations": 50, "count_only_after_first_run": False}
    assert (config.engine.num_kv_blocks, config.engine.max_num_batched_tokens) == (40, 2048)
    assert config.instances == 1 and config.dispatch.policy == "mars_aware"
    other = mars_config(base, "mars-serve:infercept", SHAPE, "redis://127.0.0.1:1/0", 8123, args)
    assert other.policy.params == {}  # the base's params are MARS's


def test_the_latency_report_compares_mars_serve_with_stock() -> None:
    from bench.stock_latency import MARS, compare, format_report

    def system(ttft_ms: float, itl_ms: float, rate: float, batch_rate: float) -> dict:
        seq = {
            "ttft_median_ms": ttft_ms,
            "ttft_mean_ms": ttft_ms,
            "ttft_p90_ms": ttft_ms,
            "itl_median_ms": itl_ms,
            "itl_mean_ms": itl_ms,
            "itl_p99_ms": itl_ms,
        }
        batch = {"decode_tokens_per_s": rate, "batch_tokens_per_s": batch_rate}
        return {"sequential": {"100": seq}, "batches": {"8": batch}}

    results = {STOCK: system(10.0, 2.0, 400.0, 300.0), MARS: system(14.0, 2.2, 380.0, 240.0)}
    c = compare(results)
    assert c["ttft_median_diff_ms"] == {"100": pytest.approx(4.0)}
    assert c["itl_median_ratio"] == {"100": pytest.approx(1.1)}
    assert c["decode_ratio"] == {"8": pytest.approx(0.95)}
    assert c["batch_ratio"] == {"8": pytest.approx(0.8)}
    text = format_report({"systems": results, "comparison": c})
    assert "decode tokens/s: 8: 0.95" in text
    assert "tokens/s over the batch: 8: 0.80" in text


def test_rerun_rows_replace_those_of_the_same_seed_and_system() -> None:
    from bench.stock_vllm import merge_rows

    kept = [
        {"seed": 0, "system": STOCK, "v": "old"},
        {"seed": 3, "system": STOCK, "v": "failed"},
        {"seed": 3, "system": "mars-serve:mars", "v": "failed"},
    ]
    new = [{"seed": 3, "system": STOCK, "v": "new"}]
    merged = merge_rows(kept, new)
    assert [(r["seed"], r["system"], r["v"]) for r in merged] == [
        (0, STOCK, "old"),
        (3, "mars-serve:mars", "failed"),
        (3, STOCK, "new"),
    ]
