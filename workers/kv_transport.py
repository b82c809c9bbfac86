"""A paused session's KV off its engine, and back onto another one.

`MarsEngine.export_session` reads a paused session's KV (the blocks it holds
while preserved, its host copy once swapped) into a `SessionKv`; the value
travels between engine processes as any Ray argument does (through Ray's
object store between nodes); `MarsEngine.import_session` on the destination
holds it as a host copy under the session id, so that the session's next
turn there loads it through `MarsKVConnector` as it would load a swap,
instead of recomputing it. The source keeps its copy until the caller
commits the move (`MarsEngine.release_session`).

The worker-side steps run through vLLM's `collective_rpc`, once per worker
rank: each rank reads and writes its own shard of the KV (one shard on a
single-device engine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from workers.kv_connector import HostSegment


@dataclass(frozen=True)
class ParkedState:
    """What the source engine's scheduler knew of the paused session, so
    that the destination ranks it as the source would have."""

    tool: str | None
    predicted_api_s: float | None
    paused_for_s: float
    """Seconds the session had waited on its call when it left."""
    predicted_decode_tokens: int
    predicted_return_tokens: int
    turns: int


@dataclass(frozen=True)
class SessionKv:
    """A paused session's KV between two engines."""

    session_id: str
    token_ids: tuple[int, ...]
    """The context tokens whose KV the source had computed (the first
    `len(token_ids)` of the session's context): carried in `shards`, or
    to be recomputed."""
    block_size: int
    shards: list[dict[str, torch.Tensor]] | None
    """Per worker rank, each layer's blocks `[blocks, ...]` on host; None
    when the source kept no KV for the session (discarded): the
    destination recomputes it."""
    state: ParkedState

    @property
    def num_blocks(self) -> int:
        return -(-len(self.token_ids) // self.block_size)

    @property
    def nbytes(self) -> int:
        if self.shards is None:
            return 0
        return sum(t.numel() * t.element_size() for shard in self.shards for t in shard.values())


@dataclass(frozen=True)
class RunningKv:
    """One stage of a running request's KV (`MarsEngine.running_kv`): its
    blocks `first_block` to `first_block + num_blocks - 1`, read while it
    decodes (finished blocks only) or once it stopped (all of them)."""

    request_id: str
    token_ids: tuple[int, ...]
    """The request's tokens when the stage was read (prompt and generated)."""
    computed_tokens: int
    """Tokens whose KV the request had computed then."""
    first_block: int
    num_blocks: int
    shards: list[dict[str, torch.Tensor]] | None
    """Per worker rank, each layer's blocks; None when nothing was copied."""

    @property
    def nbytes(self) -> int:
        if self.shards is None:
            return 0
        return sum(t.numel() * t.element_size() for shard in self.shards for t in shard.values())


def stage_segments(stages: list[RunningKv]) -> list[list[HostSegment]] | None:
    """The KV of a request moved in `stages` (in order, each starting where
    the previous ended, the last read once it stopped), per worker rank as
    host-copy segments, one per stage that carried KV: not joined, since
    that would copy the whole context while the request is stopped. None
    when no stage carried any. ValueError when a stage is missing."""
    from workers.kv_connector import HostSegment

    copied = [stage for stage in stages if stage.shards is not None]
    expected = 0
    for stage in copied:
        if stage.first_block != expected:
            raise ValueError(
                f"stage of request {stage.request_id} starts at block {stage.first_block}, "
                f"expected {expected}: a stage is missing"
            )
        expected += stage.num_blocks
    if not copied:
        return None
    return [
        [HostSegment(stage.first_block, stage.shards[rank]) for stage in copied]
        for rank in range(len(copied[0].shards))
    ]


def read_device_blocks(worker: object, block_ids: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """On a worker (`collective_rpc`): host copies of its shard of the blocks."""
    return _connector().read_blocks(block_ids)


def read_host_copy(worker: object, key: str) -> dict[str, torch.Tensor]:
    """On a worker (`collective_rpc`): its shard of a swapped session's host copy."""
    return _connector().read_host_copy(key)


def write_host_copy(
    worker: object, key: str, shards: list[list[HostSegment]], num_blocks: int
) -> None:
    """On a worker (`collective_rpc`, which hands it vLLM's worker wrapper):
    hold its rank's shard, in segments, as the host copy."""
    _connector().write_host_copy(key, shards[worker.rpc_rank], num_blocks)


def write_device_blocks(
    worker: object, block_ids: list[int], shards: list[dict[str, torch.Tensor]]
) -> None:
    """On a worker (`collective_rpc`): write its rank's shard of a stage
    into the device blocks the scheduler holds for it."""
    _connector().write_blocks(block_ids, shards[worker.rpc_rank])


def _connector():
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group()
