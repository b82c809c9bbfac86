"""The serving config: one YAML file describes a mars-serve application.

Validated by pydantic with extra fields forbidden; every error names the file
and the field (`mars-serve validate FILE`). Engine settings are written once
under `engine` and may be overridden per pool; a pool becomes one or more
engine instances, each individually addressable by the global scheduler.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from policies import (
    check_engine_policy_name,
    make_dispatch_policy,
    make_engine_policy,
    make_migration_policy,
)
from workers.yaml_config import ConfigError, load_yaml

_STRICT = ConfigDict(extra="forbid", frozen=True)


class ModelSource(BaseModel):
    """Where the model comes from: a local HF-format directory, built from
    the tiny-model recipe if it is not there yet."""

    model_config = _STRICT

    path: str = Field(description="local model directory")
    recipe: str | None = Field(
        None, description="tiny-model recipe YAML to build `path` from when it is missing"
    )
    name: str = Field("tiny", min_length=1, description="model name served at /v1/models")
    tool_parser: str | None = Field(
        None,
        description="vLLM tool parser for tool_choice auto (e.g. hermes, for the models whose "
        "chat template asks for <tool_call> blocks); None refuses tool_choice auto",
    )

    @field_validator("tool_parser")
    @classmethod
    def _known_parser(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from vllm.tool_parsers import ToolParserManager

        known = sorted(ToolParserManager.list_registered())
        if value not in known:
            raise ValueError(f"unknown tool_parser {value!r}; known: {', '.join(known)}")
        return value


class EngineSettings(BaseModel):
    """Engine arguments that mars-serve sets; any may be overridden per pool."""

    model_config = _STRICT

    block_size: int | None = Field(None, ge=32, description="KV block size, a multiple of 32")
    num_kv_blocks: int | None = Field(None, ge=2, description="cap on KV blocks per instance")
    max_model_len: int | None = Field(None, ge=64)
    max_num_batched_tokens: int | None = Field(None, ge=32)
    max_num_seqs: int | None = Field(None, ge=1)
    host_swap_tokens: int | None = Field(None, ge=0)
    prefix_caching: bool | None = Field(
        None, description="vLLM's automatic prefix caching (default on, as in stock vLLM)"
    )
    dtype: Literal["bfloat16", "float16", "float32"] | None = None
    memory_fraction: float | None = Field(
        None,
        gt=0,
        le=0.95,
        description="vLLM's gpu_memory_utilization (default 0.9 on GPUs; on CPUs a share of "
        "RAM, default 0.2)",
    )
    tensor_parallel_size: int | None = Field(
        None, ge=1, description="GPUs one instance shards the model over (default 1)"
    )
    enforce_eager: bool | None = Field(
        None,
        description="run the model eagerly; default: on CPUs, off on GPUs (CUDA graphs on)",
    )

    @field_validator("block_size")
    @classmethod
    def _multiple_of_32(cls, value: int | None) -> int | None:
        if value is not None and value % 32:
            raise ValueError(f"block_size must be a multiple of 32, got {value}")
        return value

    def merged(self, override: EngineSettings | None) -> EngineSettings:
        if override is None:
            return self
        return self.model_copy(update=override.model_dump(exclude_none=True))


class EnginePolicySettings(BaseModel):
    model_config = _STRICT

    name: str = Field("mars", description="engine policy")
    params: dict[str, Any] = Field(default_factory=dict)
    predictor: Literal["online", "oracle"] = "online"

    _known = field_validator("name")(classmethod(lambda cls, v: check_engine_policy_name(v)))

    @model_validator(mode="after")
    def _buildable(self) -> EnginePolicySettings:
        make_engine_policy(self.name, **self.params)  # ValueError names the problem
        return self


_RAY_BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})


class InstanceResources(BaseModel):
    """What Ray reserves for each engine instance of a pool."""

    model_config = _STRICT

    cpus: float = Field(1.0, gt=0, description="logical CPUs of the engine replica")
    gpus: int = Field(
        0, ge=0, description="GPUs per instance: 0 (a CPU engine), or the tensor parallel size"
    )
    accelerator_type: str | None = Field(
        None, description="Ray's accelerator type the GPUs must be (e.g. L4, A100, H100)"
    )

    custom: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources each instance takes, e.g. {zone_a: 1}: the pool's "
        "instances go only to nodes started with them (ray start --resources)",
    )

    @field_validator("custom")
    @classmethod
    def _custom_resources(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if not name or name in _RAY_BUILTIN_RESOURCES or name.startswith("node:"):
                raise ValueError(
                    f"custom resource {name!r}: give cpus, gpus or accelerator_type for "
                    "Ray's own resources; a custom one names what `ray start --resources` gave"
                )
            if not amount > 0:
                raise ValueError(f"custom resource {name!r} must be > 0, got {amount!r}")
        return value

    @field_validator("accelerator_type")
    @classmethod
    def _known_accelerator(cls, value: str | None) -> str | None:
        if value is None:
            return None
        known = ray_accelerator_types()
        if value not in known:
            raise ValueError(f"unknown accelerator_type {value!r}; Ray knows {', '.join(known)}")
        return value

    @model_validator(mode="after")
    def _accelerator_needs_gpus(self) -> InstanceResources:
        if self.accelerator_type is not None and self.gpus == 0:
            raise ValueError(
                f"accelerator_type {self.accelerator_type!r} is given but gpus is 0: "
                "give gpus (the tensor parallel size)"
            )
        return self


class Pool(BaseModel):
    """A group of identical engine instances (prefill and decode pools later)."""

    model_config = _STRICT

    name: str = Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9-]*$")
    count: int = Field(1, ge=1, le=64)
    engine: EngineSettings | None = None
    resources: InstanceResources = Field(default_factory=InstanceResources)


class DispatchSettings(BaseModel):
    model_config = _STRICT

    policy: str = Field("mars_aware", description="instance placement policy")
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _buildable(self) -> DispatchSettings:
        make_dispatch_policy(self.policy, **self.params)  # ValueError names the problem
        return self


class MigrationSettings(BaseModel):
    """Moves the global scheduler makes by itself (`policies.migration`);
    an operator's moves and drains need none of this."""

    model_config = _STRICT

    policy: str | None = Field(
        None,
        description="migration policy that moves sessions between instances "
        "(relocate_paused: paused ones; balance_running: running turns, live); "
        "None: sessions move only when an operator moves or drains them",
    )
    params: dict[str, Any] = Field(default_factory=dict)
    interval_s: float = Field(
        1.0, gt=0, description="seconds between two rounds of the policy over the latest loads"
    )

    @model_validator(mode="after")
    def _buildable(self) -> MigrationSettings:
        if self.policy is None:
            if self.params:
                raise ValueError(f"params {sorted(self.params)} given without a policy")
        else:
            make_migration_policy(self.policy, **self.params)  # ValueError names the problem
        return self


class StateStoreSettings(BaseModel):
    model_config = _STRICT

    url: str | None = Field(
        None, description="redis://host:port/db; None keeps sessions in process"
    )
    session_ttl_s: float = Field(
        3600.0,
        gt=0,
        description="a session with no turn for this long expires: its record, and on its "
        "engine the paused session and its KV",
    )

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"url must start with redis://, rediss:// or unix://, got {value!r}")
        return value


class ToolSettings(BaseModel):
    """A server-side tool: `emulated` (sleep, return N tokens) or a built-in one."""

    model_config = _STRICT

    name: str = Field(min_length=1)
    kind: Literal["emulated", "calculator"]
    duration_s: float = Field(0.0, ge=0, description="emulated: how long a call takes")
    return_tokens: int = Field(0, ge=0, description="emulated: tokens a call returns")


class HttpSettings(BaseModel):
    model_config = _STRICT

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    ingress_replicas: int = Field(1, ge=1, le=64)


class ServingConfig(BaseModel):
    """A whole mars-serve application (see configs/serve/ for examples)."""

    model_config = _STRICT

    model: ModelSource
    engine: EngineSettings = Field(default_factory=EngineSettings)
    policy: EnginePolicySettings = Field(default_factory=EnginePolicySettings)
    instances: int | None = Field(None, ge=1, le=64, description="shorthand: one pool of N")
    pools: list[Pool] | None = None
    dispatch: DispatchSettings = Field(default_factory=DispatchSettings)
    migration: MigrationSettings = Field(default_factory=MigrationSettings)
    state_store: StateStoreSettings = Field(default_factory=StateStoreSettings)
    tools: list[ToolSettings] = Field(default_factory=list)
    http: HttpSettings = Field(default_factory=HttpSettings)
    metrics: bool = Field(True, description="export Prometheus metrics through Ray")

    @model_validator(mode="after")
    def _pools_xor_instances(self) -> ServingConfig:
        if self.instances is not None and self.pools is not None:
            raise ValueError(
                f"give either instances ({self.instances}) or pools "
                f"({[p.name for p in self.pools]}), not both"
            )
        names = [p.name for p in self.pools or []]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"pools: duplicate pool names {duplicates}")
        tool_names = [t.name for t in self.tools]
        repeated = sorted({n for n in tool_names if tool_names.count(n) > 1})
        if repeated:
            raise ValueError(f"tools: duplicate tool names {repeated}")
        for index, pool in enumerate(self.resolved_pools()):
            where = f"pools[{index}]" if self.pools is not None else None
            _check_gpus(pool, self.engine.merged(pool.engine), where)
        if self.http.ingress_replicas > 1 and self.state_store.url is None:
            raise ValueError(
                f"http.ingress_replicas is {self.http.ingress_replicas}, but sessions live in "
                "each replica's own memory without state_store.url: give a Redis URL so every "
                "replica sees every session"
            )
        if self.migration.policy is not None and self.state_store.url is None:
            raise ValueError(
                f"migration.policy is {self.migration.policy!r}, but a move commits the "
                "session's record where the global scheduler can reach it: give "
                "state_store.url (Redis)"
            )
        return self

    def resolved_pools(self) -> list[Pool]:
        """The pools to run: `pools`, or one `default` pool of `instances` (1 if neither)."""
        if self.pools is not None:
            return list(self.pools)
        return [Pool(name="default", count=self.instances or 1)]

    def instance_ids(self) -> list[str]:
        """Every engine instance, addressable by id: `<pool>-<index>`."""
        return [f"{pool.name}-{i}" for pool in self.resolved_pools() for i in range(pool.count)]


def _check_gpus(pool: Pool, engine: EngineSettings, where: str | None) -> None:
    """A pool's GPUs per instance and its tensor parallel size must agree:
    each rank of a sharded model takes one GPU. `where`: the pool's path in
    the file (None: the pool that `instances` stands for)."""
    tensor_parallel = engine.tensor_parallel_size or 1
    gpus = pool.resources.gpus
    if gpus and gpus != tensor_parallel:
        raise ValueError(
            f"{where}.resources.gpus is {gpus} but the pool's engine.tensor_parallel_size is "
            f"{tensor_parallel}: an instance takes one GPU per tensor parallel rank"
        )
    if not gpus and tensor_parallel > 1:
        without = (
            f"{where}.resources.gpus is 0"
            if where is not None
            else "`instances` gives CPU engines (use pools with resources.gpus)"
        )
        raise ValueError(
            f"engine.tensor_parallel_size is {tensor_parallel} but {without}: "
            "tensor parallelism shards the model over GPUs"
        )


def ray_accelerator_types() -> list[str]:
    """The accelerator types Ray schedules by (`ray.util.accelerators`)."""
    from ray.util.accelerators import accelerators

    return sorted(
        value
        for name, value in vars(accelerators).items()
        if name.isupper() and isinstance(value, str)
    )


def load_serving_config(path: str | os.PathLike[str]) -> ServingConfig:
    """Read and validate a serving config; `ConfigError` names the file and each field.

    Relative model and recipe paths are taken relative to the config file.
    """
    config = load_yaml(ServingConfig, path, what="serving config")
    base = Path(path).resolve().parent
    model = config.model
    resolved = model.model_copy(
        update={
            "path": str((base / model.path).resolve()),
            "recipe": str((base / model.recipe).resolve()) if model.recipe else None,
        }
    )
    if resolved.recipe is None and not Path(resolved.path).is_dir():
        raise ConfigError(
            f"{path}: model.path {resolved.path} does not exist and no model.recipe is given "
            "to build it"
        )
    return config.model_copy(update={"model": resolved})
