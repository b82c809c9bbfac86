"""The Ray Serve mode mars-serve runs in: Ray's throughput-optimized data
plane with HAProxy in front of the ingress.

Ray Serve reads these variables when its processes start, so they must be in
the environment of `ray start` (or of the process whose `ray.init` starts
the local cluster), not set in a deployment. With them, HAProxy listens on
the HTTP port and forwards straight to the ingress replicas (no Python proxy
actor in the path), and replicas call each other over gRPC on their own
event loop. Measured on the 2-vCPU development machine (docs/results): a
trivial `GET /health` 10 ms -> 2.4 ms at the median, a deployment call
6.7 ms -> 3.4 ms.

A variable already set in the environment wins, so an operator can turn
any of them off (e.g. ``RAY_SERVE_ENABLE_HA_PROXY=0``).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping

SERVE_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # Throughput mode buffers 1,000 log lines per replica, and a replica that
    # stops loses what is buffered: write each line (turns, placements,
    # failures) as it comes.
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
}


def serve_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with `SERVE_ENV` added
    where not already set."""
    env = dict(os.environ if base is None else base)
    for name, value in SERVE_ENV.items():
        env.setdefault(name, value)
    return env


def freeze_startup_heap() -> None:
    """Move what a replica built at start-up (Ray, vLLM, transformers, the
    model) out of the garbage collector's reach, once its constructor is done.

    A full collection walks every tracked object: in a process that has
    imported those libraries that is a pause of tens of milliseconds, taken
    in the middle of whichever request allocated last. Frozen objects are
    still freed by reference counting; only the cyclic collector skips them.
    Cycles already unreachable are collected first, so nothing is pinned.
    """
    gc.collect()
    gc.freeze()
