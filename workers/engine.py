"""`MarsEngine`: one vLLM engine with the MARS scheduler, driving augmented
sessions (generate, pause for a tool call, resume) through vLLM's
streaming-input requests.

The engine core runs in this process (vLLM's in-process client), so the
driver loop, the tool timers and the scheduler share one clock and the
scheduler's records can be read directly. A session is one resumable vLLM
request: each segment is one input chunk; between chunks the request is
paused in the scheduler, which decides the fate of its KV.
"""

from __future__ import annotations

import collections
import copy
import enum
import heapq
import itertools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, field_validator

from policies import CostModel
from workers.hints import SegmentHints
from workers.lifecycle import RequestRecord
from workers.settings import ADDITIONAL_CONFIG_KEY, SchedulerSettings
from workers.tools import ToolCall, ToolRegistry, default_registry


class EngineConfig(BaseModel):
    """Engine arguments that matter to MARS; everything else is vLLM's default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="path of a local HF-format model directory")
    block_size: int = Field(32, ge=32, description="KV block size (CPU needs a multiple of 32)")
    num_kv_blocks: int | None = Field(
        None, ge=2, description="cap on KV blocks (None: as much as memory allows)"
    )
    max_model_len: int = Field(2048, ge=64)
    max_num_batched_tokens: int = Field(384, ge=32, description="iteration token budget")
    max_num_seqs: int = Field(256, ge=1)
    host_swap_tokens: int = Field(65536, ge=0, description="host swap space, in tokens of KV")
    dtype: str = "bfloat16"
    seed: int = 0
    memory_fraction: float = Field(
        0.2, gt=0, le=0.95, description="vLLM gpu_memory_utilization (CPU: share of RAM)"
    )
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    profile_costs: bool = Field(True, description="measure the cost model at start-up")
    finished_sessions_kept: int = Field(
        10_000,
        ge=1,
        description="finished sessions kept for inspection (outputs, timeline); older ones "
        "are forgotten",
    )

    @field_validator("block_size")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError(f"block_size must be a multiple of 32, got {value}")
        return value


@dataclass(frozen=True)
class Segment:
    """Generate `generate_tokens`, then make `call` (None: the session ends)."""

    generate_tokens: int
    call: ToolCall | None = None

    def __post_init__(self) -> None:
        if self.generate_tokens < 1:
            raise ValueError(f"generate_tokens must be >= 1, got {self.generate_tokens!r}")


@dataclass(frozen=True)
class AugmentedRequest:
    """A session whose whole plan is known up front; tools run server-side."""

    request_id: str
    prompt_token_ids: Sequence[int]
    segments: Sequence[Segment]


class SessionEnded(ValueError):
    """A chunk sent to a session that has ended. Its id stays taken while the
    engine keeps the finished session's record (`finished_sessions_kept`):
    a new session needs a new id."""


class SessionState(str, enum.Enum):
    GENERATING = "generating"
    IN_TOOL = "in_tool"
    """A server-side tool call is running."""
    AWAITING_CLIENT = "awaiting_client"
    """Client-driven pause: the caller must continue or close the session."""
    FINISHED = "finished"


@dataclass
class Session:
    session_id: str
    arrival_s: float
    plan: AugmentedRequest | None
    state: SessionState = SessionState.GENERATING
    segment_index: int = 0
    context_tokens: int = 0
    first_token_s: float | None = None
    finished_s: float | None = None
    outputs: list[list[int]] = field(default_factory=lambda: [[]])
    finish_reasons: list[str] = field(default_factory=list)
    engine_request_id: str = ""
    closes_after_chunk: bool = False
    """A client-driven session whose running chunk is its last: the engine
    closes it when the chunk ends (`open_session`/`continue_session` with
    ``last_chunk``), whether or not its caller is still there to ask."""
    awaiting_since_s: float | None = None
    """When the session last paused for its client (monotonic); None while
    it is not awaiting the client."""

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.finished_s is None else self.finished_s - self.arrival_s


OutputListener = Callable[["Session", list[int], "str | None"], None]


class MarsEngine:
    """See the module docstring. Not thread-safe: one driver calls `step`."""

    def __init__(self, config: EngineConfig, tools: ToolRegistry | None = None) -> None:
        # The scheduler must live in this process so the driver can read it.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        self.config = config
        self.tools = tools or default_registry()
        self._llm = LLMEngine.from_engine_args(EngineArgs(**_engine_kwargs(config)))
        self._core = self._llm.engine_core.engine_core
        self.scheduler = self._core.scheduler
        self.sessions: dict[str, Session] = {}
        self._by_engine_id: dict[str, Session] = {}
        self._finished: collections.deque[str] = collections.deque()
        self._timers: list[tuple[float, int, str, list[int]]] = []
        self.listeners: list[OutputListener] = []
        """Called on every output: new tokens, and the finish reason when a chunk ends."""
        self._tie = itertools.count()
        self.tokenizer = self._llm.get_tokenizer()
        if config.profile_costs and config.scheduler.cost is None:
            self.scheduler.set_cost_model(self.profile_costs())

    # ------------------------------------------------------------ sessions
    def submit(self, request: AugmentedRequest) -> Session:
        """Start a session whose tools run server-side."""
        self._validate_plan(request)
        first = request.segments[0]
        session = self._new_session(request.request_id, request)
        self._send_chunk(session, list(request.prompt_token_ids), first.generate_tokens, 0)
        return session

    def open_session(
        self,
        session_id: str,
        prompt_token_ids: Sequence[int],
        max_tokens: int,
        hints: SegmentHints | None = None,
        stop_token_ids: Sequence[int] = (),
        *,
        last_chunk: bool = False,
    ) -> Session:
        """Start a client-driven session: it pauses when its chunk ends (or,
        with `last_chunk`, is closed then: a one-turn request)."""
        self._check_tokens("prompt_token_ids", prompt_token_ids, max_tokens)
        session = self._new_session(session_id, None)
        session.closes_after_chunk = last_chunk
        self._send_chunk(session, list(prompt_token_ids), max_tokens, 0, hints, stop_token_ids)
        return session

    def continue_session(
        self,
        session_id: str,
        token_ids: Sequence[int],
        max_tokens: int,
        hints: SegmentHints | None = None,
        stop_token_ids: Sequence[int] = (),
        *,
        last_chunk: bool = False,
    ) -> Session:
        """Resume a paused client-driven session with the tool's result (with
        `last_chunk`, the session is closed when this chunk ends)."""
        session = self._session(session_id)
        if session.state is SessionState.FINISHED:
            raise SessionEnded(
                f"session {session_id!r} has ended; this instance keeps its record for a "
                f"while, so a new session needs a new id"
            )
        if session.state is not SessionState.AWAITING_CLIENT:
            raise ValueError(
                f"session {session_id!r} is {session.state.value}, not awaiting_client"
            )
        self._check_tokens("token_ids", token_ids, max_tokens, session.context_tokens)
        session.outputs.append([])
        session.state = SessionState.GENERATING
        session.awaiting_since_s = None
        session.closes_after_chunk = last_chunk
        self._send_chunk(session, list(token_ids), max_tokens, 1, hints, stop_token_ids)
        return session

    def close_session(self, session_id: str) -> None:
        session = self._session(session_id)
        if session.state is not SessionState.FINISHED:
            self._finish(session)

    def close_idle_sessions(self, max_idle_s: float, now: float | None = None) -> list[str]:
        """Close the sessions that have awaited their client for more than
        `max_idle_s` seconds (at `now`, monotonic; default: now) and return
        their ids. A client that never continues or closes its session would
        otherwise leave it paused for ever: its KV held on the device or the
        host, and one more paused request for the scheduler to rank every
        iteration."""
        now = time.monotonic() if now is None else now
        idle = [
            session
            for session in self.sessions.values()
            if session.state is SessionState.AWAITING_CLIENT
            and now - session.awaiting_since_s > max_idle_s
        ]
        for session in idle:
            self._finish(session)
        return [session.session_id for session in idle]

    def record(self, session_id: str) -> RequestRecord:
        """The scheduler's record: timeline, strategy, recompute/swap counters."""
        return self.scheduler.records[self._session(session_id).engine_request_id]

    # ---------------------------------------------------------------- loop
    def step(self) -> list[Session]:
        """Fire due tool results, run one engine iteration; return sessions
        whose chunk ended in this step."""
        self._fire_due_timers()
        if not self._engine_busy():
            self._sleep_until_next_timer()
            return []
        ended = []
        for output in self._llm.step():
            session = self._by_engine_id.get(output.request_id)
            if session is not None and self._on_output(session, output):
                ended.append(session)
        return ended

    def has_work(self) -> bool:
        return bool(self._timers) or self._engine_busy()

    def _engine_busy(self) -> bool:
        """Requests to run; paused sessions waiting for input do not count."""
        return self.scheduler.get_num_unfinished_requests() > 0

    def run_until_idle(self, timeout_s: float = 600.0) -> None:
        """Step until no session is generating or in a server-side tool."""
        deadline = time.monotonic() + timeout_s
        while self.has_work():
            if time.monotonic() > deadline:
                raise TimeoutError(f"engine still busy after {timeout_s:.0f} s")
            self.step()

    # ------------------------------------------------------------ internals
    def _new_session(self, session_id: str, plan: AugmentedRequest | None) -> Session:
        if not session_id:
            raise ValueError("session_id must be a non-empty string")
        if session_id in self.sessions:
            raise ValueError(f"session_id {session_id!r} already exists")
        session = Session(session_id, arrival_s=time.monotonic(), plan=plan)
        self.sessions[session_id] = session
        return session

    def _session(self, session_id: str) -> Session:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise KeyError(f"unknown session_id {session_id!r}") from None

    def _check_tokens(
        self, name: str, token_ids: Sequence[int], max_tokens: int, context: int = 0
    ) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens!r}")
        if name == "prompt_token_ids" and not token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        total = context + len(token_ids) + max_tokens
        if total > self.config.max_model_len:
            raise ValueError(
                f"{name}: context {context} + {len(token_ids)} new tokens + max_tokens "
                f"{max_tokens} = {total} exceeds max_model_len {self.config.max_model_len}"
            )

    def _validate_plan(self, request: AugmentedRequest) -> None:
        if not request.segments:
            raise ValueError("segments must hold at least one segment")
        if not request.prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        total = len(request.prompt_token_ids)
        for i, segment in enumerate(request.segments):
            total += segment.generate_tokens
            if segment.call is not None:
                self.tools.check(segment.call.tool)
                total += segment.call.return_tokens
            elif i != len(request.segments) - 1:
                raise ValueError(f"segments[{i}].call is missing: only the last may omit it")
        if total > self.config.max_model_len:
            raise ValueError(
                f"segments: the plan needs {total} tokens of context, more than "
                f"max_model_len {self.config.max_model_len}"
            )

    def _plan_hints(self, session: Session, index: int) -> SegmentHints:
        segment = session.plan.segments[index]
        call = segment.call
        oracle = self.config.scheduler.predictor == "oracle"
        return SegmentHints(
            tool=call.tool if call else None,
            api_s=call.duration_s if (call and oracle) else None,
            decode_tokens=segment.generate_tokens if oracle else None,
            api_return_tokens=call.return_tokens if (call and oracle) else None,
            final=call is None,
        )

    def _send_chunk(
        self,
        session: Session,
        token_ids: list[int],
        max_tokens: int,
        chunk_index: int,
        hints: SegmentHints | None = None,
        stop_token_ids: Sequence[int] = (),
    ) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if session.plan is not None:
            hints = self._plan_hints(session, session.segment_index)
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=session.plan is not None,
            stop_token_ids=list(stop_token_ids),
            output_kind=RequestOutputKind.DELTA,
            extra_args=(hints or SegmentHints()).to_extra_args(),
        )
        request = self._llm.input_processor.process_inputs(
            session.engine_request_id or session.session_id,
            TokensPrompt(prompt_token_ids=token_ids),
            params,
            supported_tasks=("generate",),
            resumable=True,
        )
        if chunk_index == 0:
            self._llm.input_processor.assign_request_id(request)
            session.engine_request_id = request.request_id
            self._by_engine_id[request.external_req_id] = session
        else:
            request.external_req_id = session.session_id
        session.context_tokens += len(token_ids)
        self._add_to_engine(request)

    def _add_to_engine(self, request) -> None:
        """Hand a chunk to the output processor and the engine core.

        In-process, both would share the request's token list, and vLLM's
        streaming-input update extends it on each side (a multiprocess engine
        gets a serialized copy): give the core its own list.
        """
        self._llm.output_processor.add_request(request, None)
        core_request = copy.copy(request)
        core_request.prompt_token_ids = list(request.prompt_token_ids or [])
        self._llm.engine_core.add_request(core_request)

    def _on_output(self, session: Session, output) -> bool:
        """Apply one output; tell the listeners (after the session's state has
        moved, so they see where the chunk left it). True when a chunk ended."""
        completion = output.outputs[0]
        if session.state is SessionState.FINISHED:
            return False
        ended = self._apply_output(session, completion)
        for listener in self.listeners:
            listener(session, list(completion.token_ids), completion.finish_reason)
        return ended

    def _apply_output(self, session: Session, completion) -> bool:
        if completion.token_ids:
            if session.first_token_s is None:
                session.first_token_s = time.monotonic()
            session.outputs[-1].extend(completion.token_ids)
        if completion.finish_reason is None:
            return False
        session.finish_reasons.append(completion.finish_reason)
        # The chunk's last sampled token is not kept in the context (vLLM
        # streaming input keeps only computed tokens).
        session.context_tokens += max(0, len(session.outputs[-1]) - 1)
        if session.plan is None:
            if session.closes_after_chunk:
                self._finish(session)
            else:
                session.state = SessionState.AWAITING_CLIENT
                session.awaiting_since_s = time.monotonic()
            return True
        call = session.plan.segments[session.segment_index].call
        if call is None:
            self._finish(session)
            return True
        result = self.tools.run(call)
        token_ids = result.token_ids
        if token_ids is None:
            token_ids = self.tokenizer.encode(result.text or "", add_special_tokens=False)
        session.state = SessionState.IN_TOOL
        due = time.monotonic() + result.duration_s
        heapq.heappush(self._timers, (due, next(self._tie), session.session_id, token_ids))
        return True

    def _fire_due_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, session_id, token_ids = heapq.heappop(self._timers)
            session = self.sessions[session_id]
            session.segment_index += 1
            session.outputs.append([])
            session.state = SessionState.GENERATING
            segment = session.plan.segments[session.segment_index]
            self._send_chunk(session, token_ids, segment.generate_tokens, 1)

    def _sleep_until_next_timer(self) -> None:
        if self._timers:
            time.sleep(max(0.0, min(0.05, self._timers[0][0] - time.monotonic())))

    def _finish(self, session: Session) -> None:
        """Close the vLLM streaming session (a final non-resumable chunk)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        final = self._llm.input_processor.process_inputs(
            session.engine_request_id,
            TokensPrompt(prompt_token_ids=[0]),
            SamplingParams(max_tokens=1),
            supported_tasks=("generate",),
        )
        final.external_req_id = session.session_id
        self._add_to_engine(final)
        session.state = SessionState.FINISHED
        session.finished_s = time.monotonic()
        self._finished.append(session.session_id)
        self._forget_oldest_finished()

    def _forget_oldest_finished(self) -> None:
        """Forget finished sessions beyond `finished_sessions_kept`, oldest
        first: a server finishes sessions without end, and each one keeps its
        tokens here and its timeline in the scheduler."""
        while len(self._finished) > self.config.finished_sessions_kept:
            session = self.sessions.pop(self._finished.popleft())
            self._by_engine_id.pop(session.session_id, None)
            self.scheduler.forget(session.engine_request_id)

    def shutdown(self) -> None:
        """Stop the engine core and release vLLM's process-wide state (the KV
        transfer group, the model-parallel groups) so another engine can start
        in this process."""
        from vllm.distributed import cleanup_dist_env_and_memory
        from vllm.distributed.kv_transfer import ensure_kv_transfer_shutdown

        self._llm.engine_core.shutdown()
        ensure_kv_transfer_shutdown()
        cleanup_dist_env_and_memory()

    # ------------------------------------------------------------ profiling
    def profile_costs(self) -> CostModel:
        """Measure iteration time against batched tokens on this engine, and
        the KV copy speed of the connector; fit the cost model."""
        from workers.profiling import profile_engine

        return profile_engine(self)


def _engine_kwargs(config: EngineConfig) -> dict:
    from vllm.config import KVTransferConfig

    return dict(
        model=config.model,
        dtype=config.dtype,
        seed=config.seed,
        block_size=config.block_size,
        max_model_len=config.max_model_len,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_num_seqs=config.max_num_seqs,
        num_gpu_blocks_override=config.num_kv_blocks,
        gpu_memory_utilization=config.memory_fraction,
        enable_prefix_caching=False,
        enforce_eager=True,
        scheduler_cls="workers.scheduler.MarsScheduler",
        additional_config={ADDITIONAL_CONFIG_KEY: config.scheduler.model_dump()},
        kv_transfer_config=KVTransferConfig(
            kv_connector="MarsKVConnector",
            kv_connector_module_path="workers.kv_connector",
            kv_role="kv_both",
            kv_connector_extra_config={"host_capacity_tokens": config.host_swap_tokens},
        ),
    )
