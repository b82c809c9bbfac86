"""The paused-session migration benchmark's arguments and summary
(`bench.migration_bench`); the runs themselves need a cluster."""

from __future__ import annotations

import pytest

from bench.migration_bench import format_table, parse_args, summarize


def _row(context: int, method: str, turn_ms: float, move_ms: float | None = None) -> dict:
    return {
        "context_tokens": context,
        "method": method,
        "next_turn_ms": turn_ms,
        "move_ms": move_ms,
        "kv_bytes": 512 * context if method == "migrate" else 0,
        "loaded_tokens": context if method == "migrate" else 0,
        "computed_tokens": 17 if method != "recompute" else context + 17,
    }


def test_the_summary_gives_each_context_and_method_its_median_and_spread() -> None:
    rows = [
        _row(256, "migrate", 30.0, 20.0),
        _row(256, "migrate", 10.0, 60.0),
        _row(256, "migrate", 20.0, 40.0),
        _row(256, "recompute", 90.0),
    ]
    migrate, recompute = summarize(rows)
    assert (migrate["method"], migrate["repeats"]) == ("migrate", 3)
    assert migrate["next_turn_ms_median"] == 20.0 and migrate["next_turn_ms_range"] == [10.0, 30.0]
    assert migrate["move_ms_median"] == 40.0 and migrate["move_ms_range"] == [20.0, 60.0]
    assert recompute["move_ms_median"] is None and recompute["computed_tokens"] == [273]
    table = format_table([migrate, recompute])
    assert "40.0 (20.0-60.0)" in table and "recompute" in table


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--contexts", "256,x"], "--contexts must be integers"),
        (["--contexts", "8"], "--contexts must each be more than 8"),
        (["--repeats", "0"], "--repeats must be >= 1"),
    ],
)
def test_bad_arguments_are_refused_naming_them(argv, message, capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err
