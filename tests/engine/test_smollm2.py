"""SmolLM2-135M-Instruct, converted by `make model-smollm2`, on a real vLLM CPU engine.

Builds nothing: the model comes from ``$MARS_SMOLLM2_MODEL_DIR`` (the
`smollm2_model_dir` fixture; `make test` sets it). One vLLM engine in a child
process answers a question through the saved chat template and, held to a
JSON schema by structured outputs, produces a calculator call that vLLM's
`hermes` parser reads once wrapped as the template instructs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression and return the result.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. 2 * (3 + 4)"}},
            "required": ["expression"],
        },
    },
}

# What a server asks for when a tool call is required: one of the tools' names
# and arguments that fit its parameters (the shape of the Hermes call JSON).
TOOL_CALL_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["calculator"]},
        "arguments": {**CALCULATOR["function"]["parameters"], "additionalProperties": False},
    },
    "required": ["name", "arguments"],
    "additionalProperties": False,
}

# Greedy decoding is only as stable across CPUs as its closest call: asked "What
# is the capital of France?", the first token's top two ('The', 'L') are 0.12
# nat apart, and a CPU with other bf16 kernels answered "L'Étoile, la
# Marseillaise, ...". This wording's closest call on the way to "Paris" is
# 0.87 nat ('The' over the next).
QUESTION = "Name the capital city of France."

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

_VLLM_CHECK = textwrap.dedent(
    """
    import json, sys, time
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.sampling_params import StructuredOutputsParams
        from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser

        model, tool, schema = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
        asked = sys.argv[4]
        started = time.perf_counter()
        llm = LLM(model=model, max_model_len=2048, block_size=32, enforce_eager=True,
                  kv_cache_memory_bytes=64 * 2**20, seed=0)
        init_s = time.perf_counter() - started

        question = [{"role": "user", "content": asked}]
        answer = llm.chat(question, SamplingParams(max_tokens=48, temperature=0))[0]

        ask = [{"role": "user", "content": "What is 17 + 25? Use the calculator."}]
        forced = SamplingParams(
            max_tokens=64, temperature=0, structured_outputs=StructuredOutputsParams(json=schema)
        )
        call = llm.chat(ask, forced, tools=[tool])[0]

        # The format the template instructs, parsed with the model's own tokenizer.
        parser = Hermes2ProToolParser(llm.get_tokenizer())
        request = ChatCompletionRequest(model=model, messages=ask, tools=[tool])
        wrapped = "<tool_call>\\n" + call.outputs[0].text + "\\n</tool_call>"
        parsed = parser.extract_tool_calls(wrapped, request)
        print("RESULT " + json.dumps({
            "init_s": init_s,
            "answer_prompt": answer.prompt,
            "answer_prompt_ids": list(answer.prompt_token_ids),
            "answer": answer.outputs[0].text,
            "answer_finish": answer.outputs[0].finish_reason,
            "answer_ids": list(answer.outputs[0].token_ids),
            "eos_id": llm.get_tokenizer().eos_token_id,
            "call_prompt": call.prompt,
            "call": call.outputs[0].text,
            "parsed": [
                {"name": c.function.name, "arguments": c.function.arguments}
                for c in parsed.tool_calls
            ] if parsed.tools_called else None,
        }))
    """
)


@pytest.mark.timeout(150)
def test_vllm_answers_and_calls_the_calculator(smollm2_model_dir: Path) -> None:
    # In-process engine core in a child process, as for the tiny model: fewer
    # processes to start on 2 cores, and vLLM's state stays out of pytest.
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    argv = [str(smollm2_model_dir), json.dumps(CALCULATOR), json.dumps(TOOL_CALL_SCHEMA), QUESTION]
    proc = subprocess.run(
        [sys.executable, "-c", _VLLM_CHECK, *argv],
        capture_output=True,
        text=True,
        timeout=140,
        env=env,
        cwd=REPO_ROOT,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))

    # The saved template: SmolLM2's own ChatML, default system prompt included,
    # and no BOS of the tokenizer's before it (<|im_start|> is id 1, once a turn).
    assert result["answer_prompt"] == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert result["answer_prompt_ids"][0] == 1 and result["answer_prompt_ids"].count(1) == 3
    assert "Paris" in result["answer"], result["answer"]
    # vLLM stopped on <|im_end|> (the EOS), not on the token limit.
    assert result["answer_finish"] == "stop", result
    assert result["eos_id"] == 2 and result["answer_ids"][-1] == 2

    assert "<tools>\n" + json.dumps(CALCULATOR["function"]) + "\n</tools>" in result["call_prompt"]
    call = json.loads(result["call"])
    assert call["name"] == "calculator"
    expression = call["arguments"]["expression"]
    assert "17" in expression and "25" in expression, call
    assert result["parsed"] == [{"name": "calculator", "arguments": json.dumps(call["arguments"])}]
