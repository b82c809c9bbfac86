"""`MarsScheduler`: vLLM's v1 scheduler with MARS admission order and KV
strategies for sessions paused between turns. Plugged in through
`scheduler_cls`.

Each turn of a session is an ordinary vLLM request (`workers.turns`). What
this class changes in vLLM, and where:

- Admission order: `self.waiting` is a `RankedRequestQueue` re-ranked by the
  engine policy (`policies/`) before each step when stale.
- Between turns: when a turn of a session that goes on ends, its blocks are
  not freed (`_free_request` with the free delayed, as vLLM's connectors do
  for a transfer): the session is *parked*, its KV preserved. Each step the
  policy may demote parked sessions: DISCARD frees the blocks (they stay in
  the prefix cache until reused, so a later turn may still hit them), SWAP
  copies them to host through `MarsKVConnector` and frees them one step
  later.
- The session's next turn is a new request whose prompt is the whole
  context: vLLM's prefix cache finds the preserved blocks (shared, not
  copied), the connector loads swapped ones, and whatever is gone is
  recomputed. Once the turn is scheduled, the park is released.

Everything else (batching, chunked prefill, preemption, sampling) is vLLM's.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.request_queue import RequestQueue
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from policies import (
    ApiDurationPredictor,
    BatchView,
    CostModel,
    DecodeLengthPredictor,
    HeldSession,
    PricedRows,
    RequestColumns,
    RequestView,
    Strategy,
    make_engine_policy,
)
from policies.memory import memory_over_time_columns
from policies.predictors import expected_call_s, remaining_call_s
from workers import vllm_hooks
from workers.hints import SegmentHints
from workers.kv_connector import MarsKVConnector
from workers.kv_transport import ParkedState
from workers.lifecycle import Phase, RequestRecord
from workers.settings import SchedulerSettings, settings_from_additional_config
from workers.turns import KvReuse, SessionAction, TurnTags

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_utils import KVCacheBlock

logger = init_logger(__name__)

_READY = frozenset({RequestStatus.WAITING, RequestStatus.PREEMPTED})
_PROVISIONAL_ITER_S = 1e-3
"""Placeholder iteration cost until `set_cost_model` supplies a measured one;
only relative scores matter before then, and start-up replaces it."""


class RankedRequestQueue(RequestQueue):
    """A waiting queue whose order is set by `rerank`; between re-ranks it
    behaves like vLLM's FCFS queue (append, prepend to the front)."""

    def __init__(self) -> None:
        self._items: deque[Request] = deque()
        self.changed = True

    def add_request(self, request: Request) -> None:
        self._items.append(request)
        self.changed = True

    def pop_request(self) -> Request:
        return self._items.popleft()

    def peek_request(self) -> Request:
        if not self._items:
            raise IndexError("peek from an empty queue")
        return self._items[0]

    def prepend_request(self, request: Request) -> None:
        self._items.appendleft(request)

    def prepend_requests(self, requests: Iterable[Request]) -> None:
        self._items.extendleft(reversed(list(requests)))

    def remove_request(self, request: Request) -> None:
        self._items.remove(request)
        self.changed = True

    def remove_requests(self, requests: Iterable[Request]) -> None:
        drop = set(requests)
        if drop:
            self._items = deque(r for r in self._items if r not in drop)
            self.changed = True

    def rerank(self, key: Callable[[list[Request]], list[Request]]) -> None:
        if len(self._items) > 1:  # one request or none has nothing to order
            self._items = deque(key(list(self._items)))
        self.changed = False

    def __bool__(self) -> bool:
        return bool(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._items)


@dataclass
class Park:
    """A session's KV between two turns: its last turn's finished request,
    whose blocks vLLM has not freed while `holds_blocks`."""

    request: Request | None
    """None for a session that came from another engine (its KV is a host
    copy here, or nothing)."""
    token_ids: tuple[int, ...]
    """The turn's whole context (prompt and generated tokens)."""
    computed_tokens: int
    """Tokens whose KV the turn left (all but the last sampled token)."""
    strategy: Strategy = Strategy.PRESERVE
    holds_blocks: bool = True
    swap_pending: bool = False
    """Copied to host this step; the blocks are freed at the next one."""


@dataclass(frozen=True)
class ParkedKv:
    """Where a paused session's KV is (`MarsScheduler.parked_kv`): in
    `device_blocks` while preserved, in a host copy once swapped, neither
    once discarded."""

    token_ids: tuple[int, ...]
    """The context tokens the KV covers."""
    device_blocks: tuple[int, ...] | None
    on_host: bool


class MarsScheduler(Scheduler):
    """See the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings: SchedulerSettings = settings_from_additional_config(
            self.vllm_config.additional_config
        )
        self.engine_policy = make_engine_policy(self.settings.policy, **self.settings.policy_params)
        self.waiting = RankedRequestQueue()
        self.records: dict[str, RequestRecord] = {}
        """MARS bookkeeping by session id (or request id outside sessions)."""
        self.parks: dict[str, Park] = {}
        self.incoming: dict[str, list[KVCacheBlock]] = {}
        """Device blocks holding the KV of requests moving here, by move key,
        from their stages' arrival to the move's commit (`hold_incoming`)."""
        self._tags: dict[str, TurnTags] = {}
        self._forget_when_done: set[str] = set()
        self.iteration = 0
        self.last_scheduled_tokens = 0
        self._preempted_last_step = False
        oracle = self.settings.predictor == "oracle"
        self.api_predictor = ApiDurationPredictor(prior=self.settings.api_prior_s, oracle=oracle)
        self.decode_predictor = DecodeLengthPredictor(
            prior=self.settings.decode_prior_tokens, oracle=oracle
        )
        self.kv_bytes_per_token = self._kv_bytes_per_token()
        self._total_blocks = self.free_blocks()  # everything is free at start-up
        self.cost = self._initial_cost_model()
        self._priced = PricedRows(self.cost)
        if self.connector is not None and not isinstance(self.connector, MarsKVConnector):
            raise ValueError("MarsScheduler needs MarsKVConnector (or no connector)")

    # ------------------------------------------------------------- cost model
    def _kv_bytes_per_token(self) -> float:
        total = sum(t.size for t in self.kv_cache_config.kv_cache_tensors)
        return total / (self.kv_cache_config.num_blocks * self.block_size)

    def _initial_cost_model(self) -> CostModel:
        given = self.settings.cost
        return CostModel(
            iter_fixed_s=given.iter_fixed_s if given else _PROVISIONAL_ITER_S,
            iter_per_token_s=given.iter_per_token_s if given else _PROVISIONAL_ITER_S / 100,
            swap_s_per_token=given.swap_s_per_token if given else _PROVISIONAL_ITER_S / 100,
            kv_bytes_per_token=self.kv_bytes_per_token,
            token_budget=self.max_num_scheduled_tokens,
        )

    def set_cost_model(self, cost: CostModel) -> None:
        """Called by the engine once start-up profiling has measured the costs.

        The cached rows carry terms priced under the old costs: drop them all,
        so that every row is packed again under the new ones."""
        self.cost = cost
        self._priced = PricedRows(cost)
        for record in self.records.values():
            record.touch()
        self.waiting.changed = True

    # ------------------------------------------------------------ snapshots
    def _view(self, request: Request, record: RequestRecord) -> RequestView:
        """A waiting or running turn's policy view."""
        return RequestView(
            request_id=request.request_id,
            arrival_s=record.first_arrival_s,
            context_tokens=request.num_tokens,
            predicted_decode_tokens=max(
                0, record.predicted_decode_tokens - request.num_output_tokens
            ),
            predicted_api_s=record.predicted_api_s,
            predicted_api_return_tokens=record.predicted_return_tokens,
            waited_iterations=record.waited_iterations,
            has_run=record.has_run,
            resumed_strategy=record.strategy if record.restore_pending else None,
            queued_since_s=record.queued_since_s,
        )

    def _park_view(self, session_id: str, park: Park, now: float) -> RequestView:
        """A parked session's view: the memory it would give back is the
        blocks no one else holds (a prefix shared with other requests is
        counted once, by them), and so is what a discard would recompute."""
        record = self.records[session_id]
        api_s = record.predicted_api_s
        if api_s is not None:
            api_s = expected_call_s(api_s, now - record.paused_at_s)
        return RequestView(
            request_id=session_id,
            arrival_s=record.first_arrival_s,
            context_tokens=self._exclusive_tokens(park),
            predicted_decode_tokens=record.predicted_decode_tokens,
            predicted_api_s=api_s,
            predicted_api_return_tokens=record.predicted_return_tokens,
            waited_iterations=record.waited_iterations,
            has_run=True,
            queued_since_s=record.queued_since_s,
        )

    def _exclusive_tokens(self, park: Park) -> int:
        """Tokens of the park's blocks that only the park holds."""
        ids = self._park_blocks(park)
        shared = sum(1 for count in vllm_hooks.ref_counts(self.kv_cache_manager, ids) if count > 1)
        return max(0, park.computed_tokens - shared * self.block_size)

    def _park_blocks(self, park: Park) -> list[int]:
        if not park.holds_blocks:
            return []
        return vllm_hooks.block_ids(self.kv_cache_manager, park.request.request_id)

    def _batch(self) -> BatchView:
        host = self.connector.free_host_tokens if self.connector is not None else 0
        return BatchView(
            running_context_tokens=sum(r.num_tokens for r in self.running),
            free_host_tokens=host,
        )

    def _apply_hints(self, record: RequestRecord, hints: SegmentHints) -> None:
        record.touch()
        if self.settings.predictor == "oracle" and hints.decode_tokens is None:
            # No plan behind this turn (start-up profiling, a client's turn):
            # nothing for the oracle to return, so a final one-token segment.
            hints = SegmentHints(tool=hints.tool, decode_tokens=1, final=True)
        record.tool = hints.tool
        if hints.final:
            record.predicted_api_s = None
        else:
            record.predicted_api_s = self.api_predictor.predict(
                hints.tool, hints.api_s, truth=hints.api_s
            )
        record.predicted_decode_tokens = self.decode_predictor.predict(
            hints.tool, hints.decode_tokens, truth=hints.decode_tokens
        )
        record.predicted_return_tokens = hints.api_return_tokens or 0

    def _key(self, request: Request) -> str:
        tags = self._tags.get(request.request_id)
        return tags.session_id if tags is not None and tags.session_id else request.request_id

    # ------------------------------------------------------------- vLLM hooks
    def add_request(self, request: Request) -> None:
        tags = TurnTags.of(_extra_args(request))
        self._tags[request.request_id] = tags
        key = tags.session_id or request.request_id
        now = time.monotonic()
        record = self.records.get(key)
        if record is None or record.phase is Phase.FINISHED:
            record = RequestRecord(key, first_arrival_s=now, queued_since_s=now)
            self._apply_hints(record, tags.hints)
            record.note(now, "queued")
            self.records[key] = record
        else:
            self._on_resume(key, record, tags, request, now)
        record.turn_request_id = request.request_id
        super().add_request(request)

    def has_finished_requests(self) -> bool:
        """vLLM's test, less the parked sessions: their finished requests stay
        in `self.requests` for as long as their blocks are kept, and would
        otherwise keep the engine core stepping for nothing."""
        if self.finished_req_ids:
            return True
        running, waiting = self.get_request_counts()
        parked = sum(1 for park in self.parks.values() if park.holds_blocks)
        return len(self.requests) - parked > running + waiting

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        self.iteration += 1
        self._free_swapped_out()
        self._demote_parked()
        self._evict_if_stalled()
        if self.waiting.changed or self.iteration % self.engine_policy.rerank_every == 0:
            self.waiting.rerank(self._ranked)
        output = super().schedule(*args, **kwargs)
        self._account(output)
        return output

    def _free_request(self, request: Request, delay_free_blocks: bool = False) -> Any:
        tags = self._tags.pop(
            request.request_id, TurnTags(None, SessionAction.NONE, SegmentHints())
        )
        key = tags.session_id or request.request_id
        record = self.records.get(key)
        now = time.monotonic()
        if tags.action is SessionAction.KEEP and request.status != RequestStatus.FINISHED_ERROR:
            if request.num_computed_tokens == 0 and key in self.parks:
                # Aborted before it ran: the session's earlier KV stays parked.
                freed = super()._free_request(request, delay_free_blocks)
                record.move(Phase.PAUSED, now, "turn aborted before it ran")
                return freed
            self.release_park(key)
            freed = super()._free_request(request, delay_free_blocks=True)
            self._park(key, request, record, now)
            return freed
        if tags.action is SessionAction.END:
            self.release_park(key)
        if record is not None and record.phase is not Phase.FINISHED:
            record.move(Phase.FINISHED, now, "finished")
        freed = super()._free_request(request, delay_free_blocks)
        if key in self._forget_when_done:
            self._forget_when_done.discard(key)
            self.records.pop(key, None)
        return freed

    def forget(self, key: str) -> None:
        """Drop a finished session's (or request's) record; one still live is
        dropped when it finishes. Its owner keeps a bounded number of them."""
        record = self.records.get(key)
        if record is not None and record.phase is not Phase.FINISHED:
            self._forget_when_done.add(key)
        else:
            self.records.pop(key, None)

    # ---------------------------------------------------------- sessions
    def _park(self, key: str, request: Request, record: RequestRecord, now: float) -> None:
        self.decode_predictor.observe(
            record.tool, request.num_output_tokens, record.predicted_decode_tokens
        )
        self.parks[key] = Park(
            request, tuple(request.all_token_ids), max(0, request.num_computed_tokens)
        )
        record.paused_at_s = now
        record.strategy = Strategy.PRESERVE
        record.restore_pending = False
        record.move(Phase.PAUSED, now, "paused", strategy=Strategy.PRESERVE)

    def release_park(self, session_id: str) -> None:
        """Give the session's kept KV back (its blocks to the free queue, still
        in the prefix cache; its host copy dropped)."""
        park = self.parks.pop(session_id, None)
        if park is None:
            return
        if park.holds_blocks:
            vllm_hooks.free_delayed_blocks(self, park.request)
        if self.connector is not None:
            self.connector.drop(session_id)

    def parked_kv(self, session_id: str) -> ParkedKv:
        """Where a paused session's KV is, for a move to another engine.
        Raises ValueError unless the session is paused here."""
        record = self.records.get(session_id)
        if record is None or record.phase is not Phase.PAUSED:
            state = "unknown" if record is None else record.phase.value
            raise ValueError(f"session {session_id!r} is not paused on this engine ({state})")
        park = self.parks.get(session_id)
        if park is None:
            return ParkedKv((), None, False)
        kept = park.token_ids[: park.computed_tokens]
        if park.holds_blocks:
            blocks = self._park_blocks(park)[: self._blocks_for(len(kept))]
            return ParkedKv(kept, tuple(blocks), False)
        on_host = self.connector is not None and self.connector.holds(session_id)
        return ParkedKv(kept, None, on_host)

    def parked_state(self, session_id: str) -> ParkedState:
        """The predictions a paused session's next engine should start from."""
        record = self.records[session_id]
        return ParkedState(
            tool=record.tool,
            predicted_api_s=record.predicted_api_s,
            paused_for_s=time.monotonic() - record.paused_at_s,
            predicted_decode_tokens=record.predicted_decode_tokens,
            predicted_return_tokens=record.predicted_return_tokens,
            turns=record.segment_index + 1,
        )

    def adopt_parked(
        self, session_id: str, token_ids: tuple[int, ...], on_host: bool, state: ParkedState
    ) -> None:
        """Take in a paused session from another engine: parked here as a
        swap (its KV a host copy, `on_host`) or as a discard (to recompute).
        Raises ValueError when the session is live here or the host copy
        does not fit."""
        record = self.records.get(session_id)
        if record is not None and record.phase is not Phase.FINISHED:
            raise ValueError(f"session {session_id!r} is {record.phase.value} on this engine")
        if on_host:
            if self.connector is None:
                raise ValueError("this engine has no KV connector to hold the session's KV")
            self.connector.adopt_host_copy(session_id, token_ids)
        now = time.monotonic()
        strategy = Strategy.SWAP if on_host else Strategy.DISCARD
        record = RequestRecord(session_id, first_arrival_s=now, queued_since_s=now)
        record.tool = state.tool
        record.predicted_api_s = state.predicted_api_s
        record.predicted_decode_tokens = state.predicted_decode_tokens
        record.predicted_return_tokens = state.predicted_return_tokens
        record.segment_index = state.turns - 1
        record.paused_at_s = now - state.paused_for_s
        record.has_run = True
        record.strategy = strategy
        self.records[session_id] = record
        self.parks[session_id] = Park(
            None, token_ids, len(token_ids), strategy=strategy, holds_blocks=False
        )
        record.move(Phase.PAUSED, now, "migrated in", strategy=strategy)

    def paused_sessions(self, now: float) -> list[HeldSession]:
        """Each session paused here (at `now`, monotonic), as a migration
        policy sees it: its KV's blocks, whether they are held on the
        device, and when its tool call is predicted to return."""
        paused = []
        for key, park in self.parks.items():
            record = self.records[key]
            if record.phase is not Phase.PAUSED:
                continue
            returns_in_s = None
            if record.predicted_api_s is not None:
                returns_in_s = remaining_call_s(record.predicted_api_s, now - record.paused_at_s)
            paused.append(
                HeldSession(
                    key,
                    self._blocks_for(park.computed_tokens),
                    returns_in_s=returns_in_s,
                    on_device=park.holds_blocks,
                )
            )
        return paused

    def parked_sessions_idle(self, max_idle_s: float, now: float) -> list[str]:
        """Sessions parked (awaiting their next turn) for more than `max_idle_s`."""
        return [
            key
            for key in self.parks
            if self.records[key].phase is Phase.PAUSED
            and now - self.records[key].paused_at_s > max_idle_s
        ]

    def _on_resume(
        self, key: str, record: RequestRecord, tags: TurnTags, request: Request, now: float
    ) -> None:
        if record.phase is not Phase.PAUSED:
            raise ValueError(f"session {key!r} already has a turn {record.phase.value}")
        if record.predicted_api_s is not None:
            self.api_predictor.observe(
                record.tool, now - record.paused_at_s, record.predicted_api_s
            )
        park = self.parks.get(key)
        if park is not None and park.swap_pending:
            self._cancel_swap(key, park)  # back before its blocks were freed: keep them
        record.resumed_from = park.strategy if park is not None else None
        record.previous_context_tokens = park.computed_tokens if park is not None else 0
        record.restore_pending = park is not None and self._restore_needed(park, request)
        record.reuse = None
        record.segment_index += 1
        self._apply_hints(record, tags.hints)
        record.queued_since_s = now
        record.move(Phase.QUEUED, now, "resumed", strategy=record.resumed_from)

    def _restore_needed(self, park: Park, request: Request) -> bool:
        """Whether the turn must rebuild its session's KV (recompute it, or
        load it from host): its blocks were released and the prefix cache
        no longer holds them. A discard whose blocks are still cached costs
        the turn nothing to restore, and is priced so."""
        if park.holds_blocks:
            return False
        cached, _ = vllm_hooks.cached_prefix(self.kv_cache_manager, request)
        return park.computed_tokens - cached > self.block_size

    def _cancel_swap(self, key: str, park: Park) -> None:
        park.swap_pending = False
        park.strategy = Strategy.PRESERVE
        self.records[key].strategy = Strategy.PRESERVE
        self.connector.drop(key)
        self.records[key].note(time.monotonic(), "swap cancelled", strategy=Strategy.PRESERVE)

    # ---------------------------------------------------------- MARS logic
    def _ranked(self, requests: list[Request]) -> list[Request]:
        """Ready requests in policy order, then blocked ones."""
        ready = [r for r in requests if r.status in _READY]
        blocked = [r for r in requests if r.status not in _READY]
        order = self.engine_policy.order(self._columns(ready), self.cost, self._batch())
        by_id = {r.request_id: r for r in ready}
        return [by_id[i] for i in order] + blocked

    def _columns(self, ready: list[Request]) -> RequestColumns:
        """Policy columns of `ready` requests.

        Each waiting request's packed view, with its terms priced under the
        cost model (`PricedRows.row`), is kept on its record until the request
        changes, so a re-rank costs a join of cached rows plus the policy's
        array work for the running batch.
        """
        priced = self._priced
        records = [self.records[self._key(r)] for r in ready]
        for request, record in zip(ready, records, strict=True):
            if record.view_row is None:
                record.view_row = priced.row(self._view(request, record))
        return priced.columns(
            [r.request_id for r in ready],
            [record.view_row for record in records],
            [record.waited_iterations for record in records],
        )

    def _memory_needed(self) -> bool:
        """Whether the next ready request (in the order vLLM admits them)
        needs more KV blocks than are free, or the last step had to preempt
        a running request for blocks."""
        if self._preempted_last_step:
            return True
        head = next((r for r in self.waiting if r.status in _READY), None)
        return head is not None and not self._fits(head)

    def _fits(self, request: Request) -> bool:
        """Whether the free blocks cover what `request` needs to compute all
        its tokens, counting the prefix it will find in the cache (and the
        cached blocks it takes out of the free pool)."""
        cached_tokens, cached_free = vllm_hooks.cached_prefix(self.kv_cache_manager, request)
        needed = self._blocks_for(request.num_tokens) - cached_tokens // self.block_size
        return needed <= self.free_blocks() - cached_free

    def _evict_if_stalled(self) -> None:
        """Break a stall vLLM cannot: the last step scheduled nothing, nothing
        runs (so there is nothing to preempt), and the next ready request
        needs more blocks than are free while parked sessions hold some. The
        park the policy ranks last gives its blocks up, as vLLM's
        preemption would do to a running request."""
        if self.last_scheduled_tokens or self.running:
            return
        if any(park.swap_pending for park in self.parks.values()):
            return  # blocks come free at the next step
        holders = {k: p for k, p in self.parks.items() if p.holds_blocks}
        if not holders or not self._memory_needed():
            return
        now = time.monotonic()
        views = {key: self._park_view(key, park, now) for key, park in holders.items()}
        columns = RequestColumns.from_views(list(views.values()))
        victim = self.engine_policy.order(columns, self.cost, self._batch())[-1]
        strategy = self.engine_policy.eviction_strategy(views[victim], self._batch(), self.cost)
        self._demote(victim, holders[victim], strategy, detail="evicted: no KV blocks to run")

    def _demote_parked(self) -> None:
        """Each step, the policy may demote parked sessions (preserved, and not
        already resumed) to discard or swap."""
        now = time.monotonic()
        batch = self._batch()
        paused = []
        for key, park in self.parks.items():
            record = self.records[key]
            if record.phase is Phase.PAUSED and park.strategy is Strategy.PRESERVE:
                view = self._park_view(key, park, now)
                paused.append((view, self.engine_policy.choose_strategy(view, batch, self.cost)))
        if not paused:
            return
        for key, strategy in self.engine_policy.demotions(
            paused, memory_needed=self._memory_needed()
        ):
            self._demote(key, self.parks[key], strategy)

    def _demote(self, key: str, park: Park, strategy: Strategy, detail: str = "") -> None:
        """DISCARD frees the park's blocks now; SWAP copies them to host this
        step and frees them at the next (without host space: DISCARD)."""
        kept = park.token_ids[: park.computed_tokens]
        if strategy is Strategy.SWAP and (
            self.connector is None or len(kept) > self.connector.free_host_tokens or not kept
        ):
            strategy, detail = Strategy.DISCARD, detail or "host swap space full"
        record = self.records[key]
        record.strategy = park.strategy = strategy
        record.touch()
        record.note(time.monotonic(), "demoted", strategy=strategy, detail=detail)
        if strategy is Strategy.SWAP:
            self.connector.request_swap_out(key, self._park_blocks(park), kept)
            record.swapped_out_tokens += len(kept)
            park.swap_pending = True
            return
        vllm_hooks.free_delayed_blocks(self, park.request)
        park.holds_blocks = False

    def _free_swapped_out(self) -> None:
        for park in self.parks.values():
            if park.swap_pending:
                park.swap_pending = False
                vllm_hooks.free_delayed_blocks(self, park.request)
                park.holds_blocks = False

    def _account(self, output: SchedulerOutput) -> None:
        """Observe what vLLM actually scheduled: first runs (and what each
        reused of its session's KV), preemptions, starvation counters."""
        now = time.monotonic()
        self.last_scheduled_tokens = output.total_num_scheduled_tokens
        self._preempted_last_step = bool(output.preempted_req_ids)
        for request_id in output.preempted_req_ids or ():
            request = self.requests.get(request_id)
            record = self.records.get(self._key(request)) if request is not None else None
            if record is not None and record.phase is Phase.RUNNING:
                record.queued_since_s = now
                record.move(Phase.QUEUED, now, "preempted")
        for request_id in output.num_scheduled_tokens:
            request = self.requests[request_id]
            key = self._key(request)
            record = self.records[key]
            if record.phase is not Phase.RUNNING:
                record.has_run = True
                record.move(Phase.RUNNING, now, "scheduled")
                reuse = vllm_hooks.prefill_reuse(request)
                if record.reuse is None and reuse is not None:
                    self._account_reuse(key, record, *reuse)
            record.waited_iterations = 0
        # Every ready waiting request counts; the policy decides whether only
        # those that already ran may starve (MARS.md's reference behaviour).
        for request in self.waiting:
            if request.status in _READY:
                self.records[self._key(request)].waited_iterations += 1

    def _account_reuse(self, key: str, record: RequestRecord, cached: int, loaded: int) -> None:
        """The turn's first schedule: record what it reused (vLLM's own
        counters), and give the session's park back (the turn now holds
        whatever of it the prefix cache had)."""
        recomputed = max(0, record.previous_context_tokens - cached)
        record.reuse = KvReuse(record.resumed_from, cached, loaded, recomputed)
        record.recomputed_tokens += recomputed
        record.swapped_in_tokens += loaded
        record.restore_pending = False
        record.touch()
        self.waiting.changed = True
        self.release_park(key)

    # ------------------------------------------------- requests moving here
    def hold_incoming(self, key: str, count: int) -> list[int] | None:
        """Take `count` free blocks for the next stage of the request moving
        here under `key`, if a block per running request stays free besides
        (their next tokens come first); None when not. The caller writes
        them, then `cache_incoming`. None as well without prefix caching:
        nothing could find the blocks, and vLLM would not clear the hashes
        they were given when they are reused."""
        if not self.kv_cache_manager.enable_caching:
            return None
        if self.free_blocks() - count < len(self.running) + 1:
            return None
        blocks = vllm_hooks.take_free_blocks(self.kv_cache_manager, count)
        self.incoming.setdefault(key, []).extend(blocks)
        return [block.block_id for block in blocks]

    def cache_incoming(
        self, key: str, token_ids: Sequence[int], block_hasher: Callable, written_before: int
    ) -> None:
        """Enter the blocks held for `key` from block `written_before` on,
        now written with the KV of `token_ids`' first tokens, in the prefix
        cache: the request's continuation here finds them as its own."""
        blocks = self.incoming[key]
        vllm_hooks.cache_written_blocks(
            self.kv_cache_manager,
            block_hasher,
            list(token_ids[: len(blocks) * self.block_size]),
            blocks,
            written_before,
            self.block_size,
        )

    def release_incoming(self, key: str) -> int:
        """Drop the holds on the blocks of `key` (the move committed, or
        failed): those in the prefix cache stay there until reused, the
        last ones evicted first. Returns how many were held."""
        blocks = self.incoming.pop(key, [])
        vllm_hooks.give_back_blocks(self.kv_cache_manager, list(reversed(blocks)))
        return len(blocks)

    # ---------------------------------------------------------- inspection
    def free_blocks(self) -> int:
        return vllm_hooks.num_free_blocks(self.kv_cache_manager)

    def load_snapshot(self) -> dict[str, int | float | list[tuple[float, int]]]:
        """This instance's load, as the global scheduler's `InstanceLoad` needs it.

        ``paused_returns`` holds one ``(remaining_s, blocks)`` pair per parked
        session whose KV was discarded or swapped out (the sessions and blocks
        summed in ``paused_released_blocks``): the seconds until its API call
        is predicted to return (0 once overdue or without a prediction) and
        the blocks it will need again. ``paused_preserved_blocks`` counts
        each block the parks hold once, and only those no live request holds.
        """
        blocks = self._blocks_for
        now = time.monotonic()
        ready = [r for r in self.waiting if r.status in _READY]
        returns: list[tuple[float, int]] = []
        paused = dict.fromkeys(Strategy, 0)
        held = Counter[int]()
        for key, park in self.parks.items():
            record = self.records[key]
            if record.phase is not Phase.PAUSED:
                continue
            paused[park.strategy] += 1
            if park.holds_blocks:
                held.update(self._park_blocks(park))
            else:
                remaining = remaining_call_s(record.predicted_api_s, now - record.paused_at_s)
                returns.append((remaining, blocks(park.computed_tokens)))
        ids = list(held)
        counts = vllm_hooks.ref_counts(self.kv_cache_manager, ids)
        preserved = sum(1 for i, count in zip(ids, counts, strict=True) if count == held[i])
        backlog = 0.0
        if ready:
            columns = self._columns(ready)
            choices = self.engine_policy.choose_strategies(columns, self._batch(), self.cost)
            backlog = float(memory_over_time_columns(columns, choices.codes, self.cost).sum())
        return {
            "total_blocks": self._total_blocks,
            "free_blocks": self.free_blocks(),
            "running": len(self.running),
            "waiting": len(ready),
            "waiting_demand_blocks": sum(blocks(r.num_tokens) for r in ready),
            "paused_preserved_blocks": preserved,
            "paused_released_blocks": sum(b for _, b in returns),
            "paused_returns": returns,
            "paused_preserved_sessions": paused[Strategy.PRESERVE],
            "paused_discarded_sessions": paused[Strategy.DISCARD],
            "paused_swapped_sessions": paused[Strategy.SWAP],
            "predicted_backlog": backlog,
            "block_size": self.block_size,
        }

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def predictor_report(self) -> dict[str, dict[str, dict[str, float]]]:
        """Prediction error so far: API durations and segment lengths, per key."""
        return {
            "api_duration_s": self.api_predictor.error_report(),
            "segment_tokens": self.decode_predictor.error_report(),
        }


def _extra_args(request: Request) -> dict[str, Any] | None:
    params = request.sampling_params
    return params.extra_args if params is not None else None
