"""`MarsKVConnector`'s scheduler-side bookkeeping against its worker side,
step by step, without an engine: what one step's metadata makes the worker
hold must be what the scheduler side believes it holds."""

from __future__ import annotations

import pytest
import torch

from workers.kv_connector import MarsConnectorMetadata, MarsKVConnector

BLOCK = 32


@pytest.fixture
def connector() -> MarsKVConnector:
    """Both sides of one connector (as on a single-process engine), on a KV
    cache of 8 blocks of one layer."""
    c = object.__new__(MarsKVConnector)  # no vLLM config: only the bookkeeping runs
    c._block_size, c.host_capacity_tokens, c._record_digests = BLOCK, 10 * BLOCK, False
    c._host_copies, c._pending_out, c._pending_in, c._pending_drop = {}, [], [], []
    c._matches, c._host, c.swap_log, c._load_errors = {}, {}, {}, set()
    c._connector_metadata = None
    c._kv_caches = {"layer": torch.arange(8 * BLOCK, dtype=torch.float32).reshape(8, BLOCK)}
    return c


def _step(c: MarsKVConnector) -> None:
    """One engine step: the scheduler side's metadata, run by the worker side."""
    c.bind_connector_metadata(c.build_connector_meta(None))
    c.start_load_kv(None)
    c.clear_connector_metadata()


def test_a_new_swap_out_survives_the_drop_of_the_old_copy_in_the_same_step(connector) -> None:
    """A session's host copy is dropped unloaded (its turn found the context
    in the prefix cache), the turn ends within the step and its new park is
    swapped out at the next: the drop must not take the new copy."""
    tokens = tuple(range(2 * BLOCK))
    connector.request_swap_out("s", [0, 1], tokens)
    _step(connector)
    assert "s" in connector._host
    connector.drop("s")  # the old copy: not needed by the turn
    connector.request_swap_out("s", [2, 3], tokens)  # the new park, in the same step
    _step(connector)
    assert connector.holds("s") and "s" in connector._host
    assert torch.equal(connector.read_host_copy("s")["layer"], connector._kv_caches["layer"][2:4])


def test_a_swap_cancelled_in_its_own_step_leaves_nothing_on_either_side(connector) -> None:
    connector.request_swap_out("s", [0], tuple(range(BLOCK)))
    connector.drop("s")
    _step(connector)
    assert not connector.holds("s") and "s" not in connector._host


def test_a_host_copy_in_segments_loads_the_blocks_past_the_cached_prefix(connector) -> None:
    """A moved request's stages stay separate host segments (joining them
    would copy the whole context while it is stopped); a load that starts
    past the prefix the device already holds reads across their border."""
    from workers.kv_connector import BlockCopy, HostSegment

    stages = [
        HostSegment(0, {"layer": torch.full((2, BLOCK), 1.0)}),
        HostSegment(2, {"layer": torch.full((3, BLOCK), 2.0)}),
    ]
    with pytest.raises(ValueError, match="skips from block 2 to 3"):
        connector.write_host_copy("m", [stages[0], HostSegment(3, stages[1].layers)], 5)
    with pytest.raises(ValueError, match="has 5 blocks, expected 6"):
        connector.write_host_copy("m", stages, 6)
    connector.write_host_copy("m", stages, 5)
    joined = connector.read_host_copy("m")["layer"][:, 0]
    assert torch.equal(joined, torch.tensor([1, 1, 2, 2, 2.0]))
    connector._connector_metadata = MarsConnectorMetadata(copy_in=[BlockCopy("m", (6, 7, 0), 1)])
    connector.start_load_kv(None)
    loaded = connector._kv_caches["layer"][[6, 7, 0], 0]
    assert torch.equal(loaded, torch.tensor([1.0, 2.0, 2.0])) and "m" not in connector._host
