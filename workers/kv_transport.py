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


def session_kv_from_stages(
    key: str, stages: list[RunningKv], block_size: int, state: ParkedState
) -> SessionKv:
    """The KV of a request moved in `stages` (in order, each starting where
    the previous ended, the last read once it stopped), as one `SessionKv`
    under `key`: what the destination imports before continuing it."""
    import torch

    copied = [stage for stage in stages if stage.shards is not None]
    expected = 0
    for stage in copied:
        if stage.first_block != expected:
            raise ValueError(
                f"stage of request {stage.request_id} starts at block {stage.first_block}, "
                f"expected {expected}: a stage is missing"
            )
        expected += stage.num_blocks
    last = stages[-1]
    ranks = len(copied[0].shards) if copied else 0
    shards = [
        {
            name: torch.cat([stage.shards[rank][name] for stage in copied])
            for name in copied[0].shards[rank]
        }
        for rank in range(ranks)
    ]
    return SessionKv(
        session_id=key,
        token_ids=last.token_ids[: last.computed_tokens],
        block_size=block_size,
        shards=shards or None,
        state=state,
    )


def read_device_blocks(worker: object, block_ids: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """On a worker (`collective_rpc`): host copies of its shard of the blocks."""
    return _connector().read_blocks(block_ids)


def read_host_copy(worker: object, key: str) -> dict[str, torch.Tensor]:
    """On a worker (`collective_rpc`): its shard of a swapped session's host copy."""
    return _connector().read_host_copy(key)


def write_host_copy(
    worker: object, key: str, shards: list[dict[str, torch.Tensor]], num_blocks: int
) -> None:
    """On a worker (`collective_rpc`, which hands it vLLM's worker wrapper):
    hold its rank's shard as the host copy."""
    _connector().write_host_copy(key, shards[worker.rpc_rank], num_blocks)


def _connector():
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group()
