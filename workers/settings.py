"""Settings the MARS scheduler reads from vLLM's `additional_config["mars"]`.

They travel inside vLLM's own config (a public hook), so the scheduler gets
them in whatever process vLLM builds it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from policies import check_engine_policy_name, engine_policy_names, make_engine_policy

ADDITIONAL_CONFIG_KEY = "mars"


class CostOverride(BaseModel):
    """Cost coefficients given in config instead of measured at start-up."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    iter_fixed_s: float = Field(ge=0, description="seconds every iteration costs")
    iter_per_token_s: float = Field(ge=0, description="seconds per batched token")
    swap_s_per_token: float = Field(ge=0, description="seconds to copy one token's KV one way")


class SchedulerSettings(BaseModel):
    """How the engine orders requests and handles paused KV."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str = Field("mars", description="engine policy: " + ", ".join(engine_policy_names()))
    policy_params: dict[str, Any] = Field(
        default_factory=dict, description="parameters of the policy (see policies/)"
    )
    predictor: Literal["online", "oracle"] = Field(
        "online",
        description="online: learn API durations and segment lengths from served sessions "
        "(client hints override); oracle: take the hints as the truth (benchmarks)",
    )
    api_prior_s: float = Field(1.0, ge=0, description="API duration assumed before any is seen")
    decode_prior_tokens: int = Field(
        128, ge=1, description="segment length assumed before any is seen"
    )
    cost: CostOverride | None = Field(
        None, description="fixed cost coefficients; None = measured by the engine at start-up"
    )

    _known = field_validator("policy")(classmethod(lambda cls, v: check_engine_policy_name(v)))

    @model_validator(mode="after")
    def _buildable(self) -> SchedulerSettings:
        make_engine_policy(self.policy, **self.policy_params)  # ValueError names the problem
        return self


def settings_from_additional_config(additional: dict[str, Any] | None) -> SchedulerSettings:
    return SchedulerSettings.model_validate((additional or {}).get(ADDITIONAL_CONFIG_KEY, {}))
