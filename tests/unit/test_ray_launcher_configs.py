"""The Ray cluster-launcher YAMLs of configs/ray/, validated offline.

`ray up` validates a YAML with `prepare_config` (which merges in the
provider's defaults) and `validate_config` (the wheel's ray-schema.json, plus
a few cross-field checks) before it contacts any cloud; these tests run the
same two calls. Both are private API of `ray.autoscaler._private.util`: Ray
is pinned to 2.60.0 in pyproject.toml, and an upgrade that moves them fails
here first. What the schema cannot see (AWS instance types, GCP images,
ssh access) is first checked by `ray up` itself, which has not run here.
"""

from __future__ import annotations

import copy
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from cluster.serve_env import SERVE_ENV

REPO = Path(__file__).resolve().parents[2]
LAUNCHER_YAMLS = sorted((REPO / "configs" / "ray").glob("*.yaml"))
START_COMMANDS = ("head_start_ray_commands", "worker_start_ray_commands")


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _ray_start_commands(config: dict[str, Any]) -> list[str]:
    """Every start command that runs `ray start`, head's and workers'."""
    return [c for key in START_COMMANDS for c in config[key] if "ray start" in c]


def _env_before_ray_start(command: str) -> dict[str, str]:
    """The ``NAME=VALUE`` words of `command` before its ``ray start``."""
    words = shlex.split(command.split("ray start")[0].replace(";", " "))
    return dict(w.split("=", 1) for w in words if "=" in w and w.split("=", 1)[0].isupper())


def test_there_are_local_aws_and_gcp_configs() -> None:
    providers = {_load(p)["provider"]["type"] for p in LAUNCHER_YAMLS}
    assert providers == {"local", "aws", "gcp"}


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_passes_rays_own_validation(path: Path) -> None:
    prepared = prepare_config(_load(path))
    validate_config(prepared)
    # Our start commands replace the provider's defaults, not merge with them.
    for key in START_COMMANDS:
        assert prepared[key] == _load(path)[key]


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_every_ray_start_has_the_serve_environment(path: Path) -> None:
    """Drift guard: a variable added to cluster/serve_env.py fails here until
    every `ray start` of every launcher YAML sets it."""
    config = _load(path)
    commands = _ray_start_commands(config)
    assert len(commands) == 2, f"{path.name}: one head and one worker `ray start`"
    for command in commands:
        env = _env_before_ray_start(command)
        missing = {k: v for k, v in SERVE_ENV.items() if env.get(k) != v}
        assert not missing, f"{path.name}: `{command}` lacks {missing} (cluster/serve_env.py)"


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_ray_starts_in_the_synced_checkout(path: Path) -> None:
    """The Serve deploy YAMLs name their serving config relative to the
    checkout, and Ray's workers inherit `ray start`'s working directory."""
    config = _load(path)
    (checkout,) = [remote for remote, local in config["file_mounts"].items() if local == "."]
    assert any("pip install" in c for c in config["setup_commands"])
    for command in _ray_start_commands(config):
        assert command.startswith(f"cd {checkout} &&"), command
        assert "--metrics-export-port=8080" in command, command


def test_a_wrong_field_fails_with_its_path() -> None:
    config = _load(REPO / "configs" / "ray" / "aws-gpu.yaml")
    broken = copy.deepcopy(config)
    broken["available_node_types"]["ray.worker.l4"]["min_worker"] = 1  # typo of min_workers
    with pytest.raises(jsonschema.ValidationError) as caught:
        validate_config(prepare_config(broken))
    assert list(caught.value.absolute_path) == ["available_node_types", "ray.worker.l4"]
    assert "'min_worker' was unexpected" in caught.value.message
    assert "['available_node_types']['ray.worker.l4']" in str(caught.value)


def test_a_wrong_type_fails_with_its_path() -> None:
    config = _load(REPO / "configs" / "ray" / "gcp-gpu.yaml")
    config["available_node_types"]["ray_worker_l4"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError) as caught:
        validate_config(prepare_config(config))
    assert list(caught.value.absolute_path) == [
        "available_node_types",
        "ray_worker_l4",
        "resources",
        "GPU",
    ]
