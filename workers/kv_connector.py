"""MARS KV connector: moves a request's KV blocks between the engine's KV cache
and a host buffer.

Today it carries the *swap* strategy (a paused request's blocks go to host
memory and come back on resume). The same two operations — copy blocks out
under a key, copy them into freshly allocated blocks — are what live
migration and the prefill->decode hand-off need, so the host buffer is keyed
by request id and the operations travel as plain metadata.

Roles, as in vLLM's `KVConnectorBase_V1`:

- scheduler side (in the engine-core process, called by `MarsScheduler` and
  by vLLM's scheduler): records swap-outs it is asked for, answers how many
  tokens a resumed request can load from host, and packs this step's
  operations into `MarsConnectorMetadata`.
- worker side (next to the KV tensors): executes the operations at the start
  of the step, before the forward pass when a load feeds it.

Ordering: a swap-out is executed by the worker in the step that carries it;
`MarsScheduler` frees the blocks only in the following step, so the copy
never races a new owner's writes (vLLM may start non-load connector work
after the forward).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request


@dataclass(frozen=True)
class BlockCopy:
    """Copy `block_ids` of one request (holding `num_tokens` tokens) one way."""

    request_id: str
    block_ids: tuple[int, ...]
    num_tokens: int


@dataclass
class MarsConnectorMetadata(KVConnectorMetadata):
    """This step's KV movements, scheduler -> worker."""

    swap_out: list[BlockCopy] = field(default_factory=list)
    swap_in: list[BlockCopy] = field(default_factory=list)
    drop: list[str] = field(default_factory=list)
    """Host copies to free without loading (request aborted while swapped)."""


@dataclass(frozen=True)
class SwapRecord:
    """Worker-side observation of one swap: digests of the engine's own KV
    bytes, taken from the device blocks right before they were copied out
    and right after they were copied back in."""

    request_id: str
    num_blocks: int
    bytes_copied: int
    out_digest: str
    in_digest: str | None = None


class MarsKVConnector(KVConnectorBase_V1):
    """Host-memory swap of paused requests' KV blocks (see module docstring)."""

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
        # Scheduler side.
        self._host_tokens: dict[str, int] = {}
        self._pending_out: list[BlockCopy] = []
        self._pending_in: dict[str, BlockCopy] = {}
        self._pending_drop: list[str] = []
        # Worker side.
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._host: dict[str, dict[str, torch.Tensor]] = {}
        self.swap_log: dict[str, list[SwapRecord]] = {}

    # ---------------------------------------------------------------- scheduler
    @property
    def free_host_tokens(self) -> int:
        """Host space left, in tokens; `MarsScheduler` reports it to policies."""
        return self.host_capacity_tokens - sum(self._host_tokens.values())

    def holds(self, request_id: str) -> bool:
        return request_id in self._host_tokens

    def request_swap_out(self, request_id: str, block_ids: list[int], num_tokens: int) -> None:
        """Called by `MarsScheduler` when it demotes a paused request to SWAP.

        The caller must keep the blocks allocated until the next step.
        """
        if num_tokens > self.free_host_tokens:
            raise ValueError(
                f"swap of {num_tokens} tokens exceeds free host space {self.free_host_tokens}"
            )
        needed = -(-num_tokens // self._block_size)
        self._pending_out.append(BlockCopy(request_id, tuple(block_ids[:needed]), num_tokens))
        self._host_tokens[request_id] = num_tokens

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        held = self._host_tokens.get(request.request_id, 0)
        # At least one token must be computed to sample the next one.
        loadable = min(held, request.num_tokens - 1)
        return max(0, loadable - num_computed_tokens), False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if num_external_tokens <= 0:
            return
        block_ids = blocks.get_block_ids()[0]
        needed = -(-num_external_tokens // self._block_size)
        self._pending_in[request.request_id] = BlockCopy(
            request.request_id, tuple(block_ids[:needed]), num_external_tokens
        )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = MarsConnectorMetadata(
            swap_out=self._pending_out,
            swap_in=list(self._pending_in.values()),
            drop=self._pending_drop,
        )
        for copy in meta.swap_in:
            self._host_tokens.pop(copy.request_id, None)
        self._pending_out, self._pending_in, self._pending_drop = [], {}, []
        return meta

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        if self._host_tokens.pop(request.request_id, None) is not None:
            self._pending_drop.append(request.request_id)
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
        for copy in meta.swap_out:
            self._copy_out(copy)
        for copy in meta.swap_in:
            self._copy_in(copy)
        for request_id in meta.drop:
            self._host.pop(request_id, None)

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
        saved = {}
        for name, kv in self._kv_caches.items():
            saved[name] = kv.index_select(0, index.to(kv.device)).to("cpu", copy=True)
        self._host[copy.request_id] = saved
        record = SwapRecord(
            request_id=copy.request_id,
            num_blocks=len(copy.block_ids),
            bytes_copied=sum(t.numel() * t.element_size() for t in saved.values()),
            out_digest=self._digest(copy.block_ids),
        )
        self.swap_log.setdefault(copy.request_id, []).append(record)

    def _copy_in(self, copy: BlockCopy) -> None:
        saved = self._host.pop(copy.request_id)
        index = torch.tensor(copy.block_ids, dtype=torch.long)
        for name, kv in self._kv_caches.items():
            source = saved[name][: len(copy.block_ids)]
            kv.index_copy_(0, index.to(kv.device), source.to(kv.device))
        log = self.swap_log[copy.request_id]
        log[-1] = SwapRecord(**{**log[-1].__dict__, "in_digest": self._digest(copy.block_ids)})

    def _digest(self, block_ids: tuple[int, ...]) -> str:
        """SHA-256 over the given blocks of every layer, in layer order."""
        sha = hashlib.sha256()
        index = torch.tensor(block_ids, dtype=torch.long)
        for name in sorted(self._kv_caches):
            kv = self._kv_caches[name]
            blocks = kv.index_select(0, index.to(kv.device)).cpu().contiguous()
            sha.update(blocks.view(torch.uint8).numpy().tobytes())
        return sha.hexdigest()

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
