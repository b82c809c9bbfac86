"""Ray Serve's own `serve deploy` of the example deploy YAML, on a Ray head
started with `ray start`, answered through the `openai` client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cluster.ports import free_port

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_YAML = REPO_ROOT / "configs" / "serve" / "deploy" / "local-cpu.serve.yaml"
ENDPOINT = "http://127.0.0.1:8000"  # the example's http_options
READY_TIMEOUT_S = 600.0


def _ray_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The `ray` / `serve` CLIs of this interpreter, run from the repository
    root as the example's comments say (the YAML's paths are relative to it)."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=READY_TIMEOUT_S,
    )


def _wait_ready(deadline: float) -> dict:
    last_error = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{ENDPOINT}/ready", timeout=5) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            last_error = repr(exc)
        time.sleep(2.0)
    raise AssertionError(f"not ready after {READY_TIMEOUT_S:.0f} s: {last_error}")


@pytest.fixture()
def ray_head(smollm2_model_dir: Path):
    if smollm2_model_dir.resolve() != (REPO_ROOT / "models" / "smollm2").resolve():
        pytest.fail("the example config serves models/smollm2: build it with `make model-smollm2`")
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # what Ray 2.60's local heads use
    dashboard_port = free_port()
    started = _ray_cli(
        "ray.scripts.scripts",
        "start",
        "--head",
        f"--port={free_port()}",  # Ray's default 6379 is the state store's Redis
        "--num-cpus=8",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        "--disable-usage-stats",
        env=env,
    )
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        yield env, f"http://127.0.0.1:{dashboard_port}"
    finally:
        # Serve's own shutdown stops its HAProxy, which `ray stop` would leave running.
        _ray_cli(
            "ray.serve.scripts",
            "shutdown",
            "--yes",
            "--address",
            f"http://127.0.0.1:{dashboard_port}",
            env=env,
        )
        _ray_cli("ray.scripts.scripts", "stop", "--force", env=env)


def test_serve_deploy_of_the_example_yaml_serves_openai_clients(ray_head) -> None:
    import openai

    env, dashboard = ray_head
    deployed = _ray_cli(
        "ray.serve.scripts", "deploy", str(DEPLOY_YAML), "--address", dashboard, env=env
    )
    assert deployed.returncode == 0, deployed.stderr[-2000:]
    ready = _wait_ready(time.monotonic() + READY_TIMEOUT_S)
    assert sorted(ready["instances"]) == ["default-0", "default-1"]

    client = openai.OpenAI(base_url=f"{ENDPOINT}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=4,
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens >= 1

    status = _ray_cli("ray.serve.scripts", "status", "--address", dashboard, env=env)
    assert status.returncode == 0, status.stderr[-2000:]
    assert "status: RUNNING" in status.stdout
