"""MARS KV connector: copies a parked session's KV blocks to host memory
and loads them into the blocks of the session's next turn.

The *swap* strategy: while a session waits on a tool call, its last turn's
blocks (kept by `MarsScheduler`) are copied to a host buffer keyed by the
session id and then freed; when the session's next turn arrives, vLLM asks
`get_num_new_matched_tokens` how many of its prompt tokens the connector can
supply beyond the local prefix-cache hit, allocates blocks for them, and the
worker copies them in before the forward pass. A turn whose prompt does not
start with the host copy's tokens (an edited history) loads nothing: its KV
would be wrong.

The same host copies carry a paused session to another engine
(`workers.kv_transport`): the source reads the session's blocks (from the
device while preserved, from its host copy once swapped), the destination
adopts them as a host copy under the session id, and its next turn loads
them as it would load a swap.

Roles, as in vLLM's `KVConnectorBase_V1`:

- scheduler side (next to `MarsScheduler`): records the copies it is asked
  for, answers what a new turn can load, packs this step's operations into
  `MarsConnectorMetadata`.
- worker side (next to the KV tensors): runs the copies at the start of the
  step, before the forward pass that needs a load.

Ordering: a copy-out runs in the step that carries it; the scheduler frees
the blocks only at the next step, so the copy never races a new owner.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from workers.turns import TurnTags

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

RECORD_DIGESTS_KEY = "record_digests"
"""`kv_connector_extra_config` flag: keep a SHA-256 of every copied block
set (tests compare the engine's KV before the copy-out and after the
copy-in). Off in serving: it reads every copied byte again."""


@dataclass(frozen=True)
class BlockCopy:
    """Copy the blocks of session `key` one way: device blocks `block_ids`
    are the session's blocks `first_block`, `first_block + 1`, ..."""

    key: str
    block_ids: tuple[int, ...]
    first_block: int = 0


@dataclass
class MarsConnectorMetadata(KVConnectorMetadata):
    """This step's KV movements, scheduler -> worker."""

    copy_out: list[BlockCopy] = field(default_factory=list)
    copy_in: list[BlockCopy] = field(default_factory=list)
    drop: list[str] = field(default_factory=list)
    """Host copies to free without loading (the session ended, or its next
    turn did not need them)."""


@dataclass(frozen=True)
class HostCopy:
    """Scheduler-side record of one session's KV in host memory."""

    token_ids: tuple[int, ...]
    """The tokens whose KV is on host (the first `len(token_ids)`)."""


@dataclass(frozen=True)
class HostSegment:
    """Worker-side: blocks `first_block` on of one session's host copy, one
    tensor `[blocks, ...]` per layer."""

    first_block: int
    layers: dict[str, torch.Tensor]

    @property
    def num_blocks(self) -> int:
        return next(iter(self.layers.values())).shape[0] if self.layers else 0


@dataclass(frozen=True)
class SwapRecord:
    """Debug record of one swap (`record_digests`): digests of the engine's
    own KV bytes right before the copy-out and right after the copy-in."""

    key: str
    num_blocks: int
    bytes_copied: int
    out_digest: str
    in_digest: str | None = None


class MarsKVConnector(KVConnectorBase_V1):
    """Host-memory swap of parked sessions' KV blocks (see module docstring)."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._block_size = vllm_config.cache_config.block_size
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.host_capacity_tokens = int(extra.get("host_capacity_tokens", 0))
        self._record_digests = bool(extra.get(RECORD_DIGESTS_KEY, False))
        # Scheduler side.
        self._host_copies: dict[str, HostCopy] = {}
        self._pending_out: list[BlockCopy] = []
        self._pending_in: list[BlockCopy] = []
        self._pending_drop: list[str] = []
        self._matches: dict[str, tuple[str, int]] = {}
        # Worker side.
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._host: dict[str, list[HostSegment]] = {}
        self._load_errors: set[int] = set()
        self.swap_log: dict[str, list[SwapRecord]] = {}

    # ---------------------------------------------------------------- scheduler
    @property
    def free_host_tokens(self) -> int:
        """Host space left, in tokens; `MarsScheduler` reports it to policies."""
        used = sum(len(copy.token_ids) for copy in self._host_copies.values())
        return self.host_capacity_tokens - used

    def holds(self, key: str) -> bool:
        return key in self._host_copies

    def request_swap_out(self, key: str, block_ids: list[int], token_ids: tuple[int, ...]) -> None:
        """Called by `MarsScheduler` when it demotes a parked session to SWAP:
        copy the KV of `token_ids` (held in `block_ids`) to host under `key`.
        The caller keeps the blocks allocated until the next step."""
        if len(token_ids) > self.free_host_tokens:
            raise ValueError(
                f"swap of {len(token_ids)} tokens exceeds free host space {self.free_host_tokens}"
            )
        needed = -(-len(token_ids) // self._block_size)
        if key in self._pending_drop:
            # An older copy's drop (its session's last turn did not load it)
            # would run after this copy-out on the worker and take the new
            # copy with it; the copy-out replaces the old one anyway.
            self._pending_drop.remove(key)
        self._pending_out.append(BlockCopy(key, tuple(block_ids[:needed])))
        self._host_copies[key] = HostCopy(tuple(token_ids))

    def adopt_host_copy(self, key: str, token_ids: tuple[int, ...]) -> None:
        """Record a host copy that another engine made (a migrated session):
        the worker side holds its blocks once `write_host_copy` ran."""
        if key in self._host_copies:
            raise ValueError(f"session {key!r} already has a host copy here")
        if len(token_ids) > self.free_host_tokens:
            raise ValueError(
                f"the session's KV ({len(token_ids)} tokens) exceeds free host space "
                f"{self.free_host_tokens} (engine.host_swap_tokens)"
            )
        if key in self._pending_drop:  # an older copy's drop must not take the new one
            self._pending_drop.remove(key)
        self._host_copies[key] = HostCopy(tuple(token_ids))

    def drop(self, key: str) -> None:
        """Forget a session's host copy (the session ended, or its KV is back)."""
        if self._host_copies.pop(key, None) is not None:
            self._pending_drop.append(key)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        key = TurnTags.of(_extra_args(request)).session_id
        copy = self._host_copies.get(key) if key is not None else None
        if copy is None:
            return 0, False
        held = len(copy.token_ids)
        if tuple(request.prompt_token_ids[:held]) != copy.token_ids:
            return 0, False  # the history was edited: this KV belongs to another context
        # At least one token must be computed to sample the next one.
        loadable = max(0, min(held, request.num_tokens - 1) - num_computed_tokens)
        if loadable:
            self._matches[request.request_id] = (key, num_computed_tokens)
        return loadable, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        match = self._matches.pop(request.request_id, None)
        if num_external_tokens <= 0 or match is None:
            return
        key, local = match
        block_ids = blocks.get_block_ids()[0]
        first = local // self._block_size
        last = -(-(local + num_external_tokens) // self._block_size)
        self._pending_in.append(BlockCopy(key, tuple(block_ids[first:last]), first))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = MarsConnectorMetadata(
            copy_out=self._pending_out, copy_in=self._pending_in, drop=self._pending_drop
        )
        for copy in meta.copy_in:  # loaded: the host space is free again
            self._host_copies.pop(copy.key, None)
        self._pending_out, self._pending_in, self._pending_drop = [], [], []
        return meta

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._matches.pop(request.request_id, None)
        return False, None

    # ------------------------------------------------------------------- worker
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        num_blocks = self._kv_cache_config.num_blocks
        for name, tensor in kv_caches.items():
            if tensor.shape[0] != num_blocks:
                raise RuntimeError(
                    f"MarsKVConnector expects the block dimension first; layer {name} "
                    f"has shape {tuple(tensor.shape)} for {num_blocks} blocks"
                )
        self._kv_caches = dict(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, MarsConnectorMetadata)
        for copy in meta.copy_out:
            self._copy_out(copy)
        for copy in meta.copy_in:
            self._copy_in(copy)
        for key in meta.drop:
            self._host.pop(key, None)

    def read_blocks(self, block_ids: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """Host copies of device blocks `block_ids` of every layer (a
        preserved session leaving for another engine); read-only."""
        index = torch.tensor(block_ids, dtype=torch.long)
        return {
            name: kv.index_select(0, index.to(kv.device)).to("cpu", copy=True)
            for name, kv in self._kv_caches.items()
        }

    def read_host_copy(self, key: str) -> dict[str, torch.Tensor]:
        """A swapped session's host copy as one tensor per layer, left in
        place (the source keeps it until the migration commits)."""
        if key not in self._host:
            raise KeyError(f"no host copy of session {key!r} on this worker")
        segments = self._host[key]
        if len(segments) == 1:
            return segments[0].layers
        return {
            name: torch.cat([segment.layers[name] for segment in segments])
            for name in segments[0].layers
        }

    def write_host_copy(self, key: str, segments: list[HostSegment], num_blocks: int) -> None:
        """Hold another engine's blocks of session `key` as this worker's
        host copy, after checking that they fit this engine's KV layout and
        follow one another from block 0. Segments are kept as they came (a
        moved request's stages): joining them would copy the whole context
        on the move's critical path."""
        expected = 0
        for segment in segments:
            if segment.first_block != expected:
                raise ValueError(
                    f"the session's KV skips from block {expected} to {segment.first_block}"
                )
            self.check_layout(segment.layers, segment.num_blocks)
            expected += segment.num_blocks
        if expected != num_blocks:
            raise ValueError(f"the session's KV has {expected} blocks, expected {num_blocks}")
        self._host[key] = [
            HostSegment(segment.first_block, {n: t.to("cpu") for n, t in segment.layers.items()})
            for segment in segments
        ]

    def write_blocks(self, block_ids: list[int], layers: dict[str, torch.Tensor]) -> None:
        """Write another engine's blocks into device blocks `block_ids`
        (held for them by the scheduler), after checking their layout."""
        self.check_layout(layers, len(block_ids))
        index = torch.tensor(block_ids, dtype=torch.long)
        for name, kv in self._kv_caches.items():
            kv.index_copy_(0, index.to(kv.device), layers[name].to(kv.device))

    def check_layout(self, layers: dict[str, torch.Tensor], num_blocks: int) -> None:
        """ValueError naming what differs unless `layers` are `num_blocks`
        blocks of this engine's every layer, in its dtype and shape."""
        if set(layers) != set(self._kv_caches):
            raise ValueError(
                f"the session's KV has layers {sorted(layers)}, this engine "
                f"{sorted(self._kv_caches)}: another model"
            )
        for name, kv in self._kv_caches.items():
            blocks = layers[name]
            if blocks.dtype != kv.dtype or tuple(blocks.shape) != (num_blocks, *kv.shape[1:]):
                raise ValueError(
                    f"the session's KV of layer {name} is {blocks.dtype} "
                    f"{tuple(blocks.shape)}; this engine needs {kv.dtype} "
                    f"{(num_blocks, *kv.shape[1:])}"
                )

    def time_block_copy(self, num_blocks: int, repeats: int = 5) -> float:
        """Seconds to copy `num_blocks` blocks of every layer to host and back,
        halved (one way); read-only on the KV cache. Used by start-up profiling."""
        index = torch.arange(num_blocks, dtype=torch.long)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for kv in self._kv_caches.values():
                host = kv.index_select(0, index.to(kv.device)).to("cpu", copy=True)
                host.to(kv.device, copy=True)
            best = min(best, time.perf_counter() - start)
        return best / 2

    def _copy_out(self, copy: BlockCopy) -> None:
        index = torch.tensor(copy.block_ids, dtype=torch.long)
        saved = {
            name: kv.index_select(0, index.to(kv.device)).to("cpu", copy=True)
            for name, kv in self._kv_caches.items()
        }
        self._host[copy.key] = [HostSegment(0, saved)]
        if self._record_digests:
            record = SwapRecord(
                key=copy.key,
                num_blocks=len(copy.block_ids),
                bytes_copied=sum(t.numel() * t.element_size() for t in saved.values()),
                out_digest=self._digest(copy.block_ids),
            )
            self.swap_log.setdefault(copy.key, []).append(record)

    def _copy_in(self, copy: BlockCopy) -> None:
        saved = self._host.pop(copy.key, None)
        if saved is None:
            # The scheduler counted on a host copy this worker does not hold.
            # Report its blocks as not loaded: vLLM recomputes them
            # (`kv_load_failure_policy="recompute"`) instead of the engine
            # failing every request it runs.
            logger.warning(
                "no host copy of session %s to load into %d blocks: they are recomputed",
                copy.key,
                len(copy.block_ids),
            )
            self._load_errors.update(copy.block_ids)
            return
        ids = torch.tensor(copy.block_ids, dtype=torch.long)
        start, end = copy.first_block, copy.first_block + len(copy.block_ids)
        for segment in saved:
            low = max(start, segment.first_block)
            high = min(end, segment.first_block + segment.num_blocks)
            if low >= high:
                continue
            index = ids[low - start : high - start]
            rows = slice(low - segment.first_block, high - segment.first_block)
            for name, kv in self._kv_caches.items():
                source = segment.layers[name][rows]
                kv.index_copy_(0, index.to(kv.device), source.to(kv.device))
        log = self.swap_log.get(copy.key) if self._record_digests else None
        if log:  # none for a copy another engine made (a moved session)
            log[-1] = replace(log[-1], in_digest=self._digest(copy.block_ids))

    def _digest(self, block_ids: tuple[int, ...]) -> str:
        """SHA-256 over the given blocks of every layer, in layer order."""
        sha = hashlib.sha256()
        index = torch.tensor(block_ids, dtype=torch.long)
        for name in sorted(self._kv_caches):
            kv = self._kv_caches[name]
            blocks = kv.index_select(0, index.to(kv.device)).cpu().contiguous()
            sha.update(blocks.view(torch.uint8).numpy().tobytes())
        return sha.hexdigest()

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Blocks a copy-in of this step could not fill (see `_copy_in`)."""
        failed, self._load_errors = self._load_errors, set()
        return failed

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        return

    def wait_for_save(self) -> None:
        return


def _extra_args(request: Request) -> dict[str, Any] | None:
    params = request.sampling_params
    return params.extra_args if params is not None else None
