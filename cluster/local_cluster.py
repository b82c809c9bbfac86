"""Bring a serving config up on Ray and take it down again (`mars-serve up /
deploy / down`).

`up` starts a local Ray head when none is running (with more logical CPUs
than cores: every engine, the scheduler and the ingress each reserve some),
deploys, waits until the endpoint answers `/ready`, and prints where to go.
What it started is remembered in a small state file so `down` stops exactly
that and nothing else.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from cluster.config import ServingConfig, load_serving_config
from cluster.ports import free_port
from cluster.serve_env import serve_env

APP_NAME = "mars"
STATE_FILE = Path(os.environ.get("MARS_SERVE_STATE", Path.home() / ".mars-serve" / "up.json"))
DASHBOARD_PORT = 8265


def logical_cpus(config: ServingConfig) -> int:
    """Enough logical CPUs for every deployment to be scheduled: the engine
    replicas' reservations (`pools[].resources.cpus`) and as much again for
    what they start, the ingress replicas and a margin."""
    engines = sum(math.ceil(pool.resources.cpus) * pool.count for pool in config.resolved_pools())
    return max(8, 2 * engines + config.http.ingress_replicas + 4)


def _ray_running() -> bool:
    result = subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "status"],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode == 0


class ClusterError(RuntimeError):
    """The local Ray cluster could not be started or reached."""


def _start_head(cpus: int) -> None:
    # Ray's default GCS port is Redis's 6379, often taken on a machine that
    # also runs the state store's Redis: let the OS pick a free one.
    port = free_port()
    print(f"[up] starting a local Ray head ({cpus} logical CPUs, GCS port {port}) ...", flush=True)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            f"--port={port}",
            f"--num-cpus={cpus}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={DASHBOARD_PORT}",
            "--disable-usage-stats",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise ClusterError(f"ray start failed (exit {result.returncode}):\n{tail}")


def deploy(config_path: Path, *, wait_s: float = 600.0) -> str:
    """Deploy the config on the running Ray cluster; return the endpoint URL."""
    import ray
    from ray import serve

    from cluster.app import build_from_config

    config = load_serving_config(config_path)
    ray.init(address="auto", ignore_reinit_error=True, log_to_driver=False)
    serve.start(http_options={"host": config.http.host, "port": config.http.port})
    engines = len(config.instance_ids())
    print(
        f"[deploy] {config_path}: {engines} engine instance(s) of {config.model.name}", flush=True
    )
    application = build_from_config(config)
    deploying = threading.Thread(
        target=serve.run,
        args=(application,),
        kwargs={"name": APP_NAME, "route_prefix": "/", "blocking": False},
        daemon=True,
    )
    deploying.start()
    _report_progress(deploying, wait_s)
    endpoint = f"http://{config.http.host}:{config.http.port}"
    _wait_ready(endpoint, wait_s)
    return endpoint


def _report_progress(deploying: threading.Thread, wait_s: float) -> None:
    """Print the deployments' states every few seconds while Serve deploys."""
    from ray import serve

    started = time.monotonic()
    while deploying.is_alive():
        deploying.join(timeout=5.0)
        elapsed = time.monotonic() - started
        if elapsed > wait_s:
            raise TimeoutError(f"the application was not deployed after {wait_s:.0f} s")
        app = serve.status().applications.get(APP_NAME)
        if app is not None and deploying.is_alive():
            states = ", ".join(
                f"{name} {status.status.value.lower()}"
                for name, status in sorted(app.deployments.items())
            )
            print(f"[deploy] {elapsed:4.0f} s: {states}", flush=True)


def _wait_ready(endpoint: str, wait_s: float) -> None:
    started = time.monotonic()
    last = ""
    while True:
        elapsed = time.monotonic() - started
        try:
            with urllib.request.urlopen(f"{endpoint}/ready", timeout=5) as response:
                body = json.loads(response.read())
                print(f"[deploy] ready after {elapsed:.0f} s: {body['instances']}", flush=True)
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            status = getattr(exc, "code", None) or type(exc).__name__
            line = f"[deploy] waiting for the engines ({elapsed:.0f} s, {status})"
            if line != last and int(elapsed) % 10 == 0:
                print(line, flush=True)
                last = line
        if elapsed > wait_s:
            raise TimeoutError(f"the application was not ready after {wait_s:.0f} s")
        time.sleep(1.0)


def up(config_path: Path) -> str:
    config = load_serving_config(config_path)
    # Inherited by the `ray start` below, and this process deploys too: its
    # Serve client runs in the cluster's mode.
    os.environ.update(serve_env())
    started_head = False
    if _ray_running():
        print("[up] using the Ray cluster already running here", flush=True)
    else:
        _start_head(logical_cpus(config))
        started_head = True
    STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
    STATE_FILE.write_text(json.dumps({"started_head": started_head, "config": str(config_path)}))
    endpoint = deploy(config_path)
    print(f"\nendpoint:  {endpoint}/v1   (OpenAI-compatible; model {config.model.name!r})")
    print(f"dashboard: http://127.0.0.1:{DASHBOARD_PORT}")
    print("stop with:  mars-serve down")
    return endpoint


def down() -> None:
    state = json.loads(STATE_FILE.read_text()) if STATE_FILE.exists() else {}
    if _ray_running():
        import ray
        from ray import serve

        ray.init(address="auto", ignore_reinit_error=True, log_to_driver=False)
        serve.delete(APP_NAME, _blocking=True)
        print(f"[down] deleted application {APP_NAME!r}", flush=True)
        if state.get("started_head"):
            # Stops Serve's HAProxy too, which `ray stop` would leave running.
            serve.shutdown()
        ray.shutdown()
    if state.get("started_head"):
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop"], check=False)
        print("[down] stopped the Ray head that `mars-serve up` started", flush=True)
    STATE_FILE.unlink(missing_ok=True)
