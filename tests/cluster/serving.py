"""A mars-serve application on a real local Ray cluster, for the cluster
tests: started from a serving YAML, called over HTTP."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def serve_app(config: Path, port: int, num_cpus: int) -> Iterator[str]:
    """Ray, Ray Serve on `port`, and the application of the serving YAML
    `config`; its URL while the block runs, everything shut down after."""
    import ray
    from ray import serve

    from cluster.app import build_app

    ray.init(num_cpus=num_cpus, include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"config": str(config)}), name="mars", route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def call(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    """One JSON call: its status and body (an error's too)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_until(what: str, check: Callable[[], Any], timeout_s: float = 60.0) -> Any:
    """Poll `check` until it returns something true, and return that; fail
    naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.1)  # a poll's interval: the loop waits on the condition


def read_stream(chunks) -> tuple[str, dict | None, object]:
    """A streamed chat answer's text, its `mars` chunk and its usage (the
    `openai` client's chunks)."""
    text, mars, usage = "", None, None
    for chunk in chunks:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        mars = (chunk.model_extra or {}).get("mars") or mars
        usage = chunk.usage or usage
    return text, mars, usage
