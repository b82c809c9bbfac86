"""The serving config schema and `mars-serve validate`: every error names the
file and the field; the example configs are valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.cli import main
from cluster.config import EngineSettings, load_serving_config
from workers.yaml_config import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "configs" / "serve").glob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "app.yaml"
    path.write_text(text)
    return path


MINIMAL = "model:\n  path: m\n  recipe: r.yaml\n"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_are_valid(path: Path) -> None:
    config = load_serving_config(path)
    assert config.instance_ids()


def test_relative_paths_are_taken_from_the_config_file(tmp_path: Path) -> None:
    config = load_serving_config(_write(tmp_path, MINIMAL))
    assert config.model.path == str(tmp_path / "m")
    assert config.model.recipe == str(tmp_path / "r.yaml")
    assert config.instance_ids() == ["default-0"]
    assert config.policy.name == "mars" and config.state_store.url is None


def test_pools_give_addressable_instances(tmp_path: Path) -> None:
    text = MINIMAL + "pools:\n  - name: big\n    count: 2\n    engine:\n      num_kv_blocks: 9\n"
    config = load_serving_config(_write(tmp_path, text))
    assert config.instance_ids() == ["big-0", "big-1"]
    merged = config.engine.merged(config.resolved_pools()[0].engine)
    assert merged.num_kv_blocks == 9


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (MINIMAL + "engine:\n  block_size: 48\n", "engine.block_size: block_size must be"),
        (MINIMAL + "engine:\n  blocks: 3\n", "engine.blocks: unknown field (allowed: block_size"),
        (MINIMAL + "policy:\n  name: fifo\n", "policy.name: unknown engine policy 'fifo'"),
        (MINIMAL + "instances: 0\n", "instances: Input should be greater than or equal to 1"),
        (MINIMAL + "state_store:\n  url: http://x\n", "state_store.url: url must start with"),
        (MINIMAL + "tools:\n  - name: t\n    kind: magic\n", "tools.0.kind"),
        (MINIMAL + "instances: 2\npools:\n  - name: a\n", "either instances (2) or pools"),
        (MINIMAL + "pools:\n  - name: a\n  - name: a\n", "duplicate pool names ['a']"),
        (MINIMAL + "http:\n  port: 70000\n", "http.port"),
        (MINIMAL + "dispatch:\n  policy: random\n", "unknown dispatch policy 'random'"),
        (MINIMAL + "migration:\n  policy: llumnix\n", "unknown migration policy 'llumnix'"),
        (
            MINIMAL + "migration:\n  policy: relocate_paused\n  params: {max_moves: 0}\n",
            "migration policy 'relocate_paused': max_moves must be an int >= 1",
        ),
        (MINIMAL + "migration:\n  params: {min_gap: 1}\n", "params ['min_gap'] given without"),
        (MINIMAL + "migration:\n  interval_s: 0\n", "migration.interval_s"),
        (MINIMAL + "migration:\n  policy: relocate_paused\n", "give state_store.url (Redis)"),
        ("model:\n  path: /nonexistent/model\n", "does not exist and no model.recipe"),
        ("- just a list\n", "must be a mapping"),
        ("model: [\n", "not valid YAML"),
    ],
)
def test_errors_name_the_file_and_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_serving_config(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="serving config not found"):
        load_serving_config(tmp_path / "nope.yaml")


def test_validate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(_write(tmp_path, MINIMAL))]) == 0
    assert "valid" in capsys.readouterr().out
    bad = _write(tmp_path, MINIMAL + "engine:\n  dtype: int4\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mars-serve: error: ") and "engine.dtype" in err


def test_engine_settings_merge_keeps_unset_fields() -> None:
    base = EngineSettings(block_size=64, num_kv_blocks=10)
    assert base.merged(EngineSettings(num_kv_blocks=5)) == EngineSettings(
        block_size=64, num_kv_blocks=5
    )
    assert base.merged(None) is base


def test_several_ingress_replicas_need_a_shared_state_store(tmp_path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("model: {path: m, recipe: r.yaml}\nhttp: {ingress_replicas: 2}\n")
    with pytest.raises(ConfigError, match=r"state_store\.url"):
        load_serving_config(path)
