"""Admission order on a real engine: MARS ranks by memory over time, the
starvation guard bounds waiting, FCFS baselines keep arrival order."""

from __future__ import annotations

import pytest

from tests.engine.helpers import mars_engine, prompt
from workers.engine import AugmentedRequest, Segment

pytestmark = pytest.mark.engine


def _first_scheduled(engine, session_id: str) -> float:
    return next(e.t for e in engine.record(session_id).timeline if e.event == "scheduled")


def _run_blocked_queue(engine, late: list[AugmentedRequest], early: AugmentedRequest) -> None:
    """One request runs (one slot), `early` queues behind it, then `late` ones."""
    engine.submit(AugmentedRequest("blocker", prompt(32, seed=1), [Segment(40)]))
    for _ in range(3):
        engine.step()
    engine.submit(early)
    for _ in range(3):
        engine.step()
    for request in late:
        engine.submit(request)
    engine.run_until_idle(timeout_s=300)


LARGE = AugmentedRequest("large", prompt(300, seed=2), [Segment(60)])


def _smalls(n: int) -> list[AugmentedRequest]:
    return [AugmentedRequest(f"small-{i}", prompt(32, seed=3 + i), [Segment(6)]) for i in range(n)]


@pytest.mark.parametrize(("policy", "small_first"), [("mars", True), ("infercept", False)])
def test_mars_admits_small_memory_over_time_before_an_earlier_large_request(
    tiny_model_dir, policy, small_first
):
    with mars_engine(tiny_model_dir, policy=policy, max_num_seqs=1, predictor="oracle") as engine:
        _run_blocked_queue(engine, _smalls(1), LARGE)
        small_before_large = _first_scheduled(engine, "small-0") < _first_scheduled(engine, "large")
        assert small_before_large is small_first


@pytest.mark.parametrize(("threshold", "max_smalls_before_large"), [(8, 1), (100_000, 10)])
def test_starving_request_is_admitted_within_the_threshold(
    tiny_model_dir, threshold, max_smalls_before_large
):
    params = {"threshold_iterations": threshold, "count_only_after_first_run": False}
    with mars_engine(
        tiny_model_dir, policy="mars", max_num_seqs=1, predictor="oracle", policy_params=params
    ) as engine:
        _run_blocked_queue(engine, _smalls(10), LARGE)
        large_at = _first_scheduled(engine, "large")
        before = sum(_first_scheduled(engine, f"small-{i}") < large_at for i in range(10))
        if threshold == 8:
            assert before <= max_smalls_before_large  # guard: jumps the queue at once
        else:
            assert before == max_smalls_before_large  # no guard: waits behind all
