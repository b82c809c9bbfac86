"""Full-history clients: a turn that re-sends the whole conversation is
matched against the session's record, and only the new part is appended.

Every OpenAI client and agent framework sends the whole conversation on
every turn. The record keeps the token ids the engine actually saw and
generated (re-rendering a generated answer from its text does not give its
tokens back), and one mark per message: where the message ends in those
tokens, and a digest of the message as the client sees it. A new turn's
messages are compared with the marks, message by message:

- all of the record's messages match (the usual case): the prompt is the
  record's tokens, the chat template's close of the last generated message,
  and the rendering of the new messages;
- they match up to message k (the client edited, retried or branched the
  conversation): the prompt continues from the record's tokens of the first
  k messages; the response says where the histories diverged;
- nothing matches: the conversation is rendered afresh.

This needs the chat template to be prefix-stable: rendering the first k
messages gives a prefix of the rendering of all of them (ChatML is; our
models' templates are tested for it). Where it is not, the turn is rendered
afresh and the response says so.

For text completions the record's tokens are matched against the prompt
directly: a token prompt by its common prefix, a text prompt when it
starts with the record's text.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cluster.state_store import MessageMark

SENTINEL = "\x00MARS-SENTINEL\x00"
"""A content no template alters: rendered as an assistant message, what
follows it is the template's close of an assistant message."""


def message_digest(message: Any) -> str:
    """A digest of a chat message as the client sees it: role, text content
    (parts joined), tool calls (name and arguments as canonical JSON; their
    ids are not compared), tool_call_id and name. A message the client
    echoes back from a response digests as that response's message."""
    data = message if isinstance(message, dict) else _as_dict(message)
    calls = []
    for call in data.get("tool_calls") or ():
        call = call if isinstance(call, dict) else _as_dict(call)
        function = call.get("function") or {}
        function = function if isinstance(function, dict) else _as_dict(function)
        calls.append([function.get("name"), _canonical_arguments(function.get("arguments"))])
    normal = {
        "role": data.get("role"),
        "content": _text(data.get("content")),
        "tool_calls": calls,
        "tool_call_id": data.get("tool_call_id") if data.get("role") == "tool" else None,
        "name": data.get("name"),
    }
    encoded = json.dumps(normal, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.blake2b(encoded, digest_size=12).hexdigest()


def _as_dict(value: Any) -> dict[str, Any]:
    if hasattr(value, "model_dump"):
        return value.model_dump(exclude_none=True)
    return dict(value)


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        part = part if isinstance(part, dict) else _as_dict(part)
        if part.get("type") == "text":
            parts.append(part.get("text") or "")
    return "".join(parts)


def _canonical_arguments(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


@dataclass(frozen=True)
class PromptPlan:
    """The prompt of one turn, and how it relates to the session's record."""

    token_ids: list[int]
    from_record: int
    """Leading tokens taken from the record (the engine's own tokens)."""
    matched_messages: int
    """Messages of the request that matched the record (chat), else 0."""
    diverged_at: int | None
    """Where the request's history left the record: the index of the first
    message (chat) or token (completions) that differs; None when the
    request extends the record, or there was no record."""
    messages: tuple[MessageMark, ...]
    """Marks of the request's messages in `token_ids` (chat)."""
    stable: bool = True
    """False when the chat template's rendering was not prefix-stable and
    the prompt was rendered afresh."""

    def summary(self) -> dict[str, Any]:
        return {
            "matched_messages": self.matched_messages,
            "from_record_tokens": self.from_record,
            "diverged_at": self.diverged_at,
            "template_prefix_stable": self.stable,
        }


RenderPrefix = Callable[[int], Awaitable[list[int]]]
"""Tokens of the request's first k messages, without a generation prompt."""


def close_after(generated: Sequence[int], closing: Sequence[int]) -> list[int]:
    """What the chat template's close of an assistant message (`closing`)
    adds after `generated`: the part of it generation did not already
    produce (a model that stopped on its end-of-turn token produced the
    first token of the close)."""
    for k in range(min(len(closing), len(generated)), 0, -1):
        if list(generated[-k:]) == list(closing[:k]):
            return list(closing[k:])
    return list(closing)


async def plan_chat_prompt(
    record_tokens: Sequence[int],
    record_marks: Sequence[MessageMark],
    digests: Sequence[str],
    full: list[int],
    render_prefix: RenderPrefix,
    closing: Sequence[int],
) -> PromptPlan:
    """The prompt for a chat turn whose messages digest to `digests` and
    render to `full` (with the generation prompt). See the module docstring."""
    matched = 0
    for mark, digest in zip(record_marks, digests, strict=False):
        if mark.digest != digest:
            break
        matched += 1
    diverged = matched if matched < len(record_marks) else None
    if matched == 0:
        marks = await _marks(render_prefix, len(digests), digests, 0, [], 0)
        return PromptPlan(full, 0, 0, diverged, marks)
    prefix = await render_prefix(matched)
    if full[: len(prefix)] != prefix:
        marks = await _marks(render_prefix, len(digests), digests, 0, [], 0)
        return PromptPlan(full, 0, 0, diverged, marks, stable=False)
    last = record_marks[matched - 1]
    base = list(record_tokens[: last.end])
    if last.generated:
        base += close_after(base, closing)
    token_ids = base + full[len(prefix) :]
    kept = list(record_marks[:matched])
    marks = await _marks(
        render_prefix, len(digests), digests, matched, kept, len(base) - len(prefix)
    )
    return PromptPlan(token_ids, last.end, matched, diverged, marks)


async def _marks(
    render_prefix: RenderPrefix,
    count: int,
    digests: Sequence[str],
    start: int,
    kept: list[MessageMark],
    shift: int,
) -> tuple[MessageMark, ...]:
    """Marks for messages `start..count-1`: each ends where the rendering of
    the messages up to it ends (shifted to where the prompt's rendered part
    begins)."""
    marks = list(kept)
    for i in range(start, count):
        end = len(await render_prefix(i + 1)) + shift
        marks.append(MessageMark(digests[i], end))
    return tuple(marks)


def plan_token_prompt(record_tokens: Sequence[int], prompt: list[int]) -> PromptPlan:
    """A completion's token prompt against the record: the tokens are the
    prompt's own; the record tells how much of it the session already had."""
    common = 0
    for a, b in zip(record_tokens, prompt, strict=False):
        if a != b:
            break
        common += 1
    diverged = common if common < len(record_tokens) else None
    return PromptPlan(list(prompt), common, 0, diverged, ())


def plan_text_prompt(
    record_tokens: Sequence[int],
    record_text: str,
    prompt_text: str,
    full: list[int],
    tokenize: Callable[[str], list[int]],
) -> PromptPlan:
    """A completion's text prompt against the record: one that starts with
    the record's text continues the record's tokens with the rest
    tokenized; any other is tokenized afresh (`full`)."""
    if record_tokens and prompt_text.startswith(record_text):
        rest = prompt_text[len(record_text) :]
        tokens = list(record_tokens) + (tokenize(rest) if rest else [])
        return PromptPlan(tokens, len(record_tokens), 0, None, ())
    return PromptPlan(full, 0, 0, 0 if record_tokens else None, ())
