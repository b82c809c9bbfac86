"""`MarsEngine`: one vLLM engine with the MARS scheduler, serving turns
(`workers.turns`) and keeping each session's KV between them.

The engine core runs in this process (vLLM's in-process client), so the
driver loop, the tool timers and the scheduler share one clock and the
scheduler's records can be read directly. Every turn is an ordinary vLLM
request on the session's whole context, with prefix caching on: between
turns `MarsScheduler` parks the session's KV (preserve, discard, swap), and
the next turn reuses whatever of it is still there.

Server-side tool plans (`submit`), the benchmarks' workload, run on the same
turns: the engine runs the tool when a turn ends and starts the next turn on
the context plus the tool's result.
"""

from __future__ import annotations

import collections
import enum
import heapq
import itertools
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from policies import CostModel, HeldSession, Strategy
from workers import vllm_hooks
from workers.hints import SegmentHints
from workers.kv_connector import RECORD_DIGESTS_KEY
from workers.kv_transport import (
    ParkedState,
    RunningKv,
    SessionKv,
    read_device_blocks,
    read_host_copy,
    stage_segments,
    write_device_blocks,
    write_host_copy,
)
from workers.lifecycle import Phase, RequestRecord, TimelineEvent
from workers.settings import ADDITIONAL_CONFIG_KEY, SchedulerSettings
from workers.tools import ToolCall, ToolRegistry, default_registry
from workers.turns import (
    KvReuse,
    SessionAction,
    TurnEnd,
    TurnEvent,
    TurnOutput,
    TurnRequest,
    live_move_refusal,
    mars_extra_args,
)

logger = logging.getLogger(__name__)


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
    prefix_caching: bool = Field(
        True,
        description="vLLM's automatic prefix caching (on, as in stock vLLM): a session's next "
        "turn and requests sharing a prompt prefix reuse cached blocks",
    )
    dtype: str = "bfloat16"
    seed: int = 0
    memory_fraction: float = Field(
        0.2, gt=0, le=0.95, description="vLLM gpu_memory_utilization (CPU: share of RAM)"
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs the model is sharded over (vLLM's Ray executor when > 1)"
    )
    enforce_eager: bool = Field(
        True, description="run the model eagerly (CPU engines); False: CUDA graphs on GPUs"
    )
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    profile_costs: bool = Field(True, description="measure the cost model at start-up")
    finished_sessions_kept: int = Field(
        10_000,
        ge=1,
        description="ended sessions and requests whose records are kept for inspection "
        "(timeline, counters); older ones are forgotten",
    )
    record_kv_digests: bool = Field(
        False, description="debug: digest every swapped block set (tests read them)"
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


class PlanState(str, enum.Enum):
    GENERATING = "generating"
    IN_TOOL = "in_tool"
    """A server-side tool call is running."""
    FINISHED = "finished"


@dataclass
class PlanSession:
    """A server-side plan in progress: its context grows by each segment's
    tokens and each tool's result."""

    session_id: str
    arrival_s: float
    plan: AugmentedRequest
    context: list[int]
    state: PlanState = PlanState.GENERATING
    segment_index: int = 0
    first_token_s: float | None = None
    finished_s: float | None = None
    outputs: list[list[int]] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.finished_s is None else self.finished_s - self.arrival_s


@dataclass(frozen=True)
class SessionInfo:
    """The engine's view of one session (`GET /v1/sessions/{id}` shows it)."""

    session_id: str
    phase: Phase
    strategy: Strategy | None
    """Where the session's KV is kept while it waits; None when the engine
    keeps none (never parked here, or released)."""
    kv_tokens: int
    """Tokens whose KV the engine keeps for the session's next turn."""
    turns: int
    recomputed_tokens: int
    swapped_out_tokens: int
    swapped_in_tokens: int
    last_turn: KvReuse | None
    timeline: tuple[TimelineEvent, ...]


@dataclass
class _Incoming:
    """The stages of one request moving here, and when the last came."""

    stages: list[RunningKv] = field(default_factory=list)
    touched_s: float = field(default_factory=time.monotonic)
    written_blocks: int = 0
    """Its first blocks, written into device blocks as they came (`stage_in`)."""
    writing: bool = True
    """False once a stage could not be written (no room, or it failed):
    the rest stays on host, and the continuation loads it from there."""


@dataclass
class _LiveTurn:
    turn: TurnRequest
    engine_request_id: str
    started_s: float
    token_ids: list[int] = field(default_factory=list)
    """Tokens generated so far (choice 0)."""
    plan: PlanSession | None = None

    def take(self, output) -> None:
        """Add an output's tokens: deltas are appended, cumulative and
        final outputs hold them all."""
        from vllm.sampling_params import RequestOutputKind

        for completion in output.outputs:
            if completion.index != 0:
                continue
            if self.turn.sampling.output_kind is RequestOutputKind.DELTA:
                self.token_ids.extend(completion.token_ids)
            else:
                self.token_ids = list(completion.token_ids)


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
        self.tokenizer = self._llm.get_tokenizer()
        self._live: dict[str, _LiveTurn] = {}
        self._live_sessions: dict[str, str] = {}
        self.plans: dict[str, PlanSession] = {}
        self._timers: list[tuple[float, int, str, list[int]]] = []
        self._tie = itertools.count()
        self._ended: collections.deque[str] = collections.deque()
        self._incoming: dict[str, _Incoming] = {}
        """Stages of requests moving here, by key (`stage_in`)."""
        if config.profile_costs and config.scheduler.cost is None:
            self.scheduler.set_cost_model(self.profile_costs())
        else:
            from workers.profiling import warm_up

            warm_up(self)

    # --------------------------------------------------------------- turns
    def add_turn(self, turn: TurnRequest) -> None:
        """Start one turn; its events come out of `step`. Raises ValueError
        (naming the field) on a turn vLLM or the session cannot take.

        A turn of a session whose previous turn still runs here supersedes
        it: the cluster's record lets one turn of a session start at a time,
        so the previous one's caller has gone (its abort may still be on its
        way) and the session's KV goes on from the new turn."""
        from vllm.inputs import TokensPrompt

        if turn.request_id in self._live:
            raise ValueError(f"request_id {turn.request_id!r} is already running")
        previous = self._live_sessions.get(turn.session_id) if turn.session_id else None
        if previous is not None:
            logger.warning(
                "session=%s: turn %s supersedes turn %s, still running",
                turn.session_id,
                turn.request_id,
                previous,
            )
            self.abort_turn(previous)
        params = turn.sampling.clone()
        params.extra_args = {**(params.extra_args or {}), **mars_extra_args(turn)}
        engine_id = self._llm.add_request(
            turn.request_id, TokensPrompt(prompt_token_ids=list(turn.prompt_token_ids)), params
        )
        self._live[turn.request_id] = _LiveTurn(turn, engine_id, time.monotonic())
        if turn.session_id is not None:
            self._live_sessions[turn.session_id] = turn.request_id

    def abort_turn(self, request_id: str) -> None:
        """Stop a running turn (its caller left). A session turn's KV is
        kept as if the turn had ended: the session's record decides what
        its next turn sends."""
        if request_id in self._live:
            self._llm.abort_request([request_id])
            live = self._live.pop(request_id)
            self._turn_over(live)

    def end_session(self, session_id: str, reason: str = "session ended") -> None:
        """Release a session's kept KV and close its record (`reason` lands
        in its timeline: it ended, or it moved to another engine)."""
        if session_id in self._live_sessions:
            raise ValueError(f"session {session_id!r} has a turn running; it cannot end now")
        self.scheduler.release_park(session_id)
        record = self.scheduler.records.get(session_id)
        if record is not None and record.phase is not Phase.FINISHED:
            record.move(Phase.FINISHED, time.monotonic(), reason)
            self._remember_ended(session_id)

    # ----------------------------------------------------------- migration
    def held_sessions(self) -> tuple[list[HeldSession], list[HeldSession], int]:
        """What a migration policy or a drain may move off this engine: each
        paused session (`MarsScheduler.paused_sessions`), each session with
        a turn here (its context's blocks; `queued` until vLLM runs it), and
        how many turns run now (sessionless ones included)."""
        from vllm.v1.request import RequestStatus

        size = self.config.block_size
        requests = self.scheduler.requests
        live = [
            HeldSession(
                session_id,
                -(-request.num_tokens // size),
                movable=not live_move_refusal(turn.turn),
                queued=request.status is not RequestStatus.RUNNING,
            )
            for session_id, request_id in self._live_sessions.items()
            if (request := requests.get((turn := self._live[request_id]).engine_request_id))
            is not None
        ]
        return self.scheduler.paused_sessions(time.monotonic()), live, len(self._live)

    def export_session(self, session_id: str) -> SessionKv:
        """A paused session's KV and predictions, for another engine
        (`workers.kv_transport`). The session stays here, KV and all, until
        `end_session` once the move is committed. Raises ValueError unless
        the session is paused here."""
        if session_id in self._live_sessions:
            raise ValueError(f"session {session_id!r} has a turn running; it cannot move now")
        parked = self.scheduler.parked_kv(session_id)
        shards = None
        if parked.device_blocks is not None:
            shards = self._llm.collective_rpc(read_device_blocks, args=(parked.device_blocks,))
        elif parked.on_host:
            shards = self._llm.collective_rpc(read_host_copy, args=(session_id,))
        return SessionKv(
            session_id=session_id,
            token_ids=parked.token_ids,
            block_size=self.config.block_size,
            shards=shards,
            state=self.scheduler.parked_state(session_id),
        )

    @property
    def live_sessions(self) -> frozenset[str]:
        """The sessions with a turn running here."""
        return frozenset(self._live_sessions)

    def movable_turn(self, session_id: str) -> str:
        """The request id of the session's turn running here, if it may move
        live (`workers.turns.live_move_refusal`); else ValueError saying why."""
        request_id = self._live_sessions.get(session_id)
        if request_id is None:
            raise ValueError(f"session {session_id!r} has no turn running on this engine")
        refusal = live_move_refusal(self._live[request_id].turn)
        if refusal:
            raise ValueError(f"the turn of session {session_id!r} cannot move live: {refusal}")
        return request_id

    def running_kv(
        self, request_id: str, first_block: int, *, stop: bool, copy: bool = True
    ) -> RunningKv:
        """A stage of moving a running turn to another engine: host copies
        of its blocks from `first_block` on, the finished ones while it goes
        on decoding here, or with `stop` all of them (the last one partly
        written), after which the turn is aborted here. Without `copy`,
        nothing is read (a move that recomputes the KV)."""
        live = self._live.get(request_id)
        if live is None:
            raise ValueError(f"request_id {request_id!r} is not running on this engine")
        request = self.scheduler.requests[live.engine_request_id]
        computed = request.num_computed_tokens
        size = self.config.block_size
        last = -(-computed // size) if stop else computed // size
        block_ids = tuple(
            vllm_hooks.block_ids(self.scheduler.kv_cache_manager, live.engine_request_id)[
                first_block:last
            ]
        )
        shards = None
        if copy and block_ids:
            shards = self._llm.collective_rpc(read_device_blocks, args=(block_ids,))
        stage = RunningKv(
            request_id,
            tuple(request.all_token_ids),
            computed,
            first_block,
            len(block_ids) if shards is not None else 0,
            shards,
        )
        if stop:
            self.abort_turn(request_id)
        return stage

    def stage_in(self, key: str, stage: RunningKv, now: float | None = None) -> int:
        """Hold one stage of a request moving here until `commit_incoming`:
        the stages copied while it still decodes on its source travel before
        it stops, so that only the last one is on the move's critical path.
        Each is also written into device blocks held for the move and
        entered in the prefix cache, so that the continuation finds the
        context there instead of loading it from host while stopped (Llumnix
        pre-allocates on the destination likewise); a stage that finds no
        room stays on host only. Returns the block the next stage starts at.
        Held under a lease (`drop_stale_incoming`): a move whose coordinator
        vanished does not hold memory for ever."""
        incoming = self._incoming.setdefault(key, _Incoming())
        incoming.stages.append(stage)
        incoming.touched_s = time.monotonic() if now is None else now
        self._write_stage(key, incoming, stage)
        return stage.first_block + stage.num_blocks

    def _write_stage(self, key: str, incoming: _Incoming, stage: RunningKv) -> None:
        if not incoming.writing or stage.shards is None or stage.num_blocks == 0:
            return
        block_ids = None
        if stage.first_block == incoming.written_blocks:
            block_ids = self.scheduler.hold_incoming(key, stage.num_blocks)
        if block_ids is None:
            incoming.writing = False
            return
        try:
            self._llm.collective_rpc(write_device_blocks, args=(block_ids, stage.shards))
        except Exception:
            logger.exception("writing a stage of move %s into device blocks failed", key)
            self.scheduler.release_incoming(key)
            incoming.writing, incoming.written_blocks = False, 0
            return
        self.scheduler.cache_incoming(
            key,
            stage.token_ids,
            vllm_hooks.request_block_hasher(self._core),
            incoming.written_blocks,
        )
        incoming.written_blocks += stage.num_blocks

    def commit_incoming(
        self, key: str, last: RunningKv, state: ParkedState, session_id: str | None = None
    ) -> dict[str, Any]:
        """The last stage of a moving request: park its KV here under
        `session_id` (default: `key`) for the turn that continues it, as a
        host copy of every stage (kept in segments, not joined), of which
        the continuation loads only what the prefix cache does not hold
        (the blocks written as they came are released into it). Returns the
        request's tokens at its stop (the continuation's prompt), the stages,
        tokens and bytes that came, and the tokens whose KV was written into
        device blocks before the stop (`written_tokens`). ValueError when the KV does not
        fit (`import_session`); the device blocks are released either way."""
        incoming = self._incoming.pop(key, _Incoming())
        stages = [*incoming.stages, last]
        try:
            self._adopt(
                session_id or key,
                last.token_ids[: last.computed_tokens],
                stage_segments(stages),
                state,
            )
        finally:
            written = self.scheduler.release_incoming(key)
        copied = [stage for stage in stages if stage.shards is not None]
        return {
            "token_ids": list(last.token_ids),
            "stages": len(copied),
            "kv_tokens": last.computed_tokens if copied else 0,
            "kv_bytes": sum(stage.nbytes for stage in stages),
            "written_tokens": written * self.config.block_size,
        }

    def drop_incoming(self, key: str) -> None:
        """Forget the stages of a move that did not complete."""
        self._incoming.pop(key, None)
        self.scheduler.release_incoming(key)

    def drop_stale_incoming(self, lease_s: float, now: float | None = None) -> list[str]:
        """Drop the stages of moves that got none for `lease_s` seconds (their
        coordinator is gone: Llumnix's watchdog on pre-allocations); return
        their keys."""
        now = time.monotonic() if now is None else now
        stale = [key for key, held in self._incoming.items() if now - held.touched_s > lease_s]
        for key in stale:
            self.drop_incoming(key)
        return stale

    def import_session(self, kv: SessionKv) -> None:
        """Park a session exported by another engine: its next turn here
        loads the KV (or recomputes it, if none came). Raises ValueError
        when the KV does not fit this engine (block size, model, layout,
        host space) or the session is live here."""
        if kv.block_size != self.config.block_size:
            raise ValueError(
                f"the session's KV has block_size {kv.block_size}, this engine "
                f"{self.config.block_size}"
            )
        segments = None
        if kv.shards is not None:
            from workers.kv_connector import HostSegment

            segments = [[HostSegment(0, shard)] for shard in kv.shards]
        self._adopt(kv.session_id, kv.token_ids, segments, kv.state)

    def _adopt(
        self,
        session_id: str,
        token_ids: tuple[int, ...],
        segments: list[list[Any]] | None,
        state: ParkedState,
    ) -> None:
        """Park a session that came from another engine: its KV as a host
        copy (`segments`, per worker rank) or, with none, to recompute."""
        if segments is not None and len(segments) != self.config.tensor_parallel_size:
            raise ValueError(
                f"the session's KV has {len(segments)} shards, this engine "
                f"{self.config.tensor_parallel_size} (tensor_parallel_size)"
            )
        if session_id in self._live_sessions:
            raise ValueError(f"session {session_id!r} has a turn running on this engine")
        on_host = segments is not None
        self.scheduler.adopt_parked(session_id, token_ids, on_host, state)
        if not on_host:
            return
        num_blocks = -(-len(token_ids) // self.config.block_size)
        try:
            self._llm.collective_rpc(write_host_copy, args=(session_id, segments, num_blocks))
        except BaseException:
            self.scheduler.release_park(session_id)
            self.scheduler.records.pop(session_id, None)
            raise

    def session_info(self, session_id: str) -> SessionInfo:
        record = self.scheduler.records.get(session_id)
        if record is None:
            raise KeyError(f"unknown session_id {session_id!r}")
        park = self.scheduler.parks.get(session_id)
        return SessionInfo(
            session_id=session_id,
            phase=record.phase,
            strategy=park.strategy if park is not None else None,
            kv_tokens=park.computed_tokens if park is not None else 0,
            turns=record.segment_index + 1,
            recomputed_tokens=record.recomputed_tokens,
            swapped_out_tokens=record.swapped_out_tokens,
            swapped_in_tokens=record.swapped_in_tokens,
            last_turn=record.reuse,
            timeline=tuple(record.timeline),
        )

    def close_idle_sessions(self, max_idle_s: float, now: float | None = None) -> list[str]:
        """End the sessions whose KV has waited more than `max_idle_s` seconds
        (at `now`, monotonic; default: now) for a next turn, and return their
        ids: a client that never comes back would otherwise leave its KV held
        and one more parked session for the scheduler to rank every step."""
        now = time.monotonic() if now is None else now
        idle = self.scheduler.parked_sessions_idle(max_idle_s, now)
        for session_id in idle:
            self.end_session(session_id)
        return idle

    def record(self, key: str) -> RequestRecord:
        """The scheduler's record of a session (or of a plan): timeline,
        strategy, recompute and swap counters."""
        return self.scheduler.records[key]

    # --------------------------------------------------------------- plans
    def submit(self, request: AugmentedRequest) -> PlanSession:
        """Start a session whose tools run server-side."""
        self._validate_plan(request)
        if request.request_id in self.plans or request.request_id in self._live_sessions:
            raise ValueError(f"session_id {request.request_id!r} already exists")
        session = PlanSession(
            request.request_id, time.monotonic(), request, list(request.prompt_token_ids)
        )
        self.plans[request.request_id] = session
        self._start_segment(session)
        return session

    def _start_segment(self, session: PlanSession) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        segment = session.plan.segments[session.segment_index]
        turn = TurnRequest(
            request_id=f"{session.session_id}#{session.segment_index}",
            prompt_token_ids=list(session.context),
            sampling=SamplingParams(
                max_tokens=segment.generate_tokens,
                temperature=0.0,
                ignore_eos=True,
                output_kind=RequestOutputKind.FINAL_ONLY,
            ),
            session_id=session.session_id,
            action=SessionAction.KEEP if segment.call else SessionAction.END,
            hints=self._plan_hints(session.plan, session.segment_index),
        )
        session.outputs.append([])
        session.state = PlanState.GENERATING
        self.add_turn(turn)
        self._live[turn.request_id].plan = session

    def _plan_hints(self, plan: AugmentedRequest, index: int) -> SegmentHints:
        segment = plan.segments[index]
        call = segment.call
        oracle = self.config.scheduler.predictor == "oracle"
        return SegmentHints(
            tool=call.tool if call else None,
            api_s=call.duration_s if (call and oracle) else None,
            decode_tokens=segment.generate_tokens if oracle else None,
            api_return_tokens=call.return_tokens if (call and oracle) else None,
            final=call is None,
        )

    def _plan_turn_ended(self, session: PlanSession, end: TurnEnd) -> None:
        session.outputs[-1] = list(end.output_token_ids)
        session.finish_reasons.append(end.finish_reason or "abort")
        session.context.extend(end.output_token_ids)
        call = session.plan.segments[session.segment_index].call
        if call is None:
            session.state = PlanState.FINISHED
            session.finished_s = time.monotonic()
            self._remember_ended(session.session_id)
            return
        result = self.tools.run(call)
        token_ids = result.token_ids
        if token_ids is None:
            token_ids = self.tokenizer.encode(result.text or "", add_special_tokens=False)
        session.state = PlanState.IN_TOOL
        due = time.monotonic() + result.duration_s
        heapq.heappush(self._timers, (due, next(self._tie), session.session_id, token_ids))

    def _fire_due_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, session_id, token_ids = heapq.heappop(self._timers)
            session = self.plans[session_id]
            session.context.extend(token_ids)
            session.segment_index += 1
            self._start_segment(session)

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

    # ---------------------------------------------------------------- loop
    def step(self) -> list[TurnEvent]:
        """Fire due tool results, run one engine iteration; return the events
        of turns that are not server-side plans."""
        self._fire_due_timers()
        if not self._engine_busy():
            self._sleep_until_next_timer()
            return []
        events: list[TurnEvent] = []
        for output in self._llm.step():
            live = self._live.get(output.request_id)
            if live is None:
                continue  # start-up profiling's own requests
            live.take(output)
            if live.plan is None:
                events.append(TurnOutput(output))
            if live.plan is not None and live.plan.first_token_s is None and live.token_ids:
                live.plan.first_token_s = time.monotonic()
            if output.finished:
                del self._live[output.request_id]
                end = self._turn_over(live, output)
                if live.plan is not None:
                    self._plan_turn_ended(live.plan, end)
                else:
                    events.append(end)
        return events

    def _turn_over(self, live: _LiveTurn, output=None) -> TurnEnd:
        turn = live.turn
        if turn.session_id is not None:
            self._live_sessions.pop(turn.session_id, None)
        key = turn.session_id or live.engine_request_id
        record = self.scheduler.records.get(key)
        reuse = record.reuse if record is not None and record.reuse else KvReuse(None, 0, 0, 0)
        finish = None
        if output is not None:
            finish = next((c.finish_reason for c in output.outputs if c.index == 0), None)
        if turn.action is not SessionAction.KEEP:
            self._remember_ended(key)
        return TurnEnd(
            request_id=turn.request_id,
            finish_reason=finish,
            prompt_token_ids=tuple(turn.prompt_token_ids),
            output_token_ids=tuple(live.token_ids),
            kv=reuse,
            engine_s=time.monotonic() - live.started_s,
        )

    def has_work(self) -> bool:
        return bool(self._timers) or self._engine_busy()

    def _engine_busy(self) -> bool:
        """Requests to run; parked sessions do not count."""
        return self.scheduler.get_num_unfinished_requests() > 0 or bool(self._live)

    def run_until_idle(self, timeout_s: float = 600.0) -> list[TurnEvent]:
        """Step until no turn runs and no server-side tool is pending; return
        the events of the turns that are not plans."""
        deadline = time.monotonic() + timeout_s
        events: list[TurnEvent] = []
        while self.has_work():
            if time.monotonic() > deadline:
                raise TimeoutError(f"engine still busy after {timeout_s:.0f} s")
            events.extend(self.step())
        return events

    def _sleep_until_next_timer(self) -> None:
        if self._timers:
            time.sleep(max(0.0, min(0.05, self._timers[0][0] - time.monotonic())))

    def _remember_ended(self, key: str) -> None:
        """Forget ended sessions' and requests' records beyond
        `finished_sessions_kept`, oldest first: a server ends sessions
        without end, and each keeps a timeline in the scheduler."""
        self._ended.append(key)
        while len(self._ended) > self.config.finished_sessions_kept:
            old = self._ended.popleft()
            self.scheduler.forget(old)
            self.plans.pop(old, None)

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
        enable_prefix_caching=config.prefix_caching,
        enforce_eager=config.enforce_eager,
        tensor_parallel_size=config.tensor_parallel_size,
        # Sharded over several GPUs, the ranks are Ray actors in the
        # instance's placement group (cluster.instance_placement).
        distributed_executor_backend="ray" if config.tensor_parallel_size > 1 else None,
        scheduler_cls="workers.scheduler.MarsScheduler",
        additional_config={ADDITIONAL_CONFIG_KEY: config.scheduler.model_dump()},
        kv_transfer_config=KVTransferConfig(
            kv_connector="MarsKVConnector",
            kv_connector_module_path="workers.kv_connector",
            kv_role="kv_both",
            # A block the connector fails to load is recomputed, not fatal.
            kv_load_failure_policy="recompute",
            kv_connector_extra_config={
                "host_capacity_tokens": config.host_swap_tokens,
                RECORD_DIGESTS_KEY: config.record_kv_digests,
            },
        ),
    )
