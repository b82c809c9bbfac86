"""Prefix affinity: which instance last served a prompt that shares the
longest block-aligned prefix with a new one.

A client without a session id still sends each conversation's whole
history every turn; the instance that served the previous turn holds its
KV in its prefix cache. The index maps the chained hash of each full block
of a served prompt to the instance that served it (bounded, least recently
used first out), and a new prompt goes where its longest prefix was.
Pure: no I/O; the placer that owns it feeds it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


def block_hashes(token_ids: Sequence[int], block_size: int) -> tuple[int, ...]:
    """The chained hash of every full block of `token_ids`: the k-th covers
    the first (k + 1) * block_size tokens. Python's hash of a tuple of ints
    is the same in every process (only str and bytes hashes are salted)."""
    hashes = []
    previous = 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        previous = hash((previous, tuple(token_ids[start : start + block_size])))
        hashes.append(previous)
    return tuple(hashes)


class PrefixIndex:
    """Block-chain hash -> instance, for at most `capacity` hashes."""

    def __init__(self, capacity: int = 200_000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._capacity = capacity
        self._where: OrderedDict[int, str] = OrderedDict()

    def longest(self, hashes: Sequence[int]) -> tuple[str | None, int]:
        """(instance, matched blocks) of the longest indexed prefix."""
        for i in range(len(hashes) - 1, -1, -1):
            instance = self._where.get(hashes[i])
            if instance is not None:
                self._where.move_to_end(hashes[i])
                return instance, i + 1
        return None, 0

    def record(self, hashes: Sequence[int], instance_id: str) -> None:
        """`instance_id` now holds the prompt whose blocks hash to `hashes`."""
        for value in hashes:
            self._where[value] = instance_id
            self._where.move_to_end(value)
        while len(self._where) > self._capacity:
            self._where.popitem(last=False)

    def forget_instance(self, instance_id: str) -> None:
        """An instance that restarted lost its cache."""
        for key in [k for k, v in self._where.items() if v == instance_id]:
            del self._where[key]

    def __len__(self) -> int:
        return len(self._where)
