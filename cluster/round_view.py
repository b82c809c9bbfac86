"""What a streaming client sees of one round of a request that offers
server-side tools (`cluster.server_tools`): the round's content as it
comes; its tool calls, finish and usage only if it turns out to be the
last round (an answer, or a call the client runs)."""

from __future__ import annotations

from typing import Any

from cluster import sse


class RoundView:
    """Which chunks of one streamed round the client gets, decided chunk by
    chunk as the relay passes them (the turn's record is committed before
    its finish chunk arrives here).

    While the round may still be one of server-side calls, its tool-call
    deltas are held (their content goes out). A call the client runs
    releases them, and the round streams as it is; so does a finish with
    no call, or with calls the server may not run. A finish after
    server-side calls only makes the round one to run (`between`): its
    held deltas, finish chunk, usage, `mars` chunk and `[DONE]` stay here.
    A round after the first does not repeat the role chunk."""

    def __init__(self, server_names: frozenset[str], *, may_call: bool, first: bool) -> None:
        self.server_names, self.may_call, self.first = server_names, may_call, first
        self.message = sse.StreamedMessage()
        self.holding = may_call
        self.held: list[str] = []
        self.between = False

    def take(self, chunk: str, *, ended: bool) -> list[str]:
        """The chunks to send for `chunk`; `ended`: the engine ended the
        turn without a failure."""
        if self.between:
            return []
        payload = sse.parse(chunk)
        if payload is None or "error" in payload:  # vLLM's in-band error, then [DONE]
            return [*self._release(), chunk]
        self.message.feed(payload)
        choices = payload.get("choices") or [{}]
        choice, delta = choices[0], choices[0].get("delta") or {}
        if not self.first and _role_only(delta):
            return []
        if not self.holding:
            return [chunk]
        names = [(c.get("function") or {}).get("name") for c in delta.get("tool_calls") or ()]
        if any(name and name not in self.server_names for name in names):
            return [*self._release(), chunk]
        if choice.get("finish_reason"):
            if ended and runs_all(self.message.names(), self.server_names, may_call=self.may_call):
                self.between = True
                self.held.clear()
                return _content_only(payload)
            return [*self._release(), chunk]
        if delta.get("tool_calls"):
            self.held.append(_without_content(payload) if delta.get("content") else chunk)
            return _content_only(payload)
        return [chunk]

    def _release(self) -> list[str]:
        held, self.held, self.holding = self.held, [], False
        return held


def runs_all(names: list[str], server_names: frozenset[str], *, may_call: bool) -> bool:
    """Whether a round that asked for calls `names` is one the server runs:
    every call server-side, and rounds left."""
    return may_call and bool(names) and all(name in server_names for name in names)


def _role_only(delta: dict[str, Any]) -> bool:
    return bool(delta.get("role")) and not delta.get("content") and not delta.get("tool_calls")


def _content_only(payload: dict[str, Any]) -> list[str]:
    """The chunk's content as a chunk of its own, if it has any."""
    choice = payload["choices"][0]
    content = (choice.get("delta") or {}).get("content")
    if not content:
        return []
    text = {**choice, "delta": {"content": content}, "finish_reason": None}
    return [sse.event({**payload, "choices": [text]})]


def _without_content(payload: dict[str, Any]) -> str:
    choice = payload["choices"][0]
    delta = {k: v for k, v in choice["delta"].items() if k != "content"}
    return sse.event({**payload, "choices": [{**choice, "delta": delta}]})
