"""The live-migration downtime benchmark's arguments, engine shape and
summary (`bench.migration_downtime`); its runs need two engines."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.migration_downtime import (
    GENERATED_BEFORE_MOVE,
    TOTAL_TOKENS,
    engine_config,
    parse_args,
    summarize,
)


def _row(context: int, method: str, downtime_ms: float) -> dict:
    return {"context_tokens": context, "method": method, "downtime_ms": downtime_ms,
            "identical": True}  # fmt: skip


def test_the_summary_checks_the_issues_two_goals() -> None:
    rows = [
        _row(256, "migrate", 10.0),
        _row(256, "migrate", 30.0),
        _row(256, "blocking_copy", 20.0),
        _row(256, "recompute", 15.0),
        _row(4096, "migrate", 14.0),
        _row(4096, "blocking_copy", 200.0),
        _row(4096, "recompute", 90.0),
    ]
    summary = summarize(rows)
    assert summary["median_downtime_ms"]["256"]["migrate"] == 20.0
    assert summary["goals"]["migrate_large_over_small"] == pytest.approx(0.7)
    assert summary["goals"]["migrate_over_recompute_at_largest"] == pytest.approx(14 / 90)
    assert summary["goals"]["met"] is True and summary["all_identical"] is True
    rows.append(_row(4096, "migrate", 100.0))  # median 57: 2.85x, and over a third
    assert summarize(rows)["goals"]["met"] is False


def test_the_engines_fit_the_request_and_nothing_more() -> None:
    config = engine_config(Path("/models/m"), 4096)
    longest = 4096 - GENERATED_BEFORE_MOVE + TOTAL_TOKENS
    assert longest <= config["max_model_len"] < longest + 32
    assert config["max_model_len"] % config["block_size"] == 0
    assert config["host_swap_tokens"] >= longest


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--contexts", "a"], "--contexts must be integers"),
        (["--contexts", "16"], "--contexts must each be more than"),
        (["--stages", "0"], "--repeats and --stages must be >= 1"),
    ],
)
def test_bad_arguments_are_refused_naming_them(argv, message, capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err
