"""A private, throw-away redis-server for tests and benchmarks.

Each caller gets its own server on a free port (never the machine's 6379,
which may hold someone's data), persisting nothing, stopped on exit.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from cluster.ports import free_port

START_TIMEOUT_S = 10.0


class RedisUnavailable(RuntimeError):
    """redis-server is missing or did not start."""


@contextlib.contextmanager
def local_redis_server(workdir: Path) -> Iterator[str]:
    """Start redis-server in `workdir`; yield its URL; stop it on exit."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisUnavailable("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RedisUnavailable(f"redis-server did not start on port {port}") from None
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
