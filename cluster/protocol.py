"""HTTP request bodies: OpenAI's chat and completion requests, plus the
mars-serve extensions (sessions, tool hints, server-side tool plans).

Unknown OpenAI fields are accepted and ignored, so stock clients work; our
own `mars` object is strict, and every error names its field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_STRICT = ConfigDict(extra="forbid")
_OPENAI = ConfigDict(extra="ignore")


class ServerToolCall(BaseModel):
    model_config = _STRICT

    tool: str = Field(min_length=1, description="a tool named in the serving config")
    arguments: str = ""


class PlanSegment(BaseModel):
    """Generate `generate_tokens`, then (unless last) call a server-side tool."""

    model_config = _STRICT

    generate_tokens: int = Field(ge=1)
    call: ServerToolCall | None = None


class MarsExtension(BaseModel):
    """The `mars` field of a request."""

    model_config = _STRICT

    expected_api_s: float | None = Field(
        None, ge=0, description="hint: how long the tool call that ends this turn will take"
    )
    tool: str | None = Field(None, description="hint: which tool ends this turn")
    tool_call_token_ids: list[int] = Field(
        default_factory=list, description="tokens that end the turn with finish_reason tool_calls"
    )
    plan: list[PlanSegment] | None = Field(
        None, description="server-side session: segments and tool calls run by the server"
    )
    close: bool = Field(False, description="end the session after this turn")

    @field_validator("plan")
    @classmethod
    def _plan_shape(cls, plan: list[PlanSegment] | None) -> list[PlanSegment] | None:
        if plan is None:
            return None
        if not plan:
            raise ValueError("plan must hold at least one segment")
        for i, segment in enumerate(plan[:-1]):
            if segment.call is None:
                raise ValueError(f"plan[{i}].call is missing: only the last segment may omit it")
        return plan


class ChatMessage(BaseModel):
    model_config = _OPENAI

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class _Common(BaseModel):
    model_config = _OPENAI

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    stop_token_ids: list[int] = Field(default_factory=list)
    session_id: str | None = Field(None, min_length=1, max_length=200)
    mars: MarsExtension = Field(default_factory=MarsExtension)

    @property
    def token_limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 64


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: str = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _single_prompt(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("prompt"), list):
            raise ValueError("prompt: only a single string prompt is supported")
        return data
