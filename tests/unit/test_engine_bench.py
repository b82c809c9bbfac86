"""The engine benchmark's pure helpers: time breakdown and policy entries."""

from __future__ import annotations

import pytest

from bench.engine_bench import policy_settings, time_breakdown
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
    assert policy_settings("mars:threshold_iterations=1000,quantum_iterations=5") == {
        "policy": "mars",
        "policy_params": {"threshold_iterations": 1000, "quantum_iterations": 5},
    }
    with pytest.raises(ValueError, match="key=value"):
        policy_settings("mars:threshold_iterations")
