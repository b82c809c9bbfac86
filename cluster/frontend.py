"""vLLM's own OpenAI front end, in the ingress, on top of the cluster's engines.

The ingress renders, parses and formats exactly as `vllm serve` does: it
runs vLLM's `OpenAIServingChat`, `OpenAIServingCompletion` and
`ServingTokenization` (chat templates, tool parsers, `response_format` and
`tool_choice` grammars, logprobs, n, echo, usage, streaming deltas, error
shapes). What vLLM's server would hand to its in-process `AsyncLLM`,
`ClusterEngineClient.generate` hands to a `Turn`: it places the turn on an
engine instance and streams vLLM's `RequestOutput`s back from it over Ray.

Two hooks adapt vLLM's serving classes to sessions: the rendered prompt of a
session's turn is replaced by the one `cluster.history` plans from the
session's record, and nothing else changes. Every vLLM internal used here
is in this module, pinned to vLLM 0.32.0.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from vllm.engine.protocol import EngineClient
from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
from vllm.exceptions import RetryableRequestError

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.outputs import RequestOutput


class EngineUnavailable(RetryableRequestError):
    """The turn's engine instance failed or did not answer in time; the
    session's record is left as it was before the turn, so a retry goes on
    from there. vLLM's serving layer answers it with a 503 (in-band for a
    stream); the ingress adds `Retry-After`."""


class TurnRunner(Protocol):
    """What `ClusterEngineClient` hands a turn to (`cluster.turn.Turn`)."""

    def plan_prompt(
        self, rendered: list[int], render_prefix: Any, request: Any
    ) -> Awaitable[list[int]]: ...

    def run(
        self, prompt_token_ids: list[int], sampling: SamplingParams, request_id: str
    ) -> AsyncGenerator[RequestOutput, None]: ...


class TurnRegistry:
    """The turns in flight in this ingress, by the request id the ingress gave
    vLLM's serving layer (which prefixes it, `chatcmpl-<id>`, and suffixes a
    completion's prompts, `cmpl-<id>-<i>`)."""

    def __init__(self) -> None:
        self._turns: dict[str, TurnRunner] = {}

    def add(self, key: str, turn: TurnRunner) -> None:
        self._turns[key] = turn

    def remove(self, key: str) -> None:
        self._turns.pop(key, None)

    def find(self, vllm_request_id: str) -> TurnRunner:
        _, _, rest = vllm_request_id.partition("-")
        key = rest.split("-", 1)[0]
        try:
            return self._turns[key]
        except KeyError:
            raise RuntimeError(f"no turn registered for vLLM request {vllm_request_id!r}") from None


class ClusterEngineClient(EngineClient):
    """vLLM's `EngineClient`, served by the cluster's engine instances: the
    serving layer's one call that reaches an engine, `generate`, goes to
    the turn the ingress registered; the rest is the front end's own
    config, renderer and input processor. Engine-management calls that
    vLLM's server exposes (sleep, LoRA, profiling) are not part of this
    front end and raise."""

    def __init__(self, vllm_config, renderer, input_processor, turns: TurnRegistry) -> None:
        self.vllm_config = vllm_config
        self.model_config = vllm_config.model_config
        self.renderer = renderer
        self.input_processor = input_processor
        self._turns = turns

    @property
    def is_running(self) -> bool:
        return True

    @property
    def is_stopped(self) -> bool:
        return False

    @property
    def errored(self) -> bool:
        return False

    @property
    def dead_error(self) -> BaseException:
        return RuntimeError("the cluster front end has no engine of its own")

    def check_admission(self, n: int = 1, request_id: str | None = None) -> None:
        """Admission is the cluster's: placement and each engine's scheduler."""

    async def generate(
        self, prompt: Any, sampling_params: SamplingParams, request_id: str, **_: Any
    ) -> AsyncGenerator[RequestOutput, None]:
        turn = self._turns.find(request_id)
        async for output in turn.run(list(prompt["prompt_token_ids"]), sampling_params, request_id):
            yield output

    def get_supported_tasks(self) -> tuple[str, ...]:
        return ("generate",)

    async def abort(self, request_id: Any) -> None:
        """Turns abort themselves when their caller stops reading them."""

    async def is_tracing_enabled(self) -> bool:
        return False

    async def do_log_stats(self) -> None:
        return None

    async def check_health(self) -> None:
        return None

    async def notify_kv_transfer_request_rejected(self, *args: Any, **kwargs: Any) -> None:
        return None

    def encode(self, *args: Any, **kwargs: Any):
        raise NotImplementedError("pooling models are not served by mars-serve")

    def _unsupported(self, *args: Any, **kwargs: Any):
        raise NotImplementedError("engine management is not part of the mars-serve front end")

    start_profile = stop_profile = reset_mm_cache = reset_encoder_cache = _unsupported
    reset_prefix_cache = sleep = release_kv_cache_memory = wake_up = is_sleeping = _unsupported
    add_lora = pause_generation = resume_generation = is_paused = _unsupported
    collective_rpc = scale_elastic_ep = _unsupported

    def shutdown(self, timeout: float | None = None) -> None:
        return None


class SessionChatServing(OpenAIServingChat):
    """vLLM's chat serving, with a session turn's prompt planned from its
    record (`cluster.history`)."""

    turns: TurnRegistry

    async def render_chat_request(self, request):
        result = await super().render_chat_request(request)
        if not isinstance(result, tuple):
            return result  # vLLM's ErrorResponse
        conversation, engine_inputs = result
        turn = self.turns.find(f"chatcmpl-{request.request_id}")

        async def render_prefix(count: int) -> list[int]:
            prefix = request.model_copy(
                update={
                    "messages": request.messages[:count],
                    "add_generation_prompt": False,
                    "continue_final_message": False,
                }
            )
            rendered = await self.online_renderer.render_chat(prefix)
            if not isinstance(rendered, tuple):
                raise ValueError(f"messages[:{count}] cannot be rendered: {rendered}")
            return list(rendered[1][0]["prompt_token_ids"])

        rendered = list(engine_inputs[0]["prompt_token_ids"])
        engine_inputs[0]["prompt_token_ids"] = await turn.plan_prompt(
            rendered, render_prefix, request
        )
        return conversation, engine_inputs


class SessionCompletionServing(OpenAIServingCompletion):
    """vLLM's completion serving, with a session turn's prompt planned from
    its record."""

    turns: TurnRegistry

    async def render_completion_request(self, request):
        result = await super().render_completion_request(request)
        if not isinstance(result, list):
            return result
        turn = self.turns.find(f"cmpl-{request.request_id}")
        rendered = list(result[0]["prompt_token_ids"])
        result[0]["prompt_token_ids"] = await turn.plan_prompt(rendered, None, request)
        return result


@dataclass(frozen=True)
class FrontendSettings:
    """What the front end needs of the serving config."""

    model_path: str
    served_name: str
    max_model_len: int
    block_size: int
    tool_parser: str | None
    """vLLM's tool parser for `tool_choice: auto` (e.g. `hermes`); None
    refuses `auto` with tools, as `vllm serve` without
    `--enable-auto-tool-choice` does."""


@dataclass
class Frontend:
    chat: SessionChatServing
    completion: SessionCompletionServing
    tokenization: Any
    models: Any
    turns: TurnRegistry
    tokenizer: Any
    closing: list[int]
    """The chat template's close of an assistant message, as tokens."""


def build_frontend(settings: FrontendSettings) -> Frontend:
    """vLLM's front-end objects for the model, as `vllm serve` builds them
    (`vllm/entrypoints/launchers`), without an engine."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.openai.models.protocol import BaseModelPath
    from vllm.entrypoints.openai.models.serving import OpenAIModelRegistry
    from vllm.entrypoints.serve.tokenize.serving import ServingTokenization
    from vllm.renderers import renderer_from_config
    from vllm.renderers.online_renderer import OnlineRenderer
    from vllm.v1.engine.input_processor import InputProcessor

    vllm_config = EngineArgs(
        model=settings.model_path,
        served_model_name=[settings.served_name],
        max_model_len=settings.max_model_len,
        block_size=settings.block_size,
        enforce_eager=True,
    ).create_engine_config()
    renderer = renderer_from_config(vllm_config)
    turns = TurnRegistry()
    client = ClusterEngineClient(
        vllm_config, renderer, InputProcessor(vllm_config, renderer), turns
    )
    models = OpenAIModelRegistry(
        vllm_config.model_config,
        [BaseModelPath(name=settings.served_name, model_path=settings.model_path)],
    )
    auto_tools = settings.tool_parser is not None
    common = dict(request_logger=None, chat_template=None, chat_template_content_format="auto")
    online = OnlineRenderer(
        vllm_config.model_config,
        renderer,
        **common,
        enable_auto_tools=auto_tools,
        tool_parser=settings.tool_parser,
    )
    chat = SessionChatServing(
        client,
        models,
        "assistant",
        online_renderer=online,
        **common,
        enable_auto_tools=auto_tools,
        tool_parser=settings.tool_parser,
        enable_prompt_tokens_details=True,
    )
    completion = SessionCompletionServing(
        client,
        models,
        online_renderer=online,
        request_logger=None,
        enable_prompt_tokens_details=True,
    )
    chat.turns = completion.turns = turns
    tokenization = ServingTokenization(models, online, **common)
    tokenizer = renderer.tokenizer
    return Frontend(chat, completion, tokenization, models, turns, tokenizer, _closing(tokenizer))


def _closing(tokenizer) -> list[int]:
    """Tokens the chat template writes after an assistant message's content."""
    from cluster.history import SENTINEL

    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": SENTINEL}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    _, found, after = text.partition(SENTINEL)
    if not found or not after:
        return []
    return list(tokenizer.encode(after, add_special_tokens=False))


RenderPrefix = Callable[[int], Awaitable[list[int]]]
