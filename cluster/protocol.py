"""The mars-serve extensions to OpenAI's request bodies, and the fields we
refuse.

The bodies themselves are vLLM's protocol models (`ChatCompletionRequest`,
`CompletionRequest`): they validate every OpenAI and vLLM field, with
vLLM's messages. They let unknown fields through; mars-serve answers those
with a 400 naming them, as it does the vLLM fields this cluster cannot
honour, instead of ignoring what a client asked for.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

NOT_HONOURED = {
    "kv_transfer_params": "KV transfer is the cluster's own (MarsKVConnector)",
    "ec_transfer_params": "encoder-cache transfer is not served",
    "prompt_embeds": "prompt embeddings are not served",
    "mm_payload": "multimodal inputs are not served",
    "use_beam_search": "beam search is not served",
    "priority": "requests are ranked by the MARS engine policy, not by priority",
}
"""vLLM fields this cluster cannot honour, when set to other than their default."""


class MarsExtension(BaseModel):
    """The `mars` field of a request."""

    model_config = ConfigDict(extra="forbid")

    expected_api_s: float | None = Field(
        None, ge=0, description="hint: how long the tool call that ends this turn will take"
    )
    tool: str | None = Field(
        None, min_length=1, description="hint: which tool ends this turn (keys the predictor)"
    )
    close: bool = Field(False, description="end the session after this turn")


def unsupported_fields(body: Any, extra: dict[str, Any], *, chat: bool) -> dict[str, str]:
    """The fields of `body` we refuse, with why: unknown ones (vLLM lets them
    through) and vLLM's own that are set but cannot be honoured here."""
    refused = {name: "not an OpenAI or vLLM field mars-serve knows" for name in extra}
    for name, why in NOT_HONOURED.items():
        if name not in type(body).model_fields:
            continue
        default = type(body).model_fields[name].get_default(call_default_factory=True)
        if getattr(body, name) != default:
            refused[name] = why
    return refused


class MigrateSessionRequest(BaseModel):
    """Body of `POST /v1/sessions/{session_id}/migrate`."""

    model_config = ConfigDict(extra="forbid")

    instance_id: str = Field(description="the engine instance the paused session moves to")
