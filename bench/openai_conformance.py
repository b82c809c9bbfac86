"""OpenAI conformance of mars-serve, checked side by side with vLLM's own
OpenAI server on the same model.

Starts both itself: stock vLLM 0.32's server (`python -m
vllm.entrypoints.openai.api_server`, prefix caching at its default, the
hermes tool parser) and mars-serve (a local Ray Serve application, two
engine instances, a redis-server of its own), on SmolLM2-135M-Instruct.
Each check sends the same request to both where vLLM has the behaviour
(the same tokens at temperature 0 and with a fixed seed, the same status
for the same bad request) and checks mars-serve's own extensions
(sessions, full-history clients, 409s, recovery from a killed engine
replica) on mars-serve alone. Writes a list of
`{"check", "pass", "detail"}` rows.

    python -m bench.openai_conformance --model models/smollm2 \
        --out docs/results/openai_conformance.json

Requests go one at a time: on a CPU engine a batch's composition can move
bfloat16 logits, and the comparison is of one request's tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVED = "smollm2-135m-instruct"
KV_BLOCKS = 256
MAX_MODEL_LEN = 2048
START_TIMEOUT_S = 600.0
CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
            "additionalProperties": False,
        },
    },
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]


# ------------------------------------------------------------------- HTTP
def call(
    base: str,
    path: str,
    body: dict | None = None,
    headers: dict | None = None,
    method: str | None = None,
    timeout: float = 300,
) -> tuple[int, Any, dict]:
    """(status, parsed JSON or raw text, headers) of one request."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        base + path,
        data=data,
        method=method or ("POST" if body is not None else "GET"),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, _parse(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, _parse(exc.read()), dict(exc.headers)


def _parse(raw: bytes) -> Any:
    text = raw.decode(errors="replace")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _stream_raw(base: str, path: str, body: dict, headers: dict | None = None) -> list[Any]:
    """As `stream_events`, reading the body as text (a stream is not JSON)."""
    request = urllib.request.Request(
        base + path,
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    events: list[Any] = []
    with urllib.request.urlopen(request, timeout=300) as response:
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data: "):
                payload = line[6:]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# ---------------------------------------------------------------- servers
def _wait(url: str, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(url, timeout=5) as response,
        ):
            if response.status == 200:
                return
        time.sleep(2)
    raise RuntimeError(f"{what} not ready after {START_TIMEOUT_S:.0f} s")


@contextlib.contextmanager
def stock_vllm(model: Path, log: Path) -> Iterator[str]:
    """vLLM's own OpenAI server on `model`, as its users run it on CPU."""
    from cluster.ports import free_port

    port = free_port()
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", SERVED, "--port", str(port),
        "--block-size", "32", "--num-gpu-blocks-override", str(KV_BLOCKS),
        "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
        "--gpu-memory-utilization", "0.2", "--dtype", "bfloat16",
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
    ]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait(f"http://127.0.0.1:{port}/health", "stock vLLM", process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


@contextlib.contextmanager
def mars_serve(
    model: Path, workdir: Path, served: str = SERVED, tool_parser: str | None = "hermes"
) -> Iterator[str]:
    """mars-serve on `model`: two engine instances, Redis, one ingress."""
    import ray
    from ray import serve

    from cluster.app import build_app
    from cluster.local_redis import local_redis_server
    from cluster.ports import free_port
    from cluster.serve_env import serve_env

    os.environ.update(serve_env())
    port = free_port()
    (workdir / "redis").mkdir(exist_ok=True)
    with local_redis_server(workdir / "redis") as redis_url:
        config = workdir / "mars.yaml"
        config.write_text(
            f"""
model: {{path: {model.resolve()}, name: {served}, tool_parser: {tool_parser or "null"}}}
engine: {{num_kv_blocks: {KV_BLOCKS}, max_model_len: {MAX_MODEL_LEN}, dtype: bfloat16}}
policy: {{name: mars}}
instances: 2
dispatch: {{policy: round_robin}}
state_store: {{url: "{redis_url}", session_ttl_s: 600}}
tools: [{{name: calculate, kind: calculator}}]
http: {{port: {port}}}
"""
        )
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app({"config": str(config)}), name="conformance", route_prefix="/")
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.shutdown()
            ray.shutdown()


def engine_replica_pid(instance_id: str, app: str = "conformance", timeout_s: float = 120.0) -> int:
    """The process id of the live engine replica of `instance_id` in the Serve
    application `app`, asked of the replica actor itself. A replica killed
    just before is being replaced by Serve: its actor is gone from the names
    or dead for a while, so this waits (up to `timeout_s`) for one that answers."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    wanted = f"{app}#engine-{instance_id}#"
    deadline = time.monotonic() + timeout_s
    while True:
        named = [a for a in ray.util.list_named_actors(all_namespaces=True) if wanted in a["name"]]
        if len(named) == 1:
            replica = ray.get_actor(named[0]["name"], namespace=named[0]["namespace"])
            try:
                return ray.get(replica.__ray_call__.remote(lambda _: os.getpid()), timeout=30)
            except (RayActorError, GetTimeoutError):
                pass  # the dead one, not yet replaced
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"no live engine replica of {instance_id!r} in app {app!r} after {timeout_s} s "
                f"(named actors matching: {[a['name'] for a in named]})"
            )
        time.sleep(0.5)  # Serve's controller replaces a replica in seconds


def kill_engine_replica(instance_id: str, app: str = "conformance") -> int:
    """SIGKILL the process of the engine replica of `instance_id` in the Serve
    application `app`; return the pid."""
    pid = engine_replica_pid(instance_id, app)
    os.kill(pid, signal.SIGKILL)
    return pid


def _content(reply: dict) -> str | None:
    return reply["choices"][0]["message"]["content"]


# ----------------------------------------------------------------- checks
class Checks:
    """Each `check_*` method returns (pass, detail); `run` records them."""

    def __init__(self, mars: str, vllm: str) -> None:
        self.mars, self.vllm = mars, vllm
        self.rows: list[dict[str, Any]] = []

    def run(self, name: str, check: Callable[[], tuple[bool, str]]) -> None:
        started = time.monotonic()
        try:
            passed, detail = check()
        except Exception as exc:
            passed, detail = False, f"{type(exc).__name__}: {exc}"
        self.rows.append({"check": name, "pass": bool(passed), "detail": detail})
        mark = "PASS" if passed else "FAIL"
        print(f"{mark} {name} ({time.monotonic() - started:.1f} s): {detail}", flush=True)

    # -- helpers
    def both(self, path: str, body: dict) -> tuple[Any, Any]:
        a, b = (call(base, path, {"model": SERVED, **body}) for base in (self.mars, self.vllm))
        if a[0] != 200 or b[0] != 200:
            raise AssertionError(f"HTTP mars {a[0]} {a[1]!s:.200}, vLLM {b[0]} {b[1]!s:.200}")
        return a[1], b[1]

    def same_chat(self, body: dict, what: str) -> tuple[bool, str]:
        ours, theirs = self.both("/v1/chat/completions", {"messages": QUESTION, **body})
        a = [c["message"]["content"] for c in ours["choices"]]
        b = [c["message"]["content"] for c in theirs["choices"]]
        return a == b, f"{what}: mars {a!r:.120} / vLLM {b!r:.120}"

    def session(self, sid: str, messages: list[dict], **body) -> dict:
        status, reply, _ = call(
            self.mars,
            "/v1/chat/completions",
            {"model": SERVED, "messages": messages, "max_tokens": 16, "temperature": 0, **body},
            {"X-Session-Id": sid},
        )
        if status != 200:
            raise AssertionError(f"HTTP {status}: {reply}")
        return reply

    # -- sampling
    def check_temperature(self):
        return self.same_chat({"temperature": 0, "max_tokens": 24}, "greedy text")

    def check_seed(self):
        return self.same_chat({"temperature": 1.0, "seed": 1234, "max_tokens": 24}, "seed 1234")

    def check_top_p(self):
        return self.same_chat(
            {"temperature": 1.0, "top_p": 0.5, "seed": 7, "max_tokens": 24}, "top_p 0.5 seed 7"
        )

    def check_stop_strings(self):
        greedy, _ = self.both(
            "/v1/chat/completions", {"messages": QUESTION, "temperature": 0, "max_tokens": 24}
        )
        text = greedy["choices"][0]["message"]["content"]
        stop = next(w for w in text.split()[1:] if w.isalpha())
        ours, theirs = self.both(
            "/v1/chat/completions",
            {"messages": QUESTION, "temperature": 0, "max_tokens": 24, "stop": [stop]},
        )
        a, b = ours["choices"][0], theirs["choices"][0]
        ok = a["finish_reason"] == "stop" and stop not in a["message"]["content"]
        ok = ok and a["message"]["content"] == b["message"]["content"]
        return ok, f"stop {stop!r}: {a['message']['content']!r} ({a['finish_reason']})"

    def check_stop_token_ids(self):
        prompt = {"prompt": "The colours of the rainbow are", "temperature": 0, "max_tokens": 16}
        ours, _ = self.both("/v1/completions", {**prompt, "return_token_ids": True})
        stop_id = ours["choices"][0]["token_ids"][3]
        body = {**prompt, "stop_token_ids": [stop_id], "return_token_ids": True}
        a, b = self.both("/v1/completions", body)
        ids_a, ids_b = a["choices"][0]["token_ids"], b["choices"][0]["token_ids"]
        ok = ids_a == ids_b and ids_a[-1] == stop_id and len(ids_a) <= 4
        return ok, f"stop at id {stop_id}: mars {ids_a} / vLLM {ids_b}"

    def check_ignore_eos(self):
        body = {"messages": QUESTION, "temperature": 0, "max_tokens": 64, "ignore_eos": True}
        ours, theirs = self.both("/v1/chat/completions", body)
        a, b = ours["usage"]["completion_tokens"], theirs["usage"]["completion_tokens"]
        return a == b == 64, f"completion_tokens mars {a} / vLLM {b}"

    def check_logprobs(self):
        body = {"messages": QUESTION, "temperature": 0, "max_tokens": 6, "logprobs": True}
        ours, theirs = self.both("/v1/chat/completions", {**body, "top_logprobs": 2})
        a = [
            [t["token"] for t in e["top_logprobs"]]
            for e in ours["choices"][0]["logprobs"]["content"]
        ]
        b = [
            [t["token"] for t in e["top_logprobs"]]
            for e in theirs["choices"][0]["logprobs"]["content"]
        ]
        return a == b and len(a) == 6 and all(len(t) == 2 for t in a), f"top-2 tokens {a}"

    def check_n(self):
        body = {"messages": QUESTION, "temperature": 1.0, "seed": 3, "max_tokens": 12, "n": 2}
        ours, theirs = self.both("/v1/chat/completions", body)
        a = [c["message"]["content"] for c in ours["choices"]]
        b = [c["message"]["content"] for c in theirs["choices"]]
        return len(a) == 2 and a == b, f"two choices: {a!r:.160}"

    def check_echo(self):
        prompt = "Roses are red,"
        ours, theirs = self.both(
            "/v1/completions", {"prompt": prompt, "echo": True, "max_tokens": 8, "temperature": 0}
        )
        a, b = ours["choices"][0]["text"], theirs["choices"][0]["text"]
        return a == b and a.startswith(prompt), f"{a!r}"

    def check_token_id_prompt(self):
        ids = call(self.mars, "/tokenize", {"model": SERVED, "prompt": "Once upon a time"})[1]
        body = {"prompt": ids["tokens"], "max_tokens": 12, "temperature": 0}
        ours, theirs = self.both("/v1/completions", body)
        a, b = ours["choices"][0]["text"], theirs["choices"][0]["text"]
        return a == b, f"token prompt {ids['tokens']}: {a!r}"

    def check_batch_prompt(self):
        body = {"prompt": ["One, two,", "Red, green,"], "max_tokens": 8, "temperature": 0}
        ours, theirs = self.both("/v1/completions", body)
        a = sorted((c["index"], c["text"]) for c in ours["choices"])
        b = sorted((c["index"], c["text"]) for c in theirs["choices"])
        return a == b and len(a) == 2, f"mars {a} / vLLM {b}"

    def check_response_format_json_schema(self):
        schema = {
            "type": "object",
            "properties": {"colour": {"type": "string"}, "count": {"type": "integer"}},
            "required": ["colour", "count"],
            "additionalProperties": False,
        }
        body = {
            "messages": [{"role": "user", "content": "Give a colour and a number as JSON."}],
            "temperature": 0,
            "max_tokens": 64,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "pick", "schema": schema},
            },
        }
        ours, theirs = self.both("/v1/chat/completions", body)
        value = json.loads(ours["choices"][0]["message"]["content"])
        ok = set(value) == {"colour", "count"} and isinstance(value["count"], int)
        same = (
            ours["choices"][0]["message"]["content"] == theirs["choices"][0]["message"]["content"]
        )
        return ok and same, f"{value}"

    def _tools(self, choice: Any) -> tuple[list, list, dict, dict]:
        """(our calls, vLLM's calls, our choice, vLLM's choice) for a
        calculator question with two tools offered."""
        body = {
            "messages": [{"role": "user", "content": "What is 1234 * 5678? Use the calculator."}],
            "tools": [CALCULATOR, WEATHER],
            "tool_choice": choice,
            "temperature": 0,
            "max_tokens": 64,
        }
        ours, theirs = self.both("/v1/chat/completions", body)
        a, b = ours["choices"][0], theirs["choices"][0]
        calls = [
            (c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in a["message"].get("tool_calls") or ()
        ]
        theirs_calls = [
            (c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in b["message"].get("tool_calls") or ()
        ]
        return calls, theirs_calls, a, b

    def check_tools_required(self):
        calls, theirs, a, _ = self._tools("required")
        ok = bool(calls) and a["finish_reason"] == "tool_calls" and calls == theirs
        return ok, f"{calls} finish {a['finish_reason']}"

    def check_tools_named(self):
        named = {"type": "function", "function": {"name": "calculator"}}
        calls, theirs, a, _ = self._tools(named)
        ok = bool(calls) and calls[0][0] == "calculator" and calls == theirs
        return ok, f"{calls} finish {a['finish_reason']}"

    def check_tools_auto(self):
        calls, theirs, a, b = self._tools("auto")
        same = calls == theirs and a["message"].get("content") == b["message"].get("content")
        return same, f"calls {calls}, content {a['message'].get('content')!r:.80} (as vLLM)"

    # -- streaming
    def check_stream_usage(self):
        body = {
            "model": SERVED,
            "messages": QUESTION,
            "max_tokens": 8,
            "stream_options": {"include_usage": True},
        }
        events = _stream_raw(self.mars, "/v1/chat/completions", body)
        usage = [e["usage"] for e in events if isinstance(e, dict) and e.get("usage")]
        return bool(usage) and usage[-1]["completion_tokens"] == 8, f"{usage[-1:]}"

    def check_first_delta_role(self):
        events = _stream_raw(
            self.mars,
            "/v1/chat/completions",
            {"model": SERVED, "messages": QUESTION, "max_tokens": 4},
        )
        first = events[0]["choices"][0]["delta"]
        return first.get("role") == "assistant", f"first delta {first}"

    def check_multibyte_stream(self):
        messages = [{"role": "user", "content": "Repeat exactly: café, naïve, 日本語, ☕"}]
        body = {"model": SERVED, "messages": messages, "max_tokens": 32, "temperature": 0}
        events = _stream_raw(self.mars, "/v1/chat/completions", body)
        streamed = "".join(
            e["choices"][0]["delta"].get("content") or ""
            for e in events
            if isinstance(e, dict) and e.get("choices")
        )
        whole = call(self.mars, "/v1/chat/completions", body)[1]["choices"][0]["message"]["content"]
        ok = streamed == whole and "\ufffd" not in streamed
        return ok, f"streamed {streamed!r:.100}"

    # -- sessions
    def check_cached_tokens(self):
        history = [{"role": "user", "content": "Tell me about the Moon in one line."}]
        first = self.session("conf-cached", history, max_tokens=48)
        history += [first["choices"][0]["message"], {"role": "user", "content": "And Mars?"}]
        second = self.session("conf-cached", history)
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        return cached > 0 and cached == second["mars"]["kv"]["cached_tokens"], f"cached {cached}"

    def check_full_history_resend(self):
        history = [{"role": "user", "content": "List two planets."}]
        first = self.session("conf-full", history)
        history += [first["choices"][0]["message"], {"role": "user", "content": "One more."}]
        second = self.session("conf-full", history)
        record = call(self.mars, "/v1/sessions/conf-full")[1]
        expected = second["usage"]["prompt_tokens"] + second["usage"]["completion_tokens"]
        ok = record["tokens"] == expected and second["mars"]["history"]["matched_messages"] == 2
        return ok, f"record {record['tokens']} tokens = prompt + completion {expected}"

    def check_diverged_history(self):
        history = [{"role": "user", "content": "Name a fruit."}]
        first = self.session("conf-div", history)
        branch = [{"role": "user", "content": "Name a vegetable."}]
        second = self.session("conf-div", branch)
        diverged = second["mars"]["history"]["diverged_at"]
        record = call(self.mars, "/v1/sessions/conf-div")[1]
        expected = second["usage"]["prompt_tokens"] + second["usage"]["completion_tokens"]
        ok = diverged == 0 and record["tokens"] == expected and first
        return ok, f"diverged_at {diverged}, record {record['tokens']} tokens"

    def check_wrong_type_400(self):
        body = {"model": SERVED, "messages": QUESTION, "temperature": "hot"}
        a, b = (call(base, "/v1/chat/completions", body) for base in (self.mars, self.vllm))
        ok = a[0] == b[0] == 400 and "temperature" in json.dumps(a[1])
        return ok, f"mars {a[0]} {a[1]['error']['message']!r:.90} / vLLM {b[0]}"

    def check_unsupported_field_400(self):
        body = {"model": SERVED, "messages": QUESTION, "frobnicate": True}
        status, reply, _ = call(self.mars, "/v1/chat/completions", body)
        vllm_status = call(self.vllm, "/v1/chat/completions", body)[0]
        ok = status == 400 and reply["error"]["param"] == "frobnicate"
        return (
            ok,
            f"mars {status} naming {reply['error']['param']!r}; vLLM ignores it ({vllm_status})",
        )

    def check_concurrent_turn_409(self):
        self.session("conf-busy", QUESTION)
        results: list[int] = []

        def turn() -> None:
            body = {"model": SERVED, "messages": QUESTION, "max_tokens": 48}
            status = call(self.mars, "/v1/chat/completions", body, {"X-Session-Id": "conf-busy"})[0]
            results.append(status)

        threads = [threading.Thread(target=turn) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sorted(results) == [200, 409], f"statuses {sorted(results)}"

    def check_replica_kill_recovery(self):
        history = [{"role": "user", "content": "Count from one to five."}]
        twin_history = list(history)
        twin = self.session("conf-twin", twin_history)
        victim = self.session("conf-victim", history)
        kill_engine_replica(victim["mars"]["instance_id"])
        for messages, first in ((history, victim), (twin_history, twin)):
            messages += [first["choices"][0]["message"], {"role": "user", "content": "Again."}]
        twin_second = self.session("conf-twin", twin_history)
        deadline = time.monotonic() + 180
        while True:
            status, reply, headers = call(
                self.mars,
                "/v1/chat/completions",
                {"model": SERVED, "messages": history, "max_tokens": 16, "temperature": 0},
                {"X-Session-Id": "conf-victim"},
            )
            if status == 200 or time.monotonic() > deadline:
                break
            if status != 503 or "Retry-After" not in headers:
                return False, f"HTTP {status} {headers.get('Retry-After')}: {reply}"
            time.sleep(float(headers["Retry-After"]))
        kv = reply["mars"]["kv"]
        same = _content(reply) == _content(twin_second)
        ok = status == 200 and kv["rebuilt_from_record"] and kv["resumed_from"] is None and same
        cached = kv["cached_tokens"]
        return ok, (
            f"rebuilt from the record on {reply['mars']['instance_id']} (cached {cached}: the "
            f"prefix another session left there), same answer as the twin: {same}"
        )

    def check_server_side_tool(self):
        tool = {**CALCULATOR, "function": {**CALCULATOR["function"], "name": "calculate"}}
        body = {
            "model": SERVED,
            "messages": [{"role": "user", "content": "What is 1234 * 5678? Use the calculator."}],
            "tools": [tool],
            "tool_choice": "required",
            "temperature": 0,
            "max_tokens": 64,
        }
        status, reply, _ = call(self.mars, "/v1/chat/completions", body)
        if status != 200:
            return False, f"HTTP {status}: {reply}"
        ran = reply["mars"].get("server_tool_calls") or []
        answer = _content(reply) or ""
        ok = (
            len(ran) >= 1
            and ran[0]["name"] == "calculate"
            and not reply["choices"][0]["message"].get("tool_calls")
        )
        results = [(c["arguments"], c["result"]) for c in ran]
        return ok, f"the server ran calculate {results}; answer {answer!r:.80}"


ORDER = [
    "temperature", "seed", "top_p", "stop_strings", "stop_token_ids", "ignore_eos", "logprobs",
    "n", "echo", "token_id_prompt", "batch_prompt", "response_format_json_schema",
    "tools_required", "tools_named", "tools_auto", "stream_usage", "cached_tokens",
    "first_delta_role", "multibyte_stream", "full_history_resend", "diverged_history",
    "wrong_type_400", "unsupported_field_400", "concurrent_turn_409", "replica_kill_recovery",
    "server_side_tool",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO_ROOT / "models" / "smollm2"))
    parser.add_argument("--out", default=str(REPO_ROOT / "docs/results/openai_conformance.json"))
    parser.add_argument("--only", nargs="*", help="run only these checks")
    args = parser.parse_args()
    model = Path(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with stock_vllm(model, work / "vllm.log") as vllm, mars_serve(model, work) as mars:
            checks = Checks(mars, vllm)
            for name in args.only or ORDER:
                checks.run(name, getattr(checks, f"check_{name}"))
    rows = checks.rows
    out = Path(args.out)
    if args.only and out.exists():  # refresh those rows, keep the others
        fresh = {row["check"]: row for row in rows}
        rows = [fresh.pop(row["check"], row) for row in json.loads(out.read_text())]
        rows += list(fresh.values())
    out.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    passed = sum(row["pass"] for row in rows)
    print(f"{passed} of {len(rows)} checks pass; written to {args.out}")


if __name__ == "__main__":
    main()
