"""The server-sent events of vLLM's streams, read and written: one
`data: <json>` event per chunk, and `data: [DONE]` last."""

from __future__ import annotations

import json
from typing import Any

DONE = "data: [DONE]\n\n"


def event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def parse(chunk: str) -> dict[str, Any] | None:
    """The chunk's JSON payload; None for `[DONE]` and anything not JSON."""
    if not chunk.startswith("data: ") or chunk.startswith("data: [DONE]"):
        return None
    try:
        payload = json.loads(chunk[6:])
    except json.JSONDecodeError:
        return None
    return payload if isinstance(payload, dict) else None


def is_done(chunk: str) -> bool:
    return chunk.startswith("data: [DONE]")


def finishes(payload: dict[str, Any] | None) -> bool:
    """Whether the chunk carries a choice's finish reason (the last chunk
    of its generation; a usage chunk may follow)."""
    return payload is not None and any(
        choice.get("finish_reason") for choice in payload.get("choices") or ()
    )


class StreamedMessage:
    """The assistant message a chat stream delivers, assembled from its
    chunks as a client assembles it (content, tool calls by index)."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}

    def feed(self, payload: dict[str, Any] | None) -> None:
        for choice in (payload or {}).get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.content.append(delta["content"])
            for call in delta.get("tool_calls") or ():
                slot = self.calls.setdefault(
                    call.get("index", 0), {"id": None, "name": "", "arguments": ""}
                )
                slot["id"] = slot["id"] or call.get("id")
                function = call.get("function") or {}
                slot["name"] += function.get("name") or ""
                slot["arguments"] += function.get("arguments") or ""

    def names(self) -> list[str]:
        return [call["name"] for call in self.calls.values()]

    def message(self) -> dict[str, Any]:
        calls = [
            {
                "id": call["id"],
                "type": "function",
                "function": {"name": call["name"], "arguments": call["arguments"]},
            }
            for _, call in sorted(self.calls.items())
        ]
        return {"role": "assistant", "content": "".join(self.content), "tool_calls": calls}
