"""Talk to a running mars-serve endpoint with the `openai` client.

A plain chat completion, then an augmented session: the first turn stops at
a tool call, the client runs the tool and sends only its result, and the
session resumes on the instance that holds its KV. Prints what each step
returned and where the session lives.

    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
import uuid

import openai


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args(argv)
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0)

    reply = client.chat.completions.create(
        model=args.model, messages=[{"role": "user", "content": "hello there"}], max_tokens=16
    )
    print(f"chat completion: {reply.choices[0].message.content!r}")
    print(f"  finish_reason {reply.choices[0].finish_reason}, usage {reply.usage}")

    session = f"example-{uuid.uuid4().hex[:8]}"  # ids of ended sessions stay taken a while
    first = client.chat.completions.create(
        model=args.model,
        messages=[{"role": "user", "content": "what is 12 * 7? use the calculator"}],
        max_tokens=12,
        extra_headers={"X-Session-Id": session},
        extra_body={"mars": {"tool": "calculator", "expected_api_s": 0.5}},
    )
    print(f"session turn 1: {first.choices[0].message.content!r} (the client now runs its tool)")
    second = client.chat.completions.create(
        model=args.model,
        messages=[{"role": "tool", "content": "84", "tool_call_id": "call-1"}],
        max_tokens=12,
        extra_headers={"X-Session-Id": session},
    )
    print(f"session turn 2: {second.choices[0].message.content!r}")
    base = args.base_url.removesuffix("/v1")
    with urllib.request.urlopen(f"{base}/v1/sessions/{session}", timeout=30) as response:
        info = json.loads(response.read())
    print(
        f"  session on {info['instance_id']}: {info['tokens']} tokens, state {info['state']}, "
        f"KV strategy {info['strategy']}"
    )
    client.delete(f"/sessions/{session}", cast_to=object)
    print("  session deleted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
