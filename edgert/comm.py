"""Communicators: how the partial sums of a sharded forward meet.

The forward calls `comm.allreduce(x)` after attention and after the FFN of every layer.
`Identity` is one device; `LocalGroup` runs several shards as threads of one process
(the in-process stand-in for the star allreduce of cluster mode, used to test sharding).
"""

from __future__ import annotations

import threading

import numpy as np


class Identity:
    """One device: the sum over one shard is the shard's output."""

    def allreduce(self, x: np.ndarray) -> np.ndarray:
        return x


class LocalGroup:
    """n shards in n threads; `member(i)` is shard i's communicator.

    Each allreduce sums the members' arrays in member order (so every member gets the same
    bits) and writes the sum back into each member's array in place.
    """

    def __init__(self, n: int):
        self.n = n
        self._parts: list[np.ndarray | None] = [None] * n
        self._gathered = threading.Barrier(n)
        self._done = threading.Barrier(n)

    def member(self, i: int) -> _Member:
        return _Member(self, i)

    def abort(self) -> None:
        """A member failed: the others, waiting in an allreduce, raise BrokenBarrierError. The
        group is done then (its barriers stay broken)."""
        self._gathered.abort()
        self._done.abort()

    def _allreduce(self, i: int, x: np.ndarray) -> np.ndarray:
        self._parts[i] = x
        self._gathered.wait()
        total = self._parts[0].copy()
        for p in self._parts[1:]:
            total += p
        self._done.wait()  # everyone has read every part before anyone overwrites its own
        x[...] = total
        return x


class _Member:
    def __init__(self, group: LocalGroup, i: int):
        self.group, self.i = group, i

    def allreduce(self, x: np.ndarray) -> np.ndarray:
        return self.group._allreduce(self.i, x)
