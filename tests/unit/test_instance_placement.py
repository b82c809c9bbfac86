"""GPU placement: what each engine instance asks Ray for (`cluster.instance_placement`),
the serving config's checks of it, and `mars-serve validate --plan`. No GPU
runs here: the plan is checked as data, and against Ray Serve's own
validation of deployment options."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.cli import main
from cluster.config import InstanceResources, load_serving_config
from cluster.instance_placement import instance_placement, pool_placements
from workers.yaml_config import ConfigError

REPO = Path(__file__).resolve().parents[2]
GPU_EXAMPLE = REPO / "configs" / "serve" / "gpu-tensor-parallel.yaml"
MINIMAL = "model:\n  path: m\n  recipe: r.yaml\n"


def test_a_cpu_instance_reserves_cpus_only() -> None:
    placement = instance_placement(InstanceResources(), 1)
    assert placement.deployment_options() == {"ray_actor_options": {"num_cpus": 1.0}}
    assert placement.node_needs() == {"CPU": 1.0}


def test_a_single_gpu_instance_takes_its_gpu_in_the_replica() -> None:
    resources = InstanceResources(cpus=2, gpus=1, accelerator_type="L4")
    options = instance_placement(resources, 1).deployment_options()
    assert options == {
        "ray_actor_options": {"num_cpus": 2.0, "num_gpus": 1, "accelerator_type": "L4"}
    }


def test_a_tensor_parallel_instance_is_a_strictly_packed_group_of_gpu_bundles() -> None:
    resources = InstanceResources(cpus=2, gpus=4, accelerator_type="H100")
    placement = instance_placement(resources, 4)
    options = placement.deployment_options()
    pinned = {"GPU": 1, "accelerator_type:H100": 0.001}
    assert options["placement_group_bundles"] == [{"CPU": 2.0, **pinned}] + [pinned] * 3
    assert options["placement_group_strategy"] == "STRICT_PACK"
    # The replica sits in the first bundle; vLLM's Ray workers take the GPUs.
    assert options["ray_actor_options"] == {"num_cpus": 2.0}
    assert placement.node_needs() == {"CPU": 2.0, "GPU": 4}


def test_the_application_deploys_the_plan(tmp_path: Path) -> None:
    """Ray Serve's own checks of the options (the replica must fit its
    first bundle) pass, and each engine deployment carries its pool's plan."""
    from cluster.app import build_from_config, engine_config

    config = load_serving_config(GPU_EXAMPLE)
    app = build_from_config(config)
    engines = app._bound_deployment.init_args[2]
    sharded = engines["sharded-0"]._bound_deployment
    assert sharded._replica_config.placement_group_strategy == "STRICT_PACK"
    assert len(sharded._replica_config.placement_group_bundles) == 2
    single = engines["single-1"]._bound_deployment
    assert single.ray_actor_options["num_gpus"] == 1
    assert single._replica_config.placement_group_bundles is None
    args = engine_config(config, "sharded")
    assert (args["tensor_parallel_size"], args["enforce_eager"]) == (2, False)
    assert args["memory_fraction"] == 0.85  # the pool's own, over the GPU default
    assert engine_config(config, "single")["memory_fraction"] == 0.9


def test_cpu_pools_keep_the_cpu_defaults() -> None:
    from cluster.app import engine_config

    config = load_serving_config(REPO / "configs" / "serve" / "local-cpu-tiny.yaml")
    args = engine_config(config, "default")
    assert "enforce_eager" not in args and "memory_fraction" not in args  # EngineConfig's
    assert pool_placements(config)["default"].deployment_options() == {
        "ray_actor_options": {"num_cpus": 1.0}
    }


def test_custom_resources_pin_an_instance_to_the_nodes_that_offer_them() -> None:
    placement = instance_placement(InstanceResources(custom={"zone_a": 1}), 1)
    assert placement.deployment_options() == {
        "ray_actor_options": {"num_cpus": 1.0, "resources": {"zone_a": 1}}
    }
    assert placement.node_needs() == {"CPU": 1.0, "zone_a": 1}
    sharded = instance_placement(InstanceResources(gpus=2, custom={"zone_a": 1}), 2)
    first, second = sharded.deployment_options()["placement_group_bundles"]
    assert first == {"CPU": 1.0, "GPU": 1, "zone_a": 1} and second == {"GPU": 1}


def _pool(resources: str, engine: str = "") -> str:
    return MINIMAL + f"pools:\n  - name: g\n    resources:\n{resources}{engine}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            _pool("      gpus: 2\n"),
            "pools[0].resources.gpus is 2 but the pool's engine.tensor_parallel_size is 1",
        ),
        (
            _pool("      cpus: 1\n", "    engine:\n      tensor_parallel_size: 2\n"),
            "engine.tensor_parallel_size is 2 but pools[0].resources.gpus is 0",
        ),
        (
            MINIMAL + "engine:\n  tensor_parallel_size: 2\n",
            "`instances` gives CPU engines (use pools with resources.gpus)",
        ),
        (_pool("      gpus: 1\n      accelerator_type: Z80\n"), "unknown accelerator_type 'Z80'"),
        (_pool("      accelerator_type: L4\n"), "accelerator_type 'L4' is given but gpus is 0"),
        (_pool("      gpu: 1\n"), "pools.0.resources.gpu: unknown field"),
        (_pool("      cpus: 0\n"), "pools.0.resources.cpus"),
        (_pool("      custom: {GPU: 1}\n"), "custom resource 'GPU': give cpus, gpus"),
        (_pool("      custom: {zone_a: 0}\n"), "custom resource 'zone_a' must be > 0"),
    ],
)
def test_bad_placement_is_refused_naming_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "app.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_serving_config(path)
    assert message in str(info.value)


def test_validate_plan_prints_the_bundles_per_node(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--plan", str(GPU_EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "pool sharded: tensor_parallel_size 2, CUDA graphs, memory_fraction 0.85" in out
    assert (
        "engine-sharded-0 (pool sharded, 2 GPU (H100)): placement group STRICT_PACK, bundles "
        "{CPU=2, GPU=1, accelerator_type:H100=0.001} {GPU=1, accelerator_type:H100=0.001}; "
        "one node with {CPU=2, GPU=2}"
    ) in out
    assert "engine-single-1 (pool single, 1 GPU (L4)): replica actor" in out
    assert "engine instances in all: {CPU=6, GPU=4}" in out
