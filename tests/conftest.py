"""Shared fixtures for the mars-serve test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO_ROOT / "configs" / "model" / "tiny.yaml"


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
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    """A real redis-server of our own on a free port (never the machine's 6379)."""
    import shutil
    import socket
    import subprocess
    import time

    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.05)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
