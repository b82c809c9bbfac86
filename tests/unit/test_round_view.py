"""What a streaming client sees of one round of server-side tool calls
(`cluster.round_view`), on chunks shaped as vLLM's chat stream sends them."""

from __future__ import annotations

import json
from typing import Any

from cluster import sse
from cluster.round_view import RoundView

SERVER = frozenset({"calc"})


def _chunk(delta: dict[str, Any] | None = None, finish: str | None = None) -> str:
    choice = {"index": 0, "delta": delta or {}, "finish_reason": finish}
    return sse.event({"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [choice]})


def _call(index: int, name: str | None = None, arguments: str = "", id_: str | None = None):
    function = {"arguments": arguments, **({"name": name} if name else {})}
    return {"tool_calls": [{"index": index, "id": id_, "function": function}]}


ROLE = _chunk({"role": "assistant", "content": ""})
TEXT = _chunk({"content": "let me see"})
CALC = [_chunk(_call(0, "calc", id_="call-1")), _chunk(_call(0, arguments='{"e": "6*7"}'))]
FINISH = _chunk(finish="tool_calls")
USAGE = sse.event({"id": "chatcmpl-1", "choices": [], "usage": {"completion_tokens": 9}})
MARS = sse.event({"id": "mars-1", "choices": [], "mars": {"instance_id": "default-0"}})
ROUND = [ROLE, TEXT, *CALC, FINISH, USAGE, MARS, sse.DONE]


def _seen(view: RoundView, chunks: list[str], *, ended: bool = True) -> list[str]:
    return [out for chunk in chunks for out in view.take(chunk, ended=ended)]


def test_a_round_of_server_side_calls_shows_only_its_content() -> None:
    view = RoundView(SERVER, may_call=True, first=True)
    assert _seen(view, ROUND) == [ROLE, TEXT]
    assert view.between
    message = view.message.message()
    assert message["content"] == "let me see"
    call = message["tool_calls"][0]
    assert call["id"] == "call-1"
    assert call["function"] == {"name": "calc", "arguments": '{"e": "6*7"}'}


def test_a_later_round_does_not_repeat_the_role_chunk() -> None:
    view = RoundView(SERVER, may_call=True, first=False)
    answer = [ROLE, TEXT, _chunk(finish="stop"), USAGE, MARS, sse.DONE]
    assert _seen(view, answer) == answer[1:]
    assert not view.between


def test_a_call_the_client_runs_releases_the_held_calls_in_order() -> None:
    view = RoundView(SERVER, may_call=True, first=True)
    client = _chunk(_call(1, "search", arguments="{}", id_="call-2"))
    chunks = [ROLE, *CALC, client, FINISH, USAGE, MARS, sse.DONE]
    assert _seen(view, chunks) == chunks
    assert not view.between


def test_a_round_without_rounds_left_streams_as_it_is() -> None:
    view = RoundView(SERVER, may_call=False, first=True)
    assert _seen(view, ROUND) == ROUND
    assert not view.between


def test_content_beside_a_held_call_goes_out_at_once_and_only_once() -> None:
    both = _chunk({"content": "ok ", **_call(0, "calc", id_="call-1")})
    chunks = [both, CALC[1], FINISH, sse.DONE]
    view = RoundView(SERVER, may_call=True, first=True)
    out = _seen(view, chunks)
    assert [json.loads(c[6:])["choices"][0]["delta"] for c in out] == [{"content": "ok "}]
    assert view.between

    # The same round after a failure is not run: it ends as vLLM sent it,
    # without the content twice.
    view = RoundView(SERVER, may_call=True, first=True)
    out = _seen(view, chunks, ended=False)
    contents = [json.loads(c[6:])["choices"][0]["delta"].get("content") for c in out[:-1]]
    assert contents.count("ok ") == 1 and out[-1] == sse.DONE
    assert not view.between


def test_an_in_band_error_ends_the_round_with_what_was_held() -> None:
    error = sse.event({"error": {"message": "engine failed", "code": 503}})
    view = RoundView(SERVER, may_call=True, first=True)
    assert _seen(view, [ROLE, *CALC, error, sse.DONE]) == [ROLE, *CALC, error, sse.DONE]
    assert not view.between
