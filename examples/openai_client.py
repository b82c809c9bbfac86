"""Talk to a running mars-serve endpoint with the stock `openai` client.

A plain chat completion, then an agent's tool round trip as agent frameworks
make it: the client asks a question with a calculator tool, receives
`tool_calls`, runs the tool, and sends the whole conversation back with the
tool's result; the model answers with it. The session (`X-Session-Id`) keeps
the conversation's KV on one instance between the turns: the second turn
resumes there under the strategy MARS chose, and reuses what it kept. Last,
a tool the server runs itself (`calculate` in configs/serve/local-cpu.yaml): the
model's call, its result and the answer, in one response.

    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import sys
import uuid

import openai

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression such as 1234 * 5678.",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
            "additionalProperties": False,
        },
    },
}
_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
}


def calculate(expression: str) -> str:
    """The client's tool: arithmetic only (no `eval`)."""

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)}")

    try:
        result = value(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError) as exc:
        return f"error: {exc}"
    return str(int(result)) if float(result).is_integer() else str(result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default=None, help="default: the server's only model")
    args = parser.parse_args(argv)
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=2)
    model = args.model or client.models.list().data[0].id

    question = [{"role": "user", "content": "Name the capital city of France."}]
    reply = client.chat.completions.create(
        model=model, messages=question, max_tokens=32, temperature=0
    )
    print(f"chat completion: {reply.choices[0].message.content!r}")
    print(f"  finish_reason {reply.choices[0].finish_reason}, usage {reply.usage}")

    session = {"X-Session-Id": f"example-{uuid.uuid4().hex[:8]}"}
    history = [{"role": "user", "content": "What is 1234 * 5678? Use the calculator."}]
    first = client.chat.completions.create(
        model=model,
        messages=history,
        tools=[CALCULATOR],
        tool_choice="required",
        max_tokens=64,
        temperature=0,
        extra_headers=session,
        extra_body={"mars": {"tool": "calculator", "expected_api_s": 0.1}},
    )
    message = first.choices[0].message
    if not message.tool_calls:
        print(f"the model made no tool call: {message.content!r}", file=sys.stderr)
        return 1
    call = message.tool_calls[0]
    expression = json.loads(call.function.arguments).get("expression", "")
    result = calculate(expression)
    print(f"turn 1: finish_reason {first.choices[0].finish_reason}, tool call {call.function}")
    print(f"  the client runs calculator({expression!r}) = {result}")

    history += [message.model_dump(exclude_none=True)]
    history += [{"role": "tool", "tool_call_id": call.id, "content": result}]
    second = client.chat.completions.create(
        model=model,
        messages=history,
        tools=[CALCULATOR],
        max_tokens=48,
        temperature=0,
        extra_headers=session,
    )
    mars = second.model_extra["mars"]
    print(f"turn 2: {second.choices[0].message.content!r}")
    print(
        f"  resumed on {mars['instance_id']} ({mars['placed']}), KV {mars['kv']['resumed_from']}:"
        f" {second.usage.prompt_tokens_details.cached_tokens} of {second.usage.prompt_tokens}"
        f" prompt tokens reused, {mars['history']['matched_messages']} messages matched"
    )
    info = client.get(f"/sessions/{session['X-Session-Id']}", cast_to=object)
    print(
        f"  session on {info['instance_id']}: {info['tokens']} tokens, state {info['state']}, "
        f"KV strategy {info['strategy']}"
    )
    client.delete(f"/sessions/{session['X-Session-Id']}", cast_to=object)
    print("  session deleted")

    # A tool the serving config names (`calculate`): the server runs it when
    # the model calls it, and the answer comes in the same response.
    server_tool = {**CALCULATOR, "function": {**CALCULATOR["function"], "name": "calculate"}}
    served = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is 4321 * 8765? Use the calculator."}],
        tools=[server_tool],
        tool_choice="required",
        max_tokens=64,
        temperature=0,
    )
    ran = served.model_extra["mars"].get("server_tool_calls", [])
    print(f"server-side tool: {served.choices[0].message.content!r}")
    for call in ran:
        print(f"  the server ran {call['name']}({call['arguments']}) = {call['result']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
