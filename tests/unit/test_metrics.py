"""Metrics and logging helpers of the Serve deployments, without a Ray cluster.

Ray's metric objects can be built and recorded into outside a cluster (they
export nothing then), which is enough to check that every record call gives
every tag a metric declares: Ray raises on a missing one.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest

from cluster.global_scheduler import GlobalScheduler
from cluster.logs import NO_REQUEST, request_id, serve_logger
from cluster.metrics import (
    INSTANCE_GAUGES,
    PAUSED_GAUGE,
    PAUSED_SESSION_KEYS,
    DispatchMetrics,
    EngineMetrics,
    IngressMetrics,
    TurnTiming,
    dispatch_reason,
    instance_gauges,
)
from policies import InstanceLoad, Strategy


def snapshot(**overrides: int) -> dict[str, float]:
    """An instance's load as the engine reports it (`InstanceLoad`'s fields)."""
    load = InstanceLoad(
        instance_id="default-0",
        total_blocks=64,
        free_blocks=40,
        running=3,
        waiting=2,
        waiting_demand_blocks=5,
        paused_preserved_blocks=8,
        paused_released_blocks=4,
        paused_preserved_sessions=2,
        paused_discarded_sessions=1,
        paused_swapped_sessions=0,
    )
    return vars(dataclasses.replace(load, **overrides))


# --- turn timing -----------------------------------------------------------


def test_turn_timing_follows_vllm_definitions() -> None:
    timing = TurnTiming(started_s=10.0, first_token_s=10.5, ended_s=12.5, output_tokens=5)
    assert timing.ttft_s == pytest.approx(0.5)
    assert timing.e2e_s == pytest.approx(2.5)
    # Four tokens followed the first one, in 2 s.
    assert timing.tpot_s == pytest.approx(0.5)


@pytest.mark.parametrize("tokens", [0, 1])
def test_no_time_per_token_with_fewer_than_two_tokens(tokens: int) -> None:
    timing = TurnTiming(started_s=0.0, first_token_s=0.2, ended_s=0.3, output_tokens=tokens)
    assert timing.tpot_s is None
    assert timing.ttft_s == pytest.approx(0.2)


def test_no_ttft_without_a_first_token() -> None:
    timing = TurnTiming(started_s=0.0, first_token_s=None, ended_s=1.0, output_tokens=3)
    assert timing.ttft_s is None and timing.tpot_s is None
    assert timing.e2e_s == pytest.approx(1.0)


# --- dispatch reason -------------------------------------------------------


@pytest.mark.parametrize(
    ("affinity", "chosen", "reason"),
    [
        (None, "default-0", "new"),
        ("default-1", "default-1", "affinity"),
        ("default-1", "default-0", "moved"),
    ],
)
def test_dispatch_reason(affinity: str | None, chosen: str, reason: str) -> None:
    assert dispatch_reason(affinity, chosen) == reason


# --- instance gauges -------------------------------------------------------


def test_instance_gauges_from_a_load_snapshot() -> None:
    values = {
        (name, tuple(tags.items())): value for name, tags, value in instance_gauges(snapshot())
    }
    assert values == {
        ("mars_requests_waiting", ()): 2,
        ("mars_requests_running", ()): 3,
        ("mars_kv_capacity_blocks", ()): 64,
        ("mars_kv_used_blocks", ()): 24,
        ("mars_kv_usage_ratio", ()): pytest.approx(24 / 64),
        (PAUSED_GAUGE, (("strategy", "preserve"),)): 2,
        (PAUSED_GAUGE, (("strategy", "discard"),)): 1,
        (PAUSED_GAUGE, (("strategy", "swap"),)): 0,
    }


def test_every_instance_gauge_is_defined_once() -> None:
    names = {name for name, _, _ in instance_gauges(snapshot())}
    assert names == set(INSTANCE_GAUGES)
    assert all(name.startswith("mars_") for name in names)


def test_kv_usage_of_an_instance_without_blocks_is_zero() -> None:
    gauges = {
        name: value
        for name, _, value in instance_gauges(
            snapshot(total_blocks=0, free_blocks=0, paused_preserved_blocks=0)
        )
    }
    assert gauges["mars_kv_usage_ratio"] == 0.0


def test_paused_session_keys_are_instance_load_fields() -> None:
    fields = {f.name for f in dataclasses.fields(InstanceLoad)}
    assert set(PAUSED_SESSION_KEYS) == set(Strategy)
    assert set(PAUSED_SESSION_KEYS.values()) <= fields


# --- recorders (Ray metric objects, no cluster) ----------------------------


def test_recorders_give_every_declared_tag() -> None:
    IngressMetrics("mars").observe_turn(
        "default-0", TurnTiming(started_s=0.0, first_token_s=0.1, ended_s=0.5, output_tokens=4)
    )
    DispatchMetrics("mars_aware").record("default-0", "new")
    EngineMetrics("default-0").publish(snapshot())


def test_metrics_off_builds_no_recorder() -> None:
    scheduler = GlobalScheduler({}, {"policy": "round_robin"}, metrics=False)
    assert scheduler.placer._metrics is None
    assert isinstance(
        GlobalScheduler({}, {"policy": "round_robin"}, metrics=True).placer._metrics,
        DispatchMetrics,
    )


# --- logging ---------------------------------------------------------------


def test_request_id_outside_a_serve_request() -> None:
    assert request_id() == NO_REQUEST


def test_request_id_inside_a_serve_request() -> None:
    from ray.serve import context

    token = context._serve_request_context.set(context._RequestContext(request_id="req-42"))
    try:
        assert request_id() == "req-42"
    finally:
        context._serve_request_context.reset(token)


def test_serve_logger_lands_in_ray_serve_logs() -> None:
    logger = serve_logger("cluster.ingress")
    assert logger.name == "ray.serve.cluster.ingress"
    assert logger.parent is logging.getLogger("ray.serve")


def test_a_move_that_carried_no_kv_is_counted_without_a_zero_increment() -> None:
    """Ray's counters raise on an increment of 0: a committed move with no
    KV (discarded at its source) once turned a whole drain round into an
    HTTP 400."""
    from unittest import mock

    from cluster import metrics
    from cluster.migration import Migration, MigrationOutcome

    def counter(name: str, **_: object) -> mock.Mock:
        def inc(value: float = 1.0, tags: dict | None = None) -> None:
            if value <= 0:
                raise ValueError(f"value must be >0, got {value}")  # as Ray's Counter.inc

        return mock.Mock(inc=mock.Mock(side_effect=inc))

    with mock.patch.multiple(metrics, Counter=counter, Histogram=mock.Mock()):
        recorder = metrics.MigrationMetrics()
    for live in (False, True):
        moved = Migration("s", "a", "b", MigrationOutcome.COMMITTED, live=live, stopped_s=0.1)
        recorder.observe(moved, "drain")
