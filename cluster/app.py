"""The Ray Serve application builder.

Usable as an `import_path` from Ray Serve's own CLI (`serve run
cluster.app:build_app config=configs/serve/local-cpu.yaml`, or a `serve
deploy` YAML with `args: {config: ...}`) and from `mars-serve deploy/up`.
The serving config is validated before anything is deployed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from cluster.config import ServingConfig, load_serving_config
from cluster.engine_deployment import EngineInstance
from cluster.global_scheduler import GlobalScheduler
from cluster.ingress import Ingress, app
from cluster.instance_placement import pool_placements
from workers.engine import EngineConfig

INTERNAL_CALLS_LOGGING = {"enable_access_log": False}
"""Serve's access log (one line per call) off for the engines and the global
scheduler: the load refresh calls them up to ten times a second. Our own log lines
(placements, turns, failures) are unaffected; the ingress keeps its HTTP
access log."""

ENGINE_ENV = {"VLLM_CONFIGURE_LOGGING": "0"}
"""Environment of the engine and ingress replicas (both import vLLM). vLLM
configures logging when it is imported, with `logging.config.dictConfig`, which closes every handler
already installed: Ray Serve's replica log handler among them, after which
the replica's log lost every line (ours, Serve's, vLLM's) silently. Without
it, vLLM logs through the replica's handlers (`cluster.logs.adopt_into_serve_log`)."""

GPU_MEMORY_FRACTION = 0.9
"""vLLM's own gpu_memory_utilization default, for pools with GPUs (the CPU
default, a share of RAM, is 0.2)."""


def engine_config(config: ServingConfig, pool_name: str) -> dict[str, Any]:
    """The `workers.engine.EngineConfig` fields of one pool's instances."""
    pool = next(p for p in config.resolved_pools() if p.name == pool_name)
    settings = config.engine.merged(pool.engine).model_dump(exclude_none=True)
    if pool.resources.gpus:
        # vLLM's GPU defaults, where the CPU ones differ (EngineConfig's).
        settings.setdefault("memory_fraction", GPU_MEMORY_FRACTION)
        settings.setdefault("enforce_eager", False)
    return {
        "model": config.model.path,
        **settings,
        "scheduler": {
            "policy": config.policy.name,
            "policy_params": config.policy.params,
            "predictor": config.policy.predictor,
        },
    }


def frontend_settings(config: ServingConfig) -> dict[str, Any]:
    """The ingress's `cluster.frontend.FrontendSettings` (every pool serves
    the same model; the first pool's engine settings give its limits)."""
    first = engine_config(config, config.resolved_pools()[0].name)
    defaults = EngineConfig.model_fields
    return {
        "model_path": config.model.path,
        "served_name": config.model.name,
        "max_model_len": first.get("max_model_len", defaults["max_model_len"].default),
        "block_size": first.get("block_size", defaults["block_size"].default),
        "tool_parser": config.model.tool_parser,
    }


def build_from_config(config: ServingConfig) -> Application:
    _ensure_model(config)
    tools = [tool.model_dump() for tool in config.tools]
    engines = {}
    placements = pool_placements(config)
    for pool in config.resolved_pools():
        options = placements[pool.name].deployment_options()
        options["ray_actor_options"]["runtime_env"] = {"env_vars": ENGINE_ENV}
        for index in range(pool.count):
            instance_id = f"{pool.name}-{index}"
            deployment = serve.deployment(
                EngineInstance,
                name=f"engine-{instance_id}",
                num_replicas=1,
                **options,
                health_check_period_s=10,
                max_ongoing_requests=1024,
                logging_config=INTERNAL_CALLS_LOGGING,
            )
            engines[instance_id] = deployment.bind(
                instance_id,
                engine_config(config, pool.name),
                metrics=config.metrics,
                session_ttl_s=config.state_store.session_ttl_s,
            )
    store = config.state_store.model_dump()
    scheduler = serve.deployment(
        GlobalScheduler,
        name="global-scheduler",
        num_replicas=1,
        max_ongoing_requests=4096,
        logging_config=INTERNAL_CALLS_LOGGING,
    ).bind(
        engines,
        config.dispatch.model_dump(),
        metrics=config.metrics,
        migration=config.migration.model_dump(),
        state_store=store,
    )
    ingress = serve.deployment(
        serve.ingress(app)(Ingress),
        name="ingress",
        num_replicas=config.http.ingress_replicas,
        max_ongoing_requests=1024,
        ray_actor_options={"runtime_env": {"env_vars": ENGINE_ENV}},
    )
    return ingress.bind(
        frontend_settings(config),
        tools,
        engines,
        scheduler,
        store,
        config.dispatch.model_dump(),
        engine_policy=config.policy.name,
        metrics=config.metrics,
        sole_replica=config.http.ingress_replicas == 1,
    )


def build_app(args: dict[str, Any]) -> Application:
    """Ray Serve `import_path` target: `args` holds `config`, a serving YAML path."""
    unknown = sorted(set(args) - {"config"})
    if unknown or "config" not in args:
        raise ValueError(f"build_app takes args {{config: <serving YAML>}}, got {sorted(args)}")
    return build_from_config(load_serving_config(args["config"]))


def _ensure_model(config: ServingConfig) -> None:
    """Build the tiny model from its recipe when the model directory is missing."""
    if Path(config.model.path).is_dir() or config.model.recipe is None:
        return
    from workers.model_builder import build_model, load_recipe

    build_model(load_recipe(config.model.recipe), config.model.path)
