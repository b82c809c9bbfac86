"""Prometheus metrics of a mars-serve application, through Ray's metrics API.

Every metric of the application is defined here, named ``mars_*``. They are
`ray.serve.metrics` objects, which add the ``deployment``, ``replica`` and
``application`` tags; Ray's metrics agent on each node exports them on the
node's metrics export port with Ray's ``ray_`` prefix (``ray_mars_ttft_seconds``;
counters also get ``_total``), where Prometheus scrapes them and the Ray
dashboard's Metrics view reads them (docs/observability.md).

Each deployment owns one recorder: `IngressMetrics`, `DispatchMetrics` or
`EngineMetrics`. With ``metrics: false`` in the serving config the
deployments build none of them, so no metric object exists at all.

Where latency is measured: TTFT, end-to-end latency and time per output token
are recorded by the ingress, once per client turn. The ingress is the one
place that sees a turn whole: it starts the clock when the HTTP request
arrives, so the time includes placement by the global scheduler, the Ray
hops and the engine's queueing (restoring a discarded or swapped session's
KV included), which is what MARS scheduling changes and what a client waits
for. The engine knows its own first-token time too, but from its enqueue
only, and it never sees placement. Server-side plans (``mars.plan``) are not
turns: their response reports the engine's ``ttft_s`` and ``e2e_s`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ray.serve.metrics import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from cluster.migration import Migration

from policies import Strategy

LATENCY_BUCKETS_S: list[float] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
]  # fmt: skip
"""Histogram bucket bounds for TTFT and end-to-end latency (seconds): from a
tiny model on a warm GPU to a long turn on a loaded CPU."""

TPOT_BUCKETS_S: list[float] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
]  # fmt: skip
"""Histogram bucket bounds for time per output token (seconds)."""

PAUSED_SESSION_KEYS: Mapping[Strategy, str] = {
    Strategy.PRESERVE: "paused_preserved_sessions",
    Strategy.DISCARD: "paused_discarded_sessions",
    Strategy.SWAP: "paused_swapped_sessions",
}
"""The load-snapshot key that counts paused sessions of each KV strategy."""


@dataclass(frozen=True)
class TurnTiming:
    """When one turn started, produced its first token and ended, as the
    ingress saw it (monotonic seconds), and how many tokens it produced."""

    started_s: float
    first_token_s: float | None
    """None when no token arrived before the end (nothing to time)."""
    ended_s: float
    output_tokens: int

    @property
    def ttft_s(self) -> float | None:
        """Time to first token."""
        return None if self.first_token_s is None else self.first_token_s - self.started_s

    @property
    def e2e_s(self) -> float:
        """End-to-end latency of the turn."""
        return self.ended_s - self.started_s

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (vLLM's definition: the
        decode time over the tokens that followed the first); None with fewer
        than two tokens."""
        if self.first_token_s is None or self.output_tokens < 2:
            return None
        return (self.ended_s - self.first_token_s) / (self.output_tokens - 1)


def dispatch_reason(affinity: str | None, chosen: str) -> str:
    """The ``reason`` tag of a dispatch decision.

    The policies' own reasons are free text with scores in them (good for
    logs, unbounded as a tag), so the tag says instead what happened to the
    session's affinity: ``affinity`` (kept on the instance that holds its KV),
    ``moved`` (it had one but went elsewhere: that instance was unhealthy, or
    the policy ignores affinity) or ``new`` (no affinity: a new session or a
    sessionless request).
    """
    if affinity is None:
        return "new"
    return "affinity" if affinity == chosen else "moved"


PAUSED_GAUGE = "mars_paused_sessions"
INSTANCE_GAUGES: Mapping[str, str] = {
    "mars_requests_waiting": "Requests ready to run, waiting for admission.",
    "mars_requests_running": "Requests in the running batch.",
    "mars_kv_capacity_blocks": "KV-cache blocks on the device.",
    "mars_kv_used_blocks": "KV-cache blocks in use (running and preserved paused sessions).",
    "mars_kv_usage_ratio": "Fraction of the device's KV-cache blocks in use.",
    PAUSED_GAUGE: "Paused sessions, tagged by where their KV is (strategy).",
}
"""Every per-instance gauge and its description; all are tagged by instance,
`PAUSED_GAUGE` also by strategy."""


def instance_gauges(snapshot: Mapping[str, float]) -> list[tuple[str, dict[str, str], float]]:
    """The per-instance gauge values of an engine's load snapshot
    (`MarsScheduler.load_snapshot`): ``(metric name, extra tags, value)``."""
    total = snapshot["total_blocks"]
    used = total - snapshot["free_blocks"]
    values: list[tuple[str, dict[str, str], float]] = [
        ("mars_requests_waiting", {}, snapshot["waiting"]),
        ("mars_requests_running", {}, snapshot["running"]),
        ("mars_kv_capacity_blocks", {}, total),
        ("mars_kv_used_blocks", {}, used),
        ("mars_kv_usage_ratio", {}, used / total if total else 0.0),
    ]
    for strategy, key in PAUSED_SESSION_KEYS.items():
        values.append((PAUSED_GAUGE, {"strategy": strategy.value}, snapshot[key]))
    return values


class MigrationMetrics:
    """Moves of paused sessions: by the ingress (an operator's moves and
    drains) and by the global scheduler (its migration policy)."""

    def __init__(self) -> None:
        self._migrations = Counter(
            "mars_migrations",
            description="Moves of sessions between instances, by outcome, reason and kind "
            "(paused: a session waiting on its client; live: a running turn).",
            tag_keys=("outcome", "reason", "kind"),
        )
        self._stopped_s = Histogram(
            "mars_migration_stopped_seconds",
            description="A committed live move's stop to its hand-over: the turn generated "
            "nothing then.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("reason",),
        )
        self._stages = Counter(
            "mars_migration_stages",
            description="KV copies of committed live moves (the last one after the stop).",
            tag_keys=("reason",),
        )
        self._migration_s = Histogram(
            "mars_migration_seconds",
            description="Time of a committed move (a paused session's export, import and "
            "commit; a live move's stages, stop, commit and hand-over).",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("reason",),
        )
        self._migrated_bytes = Counter(
            "mars_migrated_kv_bytes",
            description="KV bytes moved with sessions between instances.",
            tag_keys=("reason",),
        )

    def observe(self, migration: Migration, reason: str) -> None:
        """One move of a session, whatever its outcome."""
        kind = "live" if migration.live else "paused"
        self._migrations.inc(
            1, {"outcome": migration.outcome.value, "reason": reason, "kind": kind}
        )
        if migration.outcome.value == "committed":
            self._migration_s.observe(migration.seconds, {"reason": reason})
            # Ray's counters refuse an increment of 0 (a move that carried no
            # KV: its source had discarded it, or a turn not yet prefilled).
            if migration.kv_bytes > 0:
                self._migrated_bytes.inc(migration.kv_bytes, {"reason": reason})
            if migration.live and migration.stages > 0:
                self._stages.inc(migration.stages, {"reason": reason})
                if migration.stopped_s is not None:
                    self._stopped_s.observe(migration.stopped_s, {"reason": reason})


class IngressMetrics:
    """Per-turn latency histograms, tagged by instance and engine policy."""

    def __init__(self, engine_policy: str) -> None:
        tags = ("instance", "policy")
        self._ttft = Histogram(
            "mars_ttft_seconds",
            description="Time to first token of a turn, from the ingress receiving it.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=tags,
        )
        self._e2e = Histogram(
            "mars_e2e_latency_seconds",
            description="End-to-end latency of a turn, from the ingress receiving it.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=tags,
        )
        self._tpot = Histogram(
            "mars_time_per_output_token_seconds",
            description="Time per output token after the first, per turn.",
            boundaries=TPOT_BUCKETS_S,
            tag_keys=tags,
        )
        self._policy = engine_policy
        self.migrations = MigrationMetrics()

    def observe_migration(self, migration: Migration, reason: str) -> None:
        """One move of a paused session an operator asked for, whatever its outcome."""
        self.migrations.observe(migration, reason)

    def observe_turn(self, instance_id: str, timing: TurnTiming) -> None:
        # Each call gets its own tags dict: Serve's `observe` adds to the one it is given.
        self._e2e.observe(timing.e2e_s, {"instance": instance_id, "policy": self._policy})
        if timing.ttft_s is not None:
            self._ttft.observe(timing.ttft_s, {"instance": instance_id, "policy": self._policy})
        if timing.tpot_s is not None:
            self._tpot.observe(timing.tpot_s, {"instance": instance_id, "policy": self._policy})


class DispatchMetrics:
    """The global scheduler's placement decisions."""

    def __init__(self, dispatch_policy: str) -> None:
        self._decisions = Counter(
            "mars_dispatch_decisions",
            description="Placement decisions of the global scheduler.",
            tag_keys=("policy", "instance", "reason"),
        )
        self._policy = dispatch_policy

    def record(self, instance_id: str, reason: str) -> None:
        """Count one decision; `reason` is a `dispatch_reason` tag value."""
        self._decisions.inc(1, {"policy": self._policy, "instance": instance_id, "reason": reason})


class EngineMetrics:
    """One engine instance's queue, paused-session and KV gauges.

    A Ray worker reports a gauge only if it was set since its last report, and
    the node's metrics agent forgets a gauge missing from two reports, so the
    engine deployment publishes a snapshot every second, idle or not.
    """

    def __init__(self, instance_id: str) -> None:
        self._instance_id = instance_id
        self._gauges = {
            name: Gauge(
                name,
                description=description,
                tag_keys=("instance", "strategy") if name == PAUSED_GAUGE else ("instance",),
            )
            for name, description in INSTANCE_GAUGES.items()
        }

    def publish(self, snapshot: Mapping[str, float]) -> None:
        """Set every gauge from one load snapshot of this instance."""
        for name, tags, value in instance_gauges(snapshot):
            self._gauges[name].set(value, {"instance": self._instance_id, **tags})
