"""Full-history matching (`cluster.history`) against a ChatML-like template
rendered character by character (one token per character), so that every
expected prompt can be written out by hand."""

from __future__ import annotations

import asyncio

from cluster.history import (
    close_after,
    message_digest,
    plan_chat_prompt,
    plan_text_prompt,
    plan_token_prompt,
)
from cluster.state_store import MessageMark


def _render(messages, *, generation_prompt: bool) -> str:
    text = "".join(f"<{m['role']}>{m.get('content') or ''}|\n" for m in messages)
    return text + ("<assistant>" if generation_prompt else "")


def _tokens(text: str) -> list[int]:
    return [ord(c) for c in text]


CLOSING = _tokens("|\n")  # what the template writes after an assistant's content


def _plan(record_tokens, marks, messages):
    async def render_prefix(count: int) -> list[int]:
        return _tokens(_render(messages[:count], generation_prompt=False))

    full = _tokens(_render(messages, generation_prompt=True))
    digests = [message_digest(m) for m in messages]
    return asyncio.run(
        plan_chat_prompt(record_tokens, marks, digests, full, render_prefix, CLOSING)
    )


USER = {"role": "user", "content": "6*7?"}
GENERATED = "<call>6*7</call>|"  # the model's own tokens, ending on its end-of-turn mark
ANSWER = {"role": "assistant", "content": "<call>6*7</call>"}  # as the response showed it


def _after_first_turn():
    """The record after one turn: the rendered prompt plus what the engine generated."""
    first = _plan((), (), [USER])
    assert first.from_record == 0 and first.diverged_at is None
    tokens = [*first.token_ids, *_tokens(GENERATED)]
    marks = (*first.messages, MessageMark(message_digest(ANSWER), len(tokens), True))
    return tokens, marks


def test_a_resent_history_appends_only_the_new_messages() -> None:
    tokens, marks = _after_first_turn()
    tool = {"role": "tool", "content": "42", "tool_call_id": "c1"}
    plan = _plan(tokens, marks, [USER, ANSWER, tool])
    # The record's tokens as generated (not re-rendered), the close the model
    # did not write ("\n"), then the new message and the generation prompt.
    assert plan.token_ids == [*tokens, *_tokens("\n<tool>42|\n<assistant>")]
    assert (plan.from_record, plan.matched_messages, plan.diverged_at) == (len(tokens), 2, None)
    assert [m.end for m in plan.messages] == [marks[0].end, len(tokens), len(tokens) + 1 + 10]


def test_an_edited_history_continues_from_where_it_diverged() -> None:
    tokens, marks = _after_first_turn()
    edited = {"role": "user", "content": "6*8?"}
    plan = _plan(tokens, marks, [edited])
    assert plan.token_ids == _tokens(_render([edited], generation_prompt=True))
    assert (plan.from_record, plan.matched_messages, plan.diverged_at) == (0, 0, 0)


def test_a_retried_turn_drops_the_answer_it_replaces() -> None:
    tokens, marks = _after_first_turn()
    plan = _plan(tokens, marks, [USER])
    assert plan.token_ids == _tokens(_render([USER], generation_prompt=True))
    assert plan.diverged_at == 1 and plan.matched_messages == 1
    assert plan.from_record == marks[0].end


def test_a_template_that_is_not_prefix_stable_renders_afresh() -> None:
    tokens, marks = _after_first_turn()
    messages = [USER, ANSWER, {"role": "user", "content": "and 6*8?"}]

    async def unstable_prefix(count: int) -> list[int]:
        return _tokens("!" + _render(messages[:count], generation_prompt=False))

    full = _tokens(_render(messages, generation_prompt=True))
    digests = [message_digest(m) for m in messages]
    plan = asyncio.run(plan_chat_prompt(tokens, marks, digests, full, unstable_prefix, CLOSING))
    assert plan.token_ids == full and not plan.stable and plan.from_record == 0


def test_the_close_added_after_generated_tokens() -> None:
    assert close_after([1, 2, 9], [9, 10]) == [10]  # stopped on the end-of-turn token
    assert close_after([1, 2, 3], [9, 10]) == [9, 10]  # cut by max_tokens
    assert close_after([9, 10], [9, 10]) == []
    assert close_after([], [9, 10]) == [9, 10]


def test_digests_compare_what_the_client_sees() -> None:
    call = {
        "id": "call-1",
        "type": "function",
        "function": {"name": "calc", "arguments": '{"x": 1}'},
    }
    same = {"id": "other", "type": "function", "function": {"name": "calc", "arguments": {"x": 1}}}
    a = {"role": "assistant", "content": None, "tool_calls": [call]}
    b = {"role": "assistant", "content": "", "tool_calls": [same]}
    assert message_digest(a) == message_digest(b)  # ids and JSON spelling do not matter
    c = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{**same, "function": {"name": "calc", "arguments": {"x": 2}}}],
    }
    assert message_digest(a) != message_digest(c)
    parts = {
        "role": "user",
        "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}],
    }
    assert message_digest(parts) == message_digest({"role": "user", "content": "hi there"})
    assert message_digest({"role": "user", "content": "x"}) != message_digest(
        {"role": "system", "content": "x"}
    )


def test_completion_prompts_against_the_record() -> None:
    plan = plan_token_prompt([1, 2, 3, 4], [1, 2, 3, 4, 5, 6])
    assert (plan.token_ids, plan.from_record, plan.diverged_at) == ([1, 2, 3, 4, 5, 6], 4, None)
    plan = plan_token_prompt([1, 2, 3, 4], [1, 2, 9])
    assert (plan.from_record, plan.diverged_at) == (2, 2)

    def tokenize(text: str) -> list[int]:
        return [100 + ord(c) for c in text]

    plan = plan_text_prompt([7, 8], "ab", "abcd", tokenize("abcd"), tokenize)
    assert plan.token_ids == [7, 8, 199, 200] and plan.from_record == 2
    plan = plan_text_prompt([7, 8], "ab", "xbcd", tokenize("xbcd"), tokenize)
    assert plan.token_ids == tokenize("xbcd") and plan.diverged_at == 0
