"""`MarsScheduler`: vLLM's v1 scheduler with MARS admission order and KV
strategies for paused requests. Plugged in through `scheduler_cls`.

What it changes in vLLM, and where:

- Admission order: `self.waiting` is a `RankedRequestQueue` re-ranked by the
  engine policy (`policies/`) before each step when stale.
- Paused requests: a streaming-input session that finished a chunk waits in
  `WAITING_FOR_STREAMING_REQ` holding its KV blocks (vLLM's behaviour =
  preserve). Each step the policy may demote paused requests: DISCARD frees
  the blocks (the resume recomputes the context), SWAP copies them to host
  through `MarsKVConnector` and frees them one step later.
- Resume: `_update_request_as_session` is wrapped so a released request
  keeps its context tokens, then restarts from zero computed tokens (recompute,
  or a connector load for a swapped one).

Everything else — batching, chunked prefill, preemption — is vLLM's.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

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
    PricedRows,
    RequestColumns,
    RequestView,
    Strategy,
    make_engine_policy,
)
from policies.memory import memory_over_time_columns
from policies.predictors import expected_call_s, remaining_call_s
from workers.hints import SegmentHints
from workers.kv_connector import MarsKVConnector
from workers.lifecycle import Phase, RequestRecord
from workers.settings import SchedulerSettings, settings_from_additional_config

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
        self._items = deque(key(list(self._items)))
        self.changed = False

    def __bool__(self) -> bool:
        return bool(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._items)


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
        self._forget_when_freed: set[str] = set()
        self.iteration = 0
        self.last_scheduled_tokens = 0
        self._preempted_last_step = False
        self._pending_free: list[Request] = []
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
        so that every row is packed again under the new ones (rows of the old
        `PricedRows` would be correct, only priced from scratch every
        iteration)."""
        self.cost = cost
        self._priced = PricedRows(cost)
        for record in self.records.values():
            record.touch()
        self.waiting.changed = True

    # ------------------------------------------------------------ snapshots
    def _view(self, request: Request, record: RequestRecord) -> RequestView:
        generated = request.num_output_tokens if record.phase is not Phase.PAUSED else 0
        return RequestView(
            request_id=request.request_id,
            arrival_s=record.first_arrival_s,
            context_tokens=request.num_tokens,
            predicted_decode_tokens=max(0, record.predicted_decode_tokens - generated),
            predicted_api_s=record.predicted_api_s,
            predicted_api_return_tokens=record.predicted_return_tokens,
            waited_iterations=record.waited_iterations,
            has_run=record.has_run,
            resumed_strategy=record.strategy if record.restore_pending else None,
            queued_since_s=record.queued_since_s,
        )

    def _batch(self) -> BatchView:
        host = self.connector.free_host_tokens if self.connector is not None else 0
        return BatchView(
            running_context_tokens=sum(r.num_tokens for r in self.running),
            free_host_tokens=host,
        )

    def _apply_hints(self, record: RequestRecord, hints: SegmentHints) -> None:
        record.touch()
        if self.settings.predictor == "oracle" and hints.decode_tokens is None:
            # No plan behind this chunk (start-up profiling, a session's closing
            # chunk): nothing for the oracle to return, so a final one-token segment.
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

    # ------------------------------------------------------------- vLLM hooks
    def add_request(self, request: Request) -> None:
        if request.request_id not in self.records:
            now = time.monotonic()
            record = RequestRecord(request.request_id, first_arrival_s=now, queued_since_s=now)
            self._apply_hints(record, SegmentHints.from_extra_args(_extra_args(request)))
            record.note(now, "queued")
            self.records[request.request_id] = record
        super().add_request(request)

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        self.iteration += 1
        self._free_swapped_out()
        self._demote_paused()
        self._evict_if_stalled()
        if self.waiting.changed or self.iteration % self.engine_policy.rerank_every == 0:
            self.waiting.rerank(self._ranked)
        output = super().schedule(*args, **kwargs)
        self._account(output)
        return output

    def _handle_stopped_request(self, request: Request) -> bool:
        finished = super()._handle_stopped_request(request)
        if not finished and request.status == RequestStatus.WAITING_FOR_STREAMING_REQ:
            self._on_pause(request)
        return finished

    def _update_request_as_session(self, session: Request, update: Any) -> None:
        record = self.records[session.request_id]
        if record.phase is Phase.RUNNING:
            # The next chunk was already queued: a pause of zero length.
            self._on_pause(session)
        if session in self._pending_free:
            self._cancel_swap_out(session, record)
        released = record.strategy is not Strategy.PRESERVE
        if released:
            session.num_computed_tokens = record.frontier_tokens
        super()._update_request_as_session(session, update)
        if released:
            session.num_computed_tokens = 0
            record.restore_pending = True
            record.touch()
            self.waiting.changed = True
        self._on_resume(session, record, update)

    def _free_request(self, request: Request, delay_free_blocks: bool = False) -> Any:
        record = self.records.get(request.request_id)
        if record is not None and record.phase is not Phase.FINISHED:
            record.move(Phase.FINISHED, time.monotonic(), "finished")
        freed = super()._free_request(request, delay_free_blocks)
        if request.request_id in self._forget_when_freed:
            self._forget_when_freed.discard(request.request_id)
            del self.records[request.request_id]
        return freed

    def forget(self, request_id: str) -> None:
        """Drop a finished request's record (its owner keeps a bounded number
        of them); one vLLM still holds is dropped when vLLM frees it."""
        if request_id in self.requests:
            self._forget_when_freed.add(request_id)
        else:
            self.records.pop(request_id, None)

    # ---------------------------------------------------------- MARS logic
    def _ranked(self, requests: list[Request]) -> list[Request]:
        """Ready requests in policy order, then blocked (paused) ones."""
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
        array work for the running batch, not a Python pass building 1,000
        views nor a recomputation of what only the requests decide.
        """
        priced = self._priced
        records = [self.records[r.request_id] for r in ready]
        for request, record in zip(ready, records, strict=True):
            if record.view_row is None:
                record.view_row = priced.row(self._view(request, record))
        return priced.columns(
            [r.request_id for r in ready],
            [record.view_row for record in records],
            [record.waited_iterations for record in records],
        )

    def _on_pause(self, request: Request) -> None:
        now = time.monotonic()
        record = self.records[request.request_id]
        self.decode_predictor.observe(
            record.tool, request.num_output_tokens, record.predicted_decode_tokens
        )
        record.paused_at_s = now
        record.strategy = Strategy.PRESERVE
        record.move(Phase.PAUSED, now, "paused", strategy=Strategy.PRESERVE)

    def _on_resume(self, request: Request, record: RequestRecord, update: Any) -> None:
        now = time.monotonic()
        if record.predicted_api_s is not None:
            self.api_predictor.observe(
                record.tool, now - record.paused_at_s, record.predicted_api_s
            )
        record.segment_index += 1
        self._apply_hints(record, SegmentHints.from_extra_args(_extra_args(request)))
        record.queued_since_s = now
        record.move(Phase.QUEUED, now, "resumed", strategy=record.strategy)

    def _memory_needed(self) -> bool:
        """Whether the next ready request of either queue (in the order vLLM
        admits them) needs more KV blocks than are free, or the last step had
        to preempt a running request for blocks."""
        if self._preempted_last_step:
            return True
        for queue in (self.kv_holding_waiting, self.waiting):
            head = next((r for r in queue if r.status in _READY), None)
            if head is not None and not self._fits(head):
                return True
        return False

    def _fits(self, request: Request) -> bool:
        """Whether the free blocks cover what `request` needs beyond the blocks
        it holds to compute all its tokens."""
        held = 0
        if self._holds_kv_blocks(request):
            (block_ids,) = self.kv_cache_manager.get_block_ids(request.request_id)
            held = len(block_ids)
        return self._blocks_for(request.num_tokens) - held <= self.free_blocks()

    def _evict_if_stalled(self) -> None:
        """Break a stall vLLM cannot: the last step scheduled nothing, nothing
        runs (so there is nothing to preempt), and every ready request that
        holds KV blocks (resumed with its KV preserved) needs more than are
        free. The one the policy ranks last gives its blocks up, as vLLM's
        preemption would do to a running request."""
        if self.last_scheduled_tokens or self.running or self._pending_free:
            return
        holders = [r for r in self.kv_holding_waiting if r.status in _READY]
        if not holders or self._fits(holders[0]):  # blocks came free since the last step
            return
        victim_id = self.engine_policy.order(self._columns(holders), self.cost, self._batch())[-1]
        victim = next(r for r in holders if r.request_id == victim_id)
        record = self.records[victim_id]
        strategy = self.engine_policy.eviction_strategy(
            self._view(victim, record), self._batch(), self.cost
        )
        if strategy is Strategy.SWAP and (
            self.connector is None or victim.num_computed_tokens > self.connector.free_host_tokens
        ):
            strategy = Strategy.DISCARD
        self._release(victim, strategy, detail="evicted: no KV blocks for a ready request")
        record.restore_pending = True

    def _demote_paused(self) -> None:
        batch = self._batch()
        now = time.monotonic()
        paused = []
        for request in self.kv_holding_waiting:
            record = self.records[request.request_id]
            if record.phase is Phase.PAUSED and record.strategy is Strategy.PRESERVE:
                view = self._view(request, record)
                if view.predicted_api_s is not None:
                    elapsed = now - record.paused_at_s
                    view = dataclasses.replace(
                        view, predicted_api_s=expected_call_s(view.predicted_api_s, elapsed)
                    )
                paused.append((view, self.engine_policy.choose_strategy(view, batch, self.cost)))
        if not paused:
            return
        requests = {r.request_id: r for r in self.kv_holding_waiting}
        host_left = batch.free_host_tokens
        demoted = self.engine_policy.demotions(paused, memory_needed=self._memory_needed())
        for request_id, strategy in demoted:
            request = requests[request_id]
            if strategy is Strategy.SWAP:
                if self.connector is None or request.num_computed_tokens > host_left:
                    self._release(request, Strategy.DISCARD, detail="host swap space full")
                    continue
                host_left -= request.num_computed_tokens
            self._release(request, strategy)

    def _release(self, request: Request, strategy: Strategy, detail: str = "") -> None:
        """Demote a paused request's KV: DISCARD frees it now; SWAP copies it to
        host this step and frees it next step."""
        record = self.records[request.request_id]
        record.strategy = strategy
        record.frontier_tokens = request.num_computed_tokens
        record.touch()
        record.note(time.monotonic(), "demoted", strategy=strategy, detail=detail)
        if strategy is Strategy.SWAP:
            (block_ids,) = self.kv_cache_manager.get_block_ids(request.request_id)
            self.connector.request_swap_out(
                request.request_id, block_ids, request.num_computed_tokens
            )
            record.swapped_out_tokens += request.num_computed_tokens
            self._pending_free.append(request)
            return
        self._free_paused_blocks(request)

    def _free_paused_blocks(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        request.num_computed_tokens = 0
        self.kv_holding_waiting.remove_request(request)
        self.waiting.add_request(request)

    def _free_swapped_out(self) -> None:
        pending, self._pending_free = self._pending_free, []
        for request in pending:
            if request in self.kv_holding_waiting:
                self._free_paused_blocks(request)
                continue
            # An evicted request was admitted in the step that copied it out
            # (blocks came free meanwhile), or has finished: it keeps its blocks.
            record = self.records[request.request_id]
            self._keep_swapped_blocks(request, record)
            record.restore_pending = False

    def _cancel_swap_out(self, request: Request, record: RequestRecord) -> None:
        """The API returned before the swapped-out blocks were freed: keep them."""
        self._pending_free.remove(request)
        self._keep_swapped_blocks(request, record)

    def _keep_swapped_blocks(self, request: Request, record: RequestRecord) -> None:
        """Drop the host copy of a swap-out whose blocks were never freed."""
        self.connector.request_finished(request, [])
        record.strategy = Strategy.PRESERVE
        record.touch()
        record.note(time.monotonic(), "swap cancelled", strategy=Strategy.PRESERVE)

    def _account(self, output: SchedulerOutput) -> None:
        """Observe what vLLM actually scheduled: first runs, recompute, swap-in,
        starvation counters."""
        now = time.monotonic()
        self.last_scheduled_tokens = output.total_num_scheduled_tokens
        self._preempted_last_step = bool(output.preempted_req_ids)
        for request_id in output.preempted_req_ids or ():
            record = self.records.get(request_id)
            if record is not None and record.phase is Phase.RUNNING:
                record.queued_since_s = now
                record.move(Phase.QUEUED, now, "preempted")
        scheduled = output.num_scheduled_tokens
        for request_id, tokens in scheduled.items():
            record = self.records[request_id]
            request = self.requests[request_id]
            if record.phase is not Phase.RUNNING:
                record.has_run = True
                record.move(Phase.RUNNING, now, "scheduled")
            if record.restore_pending:
                self._account_restore(request, record, tokens)
            record.waited_iterations = 0
        # Every ready waiting request counts; the policy decides whether only
        # those that already ran may starve (MARS.md's reference behaviour).
        for request in self.waiting:
            if request.status in _READY:
                self.records[request.request_id].waited_iterations += 1

    def _account_restore(self, request: Request, record: RequestRecord, tokens: int) -> None:
        computed_after = request.num_computed_tokens
        computed_before = computed_after - tokens
        if (
            record.strategy is Strategy.SWAP
            and computed_before > 0
            and not record.swapped_in_tokens
        ):
            record.swapped_in_tokens = computed_before
        restored_upto = min(record.frontier_tokens, computed_after)
        if record.strategy is Strategy.DISCARD:
            record.recomputed_tokens += max(0, restored_upto - computed_before)
        if computed_after >= record.frontier_tokens:
            record.restore_pending = False
            record.touch()
            self.waiting.changed = True

    # ---------------------------------------------------------- inspection
    def free_blocks(self) -> int:
        return self.kv_cache_manager.block_pool.get_num_free_blocks()

    def load_snapshot(self) -> dict[str, int | float | list[tuple[float, int]]]:
        """This instance's load, as the global scheduler's `InstanceLoad` needs it.

        ``paused_returns`` holds one ``(remaining_s, blocks)`` pair per paused
        session whose KV was discarded or swapped out (the sessions and blocks
        summed in ``paused_released_blocks``): the seconds until its API call
        is predicted to return (`remaining_call_s`: 0 once overdue or without
        a prediction) and the blocks it will need again, so that placement can
        weigh each by how soon it comes back.
        """
        blocks = self._blocks_for
        now = time.monotonic()
        ready = [r for r in self.waiting if r.status in _READY]
        preserved = released = 0
        returns: list[tuple[float, int]] = []
        paused = dict.fromkeys(Strategy, 0)
        for request in [*self.waiting, *self.kv_holding_waiting]:
            record = self.records[request.request_id]
            if record.phase is not Phase.PAUSED:
                continue
            paused[record.strategy] += 1
            if record.strategy is Strategy.PRESERVE:
                (held,) = self.kv_cache_manager.get_block_ids(request.request_id)
                preserved += len(held)
            else:
                needed = blocks(record.frontier_tokens)
                released += needed
                remaining = remaining_call_s(record.predicted_api_s, now - record.paused_at_s)
                returns.append((remaining, needed))
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
            "paused_released_blocks": released,
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
