"""Prefix affinity's index: longest block-aligned prefix wins, bounded."""

from __future__ import annotations

import pytest

from policies import PrefixIndex, block_hashes


def test_block_hashes_chain_full_blocks_only() -> None:
    a = block_hashes(list(range(100)), 32)
    assert len(a) == 3  # 96 tokens in full blocks; the last 4 are not hashed
    assert block_hashes(list(range(64)), 32) == a[:2]  # a prefix hashes as a prefix
    assert block_hashes([*range(32), 99, *range(33, 64)], 32)[1] != a[1]


def test_the_longest_indexed_prefix_wins() -> None:
    index = PrefixIndex()
    system = list(range(64))
    index.record(block_hashes(system, 32), "i0")
    conversation = [*system, *range(500, 600)]
    index.record(block_hashes(conversation, 32), "i1")
    assert index.longest(block_hashes([*conversation, 7, 8, 9], 32)) == ("i1", 5)
    assert index.longest(block_hashes([*system, *range(900, 950)], 32)) == ("i1", 2)
    assert index.longest(block_hashes(list(range(1000, 1100)), 32)) == (None, 0)


def test_the_index_is_bounded_and_forgets_restarted_instances() -> None:
    index = PrefixIndex(capacity=4)
    index.record(block_hashes(list(range(320)), 32), "i0")
    assert len(index) == 4
    index.forget_instance("i0")
    assert len(index) == 0
    with pytest.raises(ValueError, match="capacity"):
        PrefixIndex(capacity=0)
