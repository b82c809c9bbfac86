"""What Ray reserves for one engine instance: its replica's resources, and
for a model sharded over several GPUs a placement group of one GPU per rank.

`instance_placement` decides it once; the application builder deploys it
and `mars-serve validate --plan` prints it, so the plan shown is the one
deployed. A single-GPU instance runs vLLM's engine in the replica, which
takes the GPU itself. A tensor-parallel instance follows Ray Serve LLM: its
replica sits in the first bundle of a placement group of one GPU bundle per
rank (the replica's CPUs added to the first), and vLLM's Ray executor starts
one worker per bundle. The bundles are packed strictly on one node: the
ranks exchange activations every layer, over the node's GPU links.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cluster.config import InstanceResources, ServingConfig
from workers.engine import EngineConfig

TENSOR_PARALLEL_STRATEGY = "STRICT_PACK"


@dataclass(frozen=True)
class InstancePlacement:
    """A pool's per-instance reservation, as Ray Serve deployment options."""

    num_cpus: float
    num_gpus: int
    accelerator_type: str | None
    bundles: tuple[dict[str, float], ...] = ()
    """One per tensor parallel rank (empty: no placement group)."""
    custom: tuple[tuple[str, float], ...] = ()
    """Ray custom resources the instance takes (`InstanceResources.custom`)."""

    def deployment_options(self) -> dict[str, Any]:
        """`serve.deployment` keyword arguments (the replica's `ray_actor_options`
        besides its runtime environment, and the placement group's)."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus}
        if not self.bundles and self.num_gpus:
            actor["num_gpus"] = self.num_gpus
            if self.accelerator_type is not None:
                actor["accelerator_type"] = self.accelerator_type
        if not self.bundles and self.custom:
            actor["resources"] = dict(self.custom)
        options: dict[str, Any] = {"ray_actor_options": actor}
        if self.bundles:
            options["placement_group_bundles"] = [dict(b) for b in self.bundles]
            options["placement_group_strategy"] = TENSOR_PARALLEL_STRATEGY
        return options

    def node_needs(self) -> dict[str, float]:
        """What one node must offer for the instance: all of it lands on one
        node (one actor, or a strictly packed group)."""
        needs: dict[str, float] = {"CPU": self.num_cpus}
        if self.num_gpus:
            needs["GPU"] = self.num_gpus
        return {**needs, **dict(self.custom)}


def accelerator_resource(accelerator_type: str) -> str:
    """Ray's custom resource that each node with that accelerator offers."""
    return f"accelerator_type:{accelerator_type}"


def instance_placement(
    resources: InstanceResources, tensor_parallel_size: int
) -> InstancePlacement:
    """The reservation of one instance of a pool with `resources` whose
    engine shards the model over `tensor_parallel_size` GPUs (the config
    has checked that they agree)."""
    custom = tuple(sorted(resources.custom.items()))
    if tensor_parallel_size <= 1:
        return InstancePlacement(
            resources.cpus, resources.gpus, resources.accelerator_type, custom=custom
        )
    gpu_bundle: dict[str, float] = {"GPU": 1}
    if resources.accelerator_type is not None:
        # A sliver of the node's accelerator resource pins the bundle to that
        # GPU type, as Ray's own accelerator_type option does for an actor.
        gpu_bundle[accelerator_resource(resources.accelerator_type)] = 0.001
    first = {"CPU": resources.cpus, **gpu_bundle, **resources.custom}
    bundles = (first, *(dict(gpu_bundle) for _ in range(tensor_parallel_size - 1)))
    return InstancePlacement(
        resources.cpus, resources.gpus, resources.accelerator_type, bundles, custom
    )


def pool_placements(config: ServingConfig) -> dict[str, InstancePlacement]:
    """Each pool's per-instance placement, by pool name."""
    return {
        pool.name: instance_placement(
            pool.resources, config.engine.merged(pool.engine).tensor_parallel_size or 1
        )
        for pool in config.resolved_pools()
    }


def format_plan(config: ServingConfig) -> str:
    """What the config asks Ray for, instance by instance, and in all, with
    each pool's engine arguments that depend on its devices."""
    from cluster.app import engine_config  # the application builder imports this module

    lines = []
    total: dict[str, float] = {}
    placements = pool_placements(config)
    for pool in config.resolved_pools():
        placement = placements[pool.name]
        kind = (
            f"{placement.num_gpus} GPU"
            + (f" ({placement.accelerator_type})" if placement.accelerator_type else "")
            if placement.num_gpus
            else "CPU only"
        )
        engine = EngineConfig(**engine_config(config, pool.name))
        lines.append(
            f"pool {pool.name}: tensor_parallel_size {engine.tensor_parallel_size}, "
            f"{'eager' if engine.enforce_eager else 'CUDA graphs'}, "
            f"memory_fraction {engine.memory_fraction:g}"
        )
        for index in range(pool.count):
            if placement.bundles:
                how = f"placement group {TENSOR_PARALLEL_STRATEGY}, bundles " + " ".join(
                    _bundle(b) for b in placement.bundles
                )
            else:
                how = (
                    f"replica actor {_bundle(placement.deployment_options()['ray_actor_options'])}"
                )
            lines.append(
                f"  engine-{pool.name}-{index} (pool {pool.name}, {kind}): {how}; "
                f"one node with {_bundle(placement.node_needs())}"
            )
            for name, amount in placement.node_needs().items():
                total[name] = total.get(name, 0) + amount
    lines.append(
        f"engine instances in all: {_bundle(total)} "
        "(besides the ingress and the global scheduler replicas)"
    )
    return "\n".join(lines)


def _bundle(resources: dict[str, Any]) -> str:
    names = {"num_cpus": "CPU", "num_gpus": "GPU"}
    parts = []
    for name, amount in resources.items():
        label = names.get(name, name)
        parts.append(
            f"{label}={amount:g}" if isinstance(amount, (int, float)) else f"{label}={amount}"
        )
    return "{" + ", ".join(parts) + "}"
