"""The session-mechanism spike (issue 11): how should a session live between
its turns inside one vLLM 0.32 engine?

A. *Streaming input* (the mechanism before issue 11): a session is one
   resumable vLLM request; each turn is an input chunk; between chunks the
   request waits in the scheduler holding its KV.
B. *One request per turn*: every turn is an ordinary vLLM request whose
   prompt is the session's whole context; between turns the last turn's
   blocks are kept (the scheduler delays freeing them: preserve) or given
   back to the prefix cache (discard), and the next turn finds them through
   prefix caching.

For each context length, both run the same two-turn conversation at
temperature 0 and the spike reports the resumed turn's time to first token,
the tokens vLLM computed again for it, and whether both continuations are
the same tokens. It also checks, for B, what A cannot do: stop strings and
a seeded temperature-1 sample on a resumed turn.

    python -m bench.session_spike --model models/tiny

Self-contained on purpose: mechanism A no longer exists in `workers/`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import ClassVar

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus


class PinningScheduler(Scheduler):
    """B's scheduler: a finished request named in `pin` keeps its blocks
    until `unpin` (what `MarsScheduler` does for a preserved session)."""

    pin: ClassVar[set[str]] = set()

    def _free_request(self, request, delay_free_blocks: bool = False):
        keep = request.request_id.rsplit("-", 1)[0] in PinningScheduler.pin
        return super()._free_request(request, delay_free_blocks or keep)

    def unpin(self, external_id: str) -> None:
        PinningScheduler.pin.discard(external_id)
        (internal,) = [r for r in self.requests if r.rsplit("-", 1)[0] == external_id]
        self._free_blocks(self.requests[internal])


def _engine(model: str, *, prefix_caching: bool, blocks: int):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    return LLMEngine.from_engine_args(
        EngineArgs(
            model=model,
            dtype="bfloat16",
            block_size=32,
            max_model_len=4096,
            max_num_batched_tokens=384,
            num_gpu_blocks_override=blocks,
            gpu_memory_utilization=0.2,
            enable_prefix_caching=prefix_caching,
            enforce_eager=True,
            scheduler_cls=PinningScheduler if prefix_caching else None,
        )
    )


def _run(llm, request_id: str, prompt, params, *, resumable: bool = False, stream=None):
    """Add a request; step until its first token and until it ends. Returns
    (ttft_s, token ids, num_cached_tokens); `_run.text` holds the text."""
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    if stream is not None:
        llm.add_request(request_id, stream, params)
    else:
        llm.add_request(request_id, TokensPrompt(prompt_token_ids=prompt), params)
    ttft, tokens, cached = None, [], None
    while True:
        for out in llm.step():
            if out.request_id != request_id:
                continue
            completion = out.outputs[0]
            if completion.token_ids and ttft is None:
                ttft = time.perf_counter() - started
            tokens.extend(completion.token_ids)
            cached = out.num_cached_tokens if cached is None else cached
            if completion.finish_reason is not None:
                _run.text = completion.text
                return ttft, tokens, cached


def per_turn(llm, context: list[int], new: list[int], gen: int, tag: str) -> dict:
    """B: turn 1, pinned; turn 2 as a fresh request on the whole context."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        max_tokens=gen, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA
    )
    core = llm.engine_core.engine_core
    first = f"{tag}-t1"
    PinningScheduler.pin.add(first)
    _, out1, _ = _run(llm, first, context, params)
    prompt2 = [*context, *out1, *new]
    ttft, out2, cached = _run(llm, f"{tag}-t2", prompt2, params)
    core.scheduler.unpin(first)
    return {"ttft_s": ttft, "out1": out1, "out2": out2, "recomputed": len(prompt2) - cached}


def streaming(llm, context: list[int], new: list[int], gen: int, tag: str) -> dict:
    """A: one resumable request, two chunks (the second carries the first
    chunk's last sampled token, which streaming input does not keep)."""
    import copy

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        max_tokens=gen, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA
    )
    processor = llm.input_processor

    def chunk(tokens, resumable):
        request = processor.process_inputs(
            tag,
            TokensPrompt(prompt_token_ids=tokens),
            params,
            supported_tasks=("generate",),
            resumable=resumable,
        )
        return request

    first = chunk(context, True)
    processor.assign_request_id(first)
    engine_id = first.request_id
    llm.output_processor.add_request(first, None)
    core_first = copy.copy(first)
    core_first.prompt_token_ids = list(first.prompt_token_ids)
    llm.engine_core.add_request(core_first)
    out1 = _drain(llm, tag)
    started = time.perf_counter()
    second = chunk([out1[-1], *new], True)
    second.request_id = engine_id
    second.external_req_id = tag
    llm.output_processor.add_request(second, None)
    core_second = copy.copy(second)
    core_second.prompt_token_ids = list(second.prompt_token_ids)
    llm.engine_core.add_request(core_second)
    out2, ttft = _drain(llm, tag, started)
    llm.engine_core.engine_core.scheduler.finish_requests(
        [engine_id], finished_status=RequestStatus.FINISHED_ABORTED
    )
    return {"ttft_s": ttft, "out1": out1, "out2": out2, "recomputed": len(new) + 1}


def _drain(llm, tag, started=None):
    tokens, ttft = [], None
    while True:
        for out in llm.step():
            if out.request_id != tag:
                continue
            completion = out.outputs[0]
            if completion.token_ids and ttft is None and started is not None:
                ttft = time.perf_counter() - started
            tokens.extend(completion.token_ids)
            if completion.finish_reason is not None:
                return tokens if started is None else (tokens, ttft)


def features(llm, vocab: int) -> dict:
    """What B gives a resumed turn for free: stop strings and a seeded sample."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    final = RequestOutputKind.FINAL_ONLY

    tokenizer = llm.get_tokenizer()
    context = list(range(10, 200))
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, output_kind=final)
    _, out, _ = _run(llm, "feat-1", context, greedy)
    _, again, _ = _run(llm, "feat-1b", [*context, *out[:1]], greedy)
    text = tokenizer.decode(again)
    letters = [c for c in text[len(text) // 3 :] if c.isascii() and c.isalpha()]
    stop = letters[0] if letters else "e"
    params = SamplingParams(
        max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop], output_kind=final
    )
    _run(llm, "feat-2", [*context, *out[:1]], params)
    stopped_text = _run.text
    seeded = SamplingParams(
        max_tokens=16, temperature=1.0, seed=7, ignore_eos=True, output_kind=final
    )
    _, a, _ = _run(llm, "feat-3", [*context, *out], seeded)
    _, b, _ = _run(llm, "feat-4", [*context, *out], seeded)
    return {
        "stop_string": stop,
        "stop_string_honoured": stop not in stopped_text and len(stopped_text) < len(text),
        "seeded_resume_reproducible": a == b,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/tiny")
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 2048, 3968])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="docs/results/session_spike.json")
    args = parser.parse_args()
    rows = []
    for mechanism in ("streaming_input", "per_turn_prefix_cache"):
        llm = _engine(args.model, prefix_caching=mechanism != "streaming_input", blocks=512)
        run = streaming if mechanism == "streaming_input" else per_turn
        for context_len in args.contexts:
            ttfts, same = [], []
            for repeat in range(args.repeats):
                base = 3 + repeat
                context = [(base + 7 * i) % 500 + 3 for i in range(context_len - 32)]
                new = [(base + 11 * i) % 500 + 3 for i in range(16)]
                result = run(llm, context, new, 16, f"{mechanism}-{context_len}-{repeat}")
                ttfts.append(result["ttft_s"])
                same.append((result["out1"], result["out2"]))
            rows.append(
                {
                    "mechanism": mechanism,
                    "context_tokens": context_len - 16,
                    "resume_ttft_ms_median": 1000 * statistics.median(ttfts),
                    "resume_ttft_ms_all": [round(1000 * t, 2) for t in ttfts],
                    "recomputed_tokens": result["recomputed"],
                    "outputs": same[0],
                }
            )
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "outputs"}))
        if mechanism != "streaming_input":
            rows.append({"mechanism": mechanism, "features": features(llm, 512)})
            print(json.dumps(rows[-1]))
        llm.engine_core.shutdown()
        from vllm.distributed import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
    by = {}
    for row in rows:
        if "outputs" in row:
            by.setdefault(row["context_tokens"], []).append(row["outputs"])
    for context, outs in by.items():
        print(f"context {context}: continuations identical across mechanisms: {outs[0] == outs[1]}")
    for row in rows:
        row.pop("outputs", None)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
