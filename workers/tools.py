"""Server-side tools an augmented request may call, found by name.

A tool turns a call into (duration, result tokens). The emulated tool sleeps
for the requested time and returns the requested number of tokens, which is
what benchmarks replaying traces need; real tools (the calculator) compute
their result and return it as text for the tokenizer.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ToolCall:
    tool: str
    duration_s: float = 0.0
    """Emulated tools: how long the call takes. Real tools: ignored (measured)."""
    return_tokens: int = 0
    """Emulated tools: how many tokens the result has."""
    arguments: str = ""
    """Real tools: the call's input text."""

    def __post_init__(self) -> None:
        if not self.tool:
            raise ValueError("tool must be a non-empty name")
        if self.duration_s < 0:
            raise ValueError(f"duration_s must be >= 0, got {self.duration_s!r}")
        if self.return_tokens < 0:
            raise ValueError(f"return_tokens must be >= 0, got {self.return_tokens!r}")


@dataclass(frozen=True)
class ToolResult:
    duration_s: float
    """Seconds the engine must wait before the result is available."""
    token_ids: list[int] | None = None
    text: str | None = None


ToolFn = Callable[[ToolCall], ToolResult]

_FILLER_TOKEN_BASE = 100
"""Emulated results use ids from here up, inside any vocabulary we build."""


def emulated_tool(call: ToolCall) -> ToolResult:
    """Wait `duration_s`, return `return_tokens` deterministic token ids."""
    tokens = [_FILLER_TOKEN_BASE + (i % 50) for i in range(call.return_tokens)]
    return ToolResult(duration_s=call.duration_s, token_ids=tokens)


_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.Mod: operator.mod,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        if isinstance(node.op, ast.Pow) and abs(_evaluate(node.right)) > 64:
            raise ValueError("exponent too large")
        return _BINARY[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    raise ValueError(f"unsupported expression element {type(node).__name__}")


def calculator_tool(call: ToolCall) -> ToolResult:
    """Evaluate an arithmetic expression (numbers, + - * / % **, parentheses)."""
    try:
        value = _evaluate(ast.parse(call.arguments, mode="eval").body)
        text = f"{value:g}" if isinstance(value, float) else str(value)
    except (SyntaxError, ValueError, ZeroDivisionError) as exc:
        text = f"error: {exc}"
    return ToolResult(duration_s=0.0, text=text)


class ToolRegistry:
    """Tools by name; an unknown name fails with the list of known ones."""

    def __init__(self) -> None:
        self._tools: dict[str, ToolFn] = {}

    def register(self, name: str, fn: ToolFn) -> None:
        self._tools[name] = fn

    def names(self) -> list[str]:
        return sorted(self._tools)

    def check(self, name: str) -> None:
        if name not in self._tools:
            raise ValueError(f"unknown tool {name!r}; known tools: {self.names()}")

    def run(self, call: ToolCall) -> ToolResult:
        self.check(call.tool)
        return self._tools[call.tool](call)


def default_registry() -> ToolRegistry:
    registry = ToolRegistry()
    registry.register("emulated", emulated_tool)
    registry.register("calculator", calculator_tool)
    return registry


def registry_for(tools: list[dict]) -> ToolRegistry:
    """The built-in tools plus the serving config's (`cluster.config.ToolSettings`
    dicts): an `emulated` tool answers every call with its fixed duration and
    size, a `calculator` under its own name."""
    registry = default_registry()
    for tool in tools:
        if tool["kind"] == "calculator":
            registry.register(tool["name"], calculator_tool)
        elif tool["kind"] == "emulated":
            fixed = ToolCall("emulated", tool["duration_s"], tool["return_tokens"])
            registry.register(tool["name"], lambda _call, fixed=fixed: emulated_tool(fixed))
        else:
            raise ValueError(f"tools: unknown kind {tool['kind']!r} of tool {tool['name']!r}")
    return registry
