"""The package's boundaries: pure imports, public surface, and order at scale."""

from __future__ import annotations

import subprocess
import sys

from bench.sched_overhead import main, random_views
from policies import BatchView, CostModel, engine_policy_names, make_engine_policy

FORBIDDEN = ("vllm", "ray", "torch", "workers", "cluster", "bench")


def test_policies_import_nothing_heavy_or_upward() -> None:
    code = (
        "import sys, policies, policies.engine_policy, policies.predictors;"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r});"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_public_surface() -> None:
    import policies

    for name in policies.__all__:
        assert hasattr(policies, name), name


def test_order_over_a_thousand_requests() -> None:
    views = random_views(1000, seed=3)
    cost = CostModel(0.01, 5e-5, 2e-6, 8e5)
    batch = BatchView(60_000, 100_000)
    ids = sorted(v.request_id for v in views)
    for name in engine_policy_names():
        policy = make_engine_policy(name)
        order = policy.order(views, cost, batch)
        assert sorted(order) == ids, name
        for view in views:
            policy.choose_strategy(view, batch, cost)


def test_sched_overhead_script_runs(capsys) -> None:  # type: ignore[no-untyped-def]
    main(["--n", "20", "--iters", "3"])
    out = capsys.readouterr().out
    for name in engine_policy_names():
        assert name in out
