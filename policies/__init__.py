"""Pure scheduling policies for mars-serve: no vLLM, Ray or torch imports.

The public surface: the snapshot types (one request's `RequestView`, many
requests' `RequestColumns`, and the `PricedRows` an engine joins them from),
the cost model, the MARS score and INFERCEPT waste terms, the starvation
guard, the engine-policy registry, the online predictors, and the
instance-dispatch registry with its load snapshot types. Everything else is
internal.
"""

from policies.cost_model import CostModel
from policies.dispatch import (
    DispatchDecision,
    DispatchPolicy,
    DispatchRequest,
    DispatchState,
    InstanceLoad,
    NoInstanceAvailable,
    charge_placement,
    dispatch_policy_names,
    make_dispatch_policy,
    register_dispatch_policy,
)
from policies.engine_policy import (
    EnginePolicy,
    check_engine_policy_name,
    engine_policy_names,
    make_engine_policy,
    register_engine_policy,
)
from policies.memory import memory_over_time, memory_over_time_columns
from policies.migration import (
    HeldSession,
    MigrationPolicy,
    Move,
    RelocatePaused,
    committed_freeness,
    drain_plan,
    make_migration_policy,
    migration_policy_names,
)
from policies.predictors import ApiDurationPredictor, DecodeLengthPredictor, StreamingStat
from policies.prefix_index import PrefixIndex, block_hashes
from policies.priced_rows import PricedRows
from policies.starvation import StarvationConfig, starving
from policies.types import BatchView, RequestColumns, RequestView, Strategy
from policies.waste import (
    StrategyChoice,
    StrategyChoices,
    choose_strategies,
    choose_strategy,
    demotions,
)

__all__ = [
    "ApiDurationPredictor",
    "BatchView",
    "CostModel",
    "DecodeLengthPredictor",
    "DispatchDecision",
    "DispatchPolicy",
    "DispatchRequest",
    "DispatchState",
    "EnginePolicy",
    "HeldSession",
    "InstanceLoad",
    "MigrationPolicy",
    "Move",
    "NoInstanceAvailable",
    "PrefixIndex",
    "PricedRows",
    "RelocatePaused",
    "RequestColumns",
    "RequestView",
    "StarvationConfig",
    "Strategy",
    "StrategyChoice",
    "StrategyChoices",
    "StreamingStat",
    "block_hashes",
    "charge_placement",
    "check_engine_policy_name",
    "choose_strategies",
    "choose_strategy",
    "committed_freeness",
    "demotions",
    "dispatch_policy_names",
    "drain_plan",
    "engine_policy_names",
    "make_dispatch_policy",
    "make_engine_policy",
    "make_migration_policy",
    "memory_over_time",
    "memory_over_time_columns",
    "migration_policy_names",
    "register_dispatch_policy",
    "register_engine_policy",
    "starving",
]
