"""Which blocks of a disk a task reads, which it marks as holes, which it keeps from the base.

Runs are extents of blocks, ``(first block, count)``, in extent lists (engine/datapath/extents.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import msgspec
from blockferry.datapath.extents import Extent, count, intersect, subtract, to_blocks, union
from blockferry.repo.format import DiskRecord

#: an extent of blocks: (first block, count)
Run = Extent


class ReadPlan(msgspec.Struct):
    """What a task does with each block of a disk."""

    nblocks: int
    read: list[Run]  #: blocks to read
    holes: list[Run]  #: blocks to mark as holes without reading (only when starting from a base)
    from_base: bool  #: the map starts as the base's map (else all holes)
    reason: str  #: why the plan is a full or an incremental read, for the session

    @property
    def unchanged_blocks(self) -> int:
        return self.nblocks - count(self.read) - count(self.holes) if self.from_base else 0


def make_plan(
    *,
    size: int,
    block_size: int,
    data: list[Extent] | None,
    hints: list[Extent] | None,
    base: DiskRecord | None,
    base_point: str | None = None,
    must_read: list[Run] | None = None,
) -> ReadPlan:
    """``must_read``: blocks of the base whose chunks have no good copy; an incremental reads
    them whatever the hints say (that heals the repository)."""
    nblocks = -(-size // block_size)
    everything = [(0, nblocks)] if nblocks else []
    data_runs = everything if data is None else to_blocks(data, block_size, nblocks)
    if hints is None:
        return ReadPlan(nblocks, data_runs, [], False, "full read: no changed-extent hints")
    if base is None:
        return ReadPlan(nblocks, data_runs, [], False, "full read: no earlier point of this disk to apply hints to")
    candidates = to_blocks(hints, block_size, nblocks)
    heal = [(s, min(c, nblocks - s)) for s, c in (must_read or []) if s < nblocks]
    if heal:
        candidates = union(candidates, heal)
    if base.size != size:
        # grown: the new tail is read whole; shrunk or grown: the old and new last blocks may be
        # partial, so they are read again too
        old_last = min(base.size, size) // block_size
        candidates = union(candidates, [(old_last, nblocks - old_last)] if old_last < nblocks else [])
    return ReadPlan(
        nblocks,
        intersect(candidates, data_runs),
        subtract(candidates, data_runs),
        True,
        f"incremental: {count(candidates)} of {nblocks} blocks hinted as changed"
        + (f" since point {base_point}" if base_point else "")
        + (f", {count(heal)} read again to heal damaged chunks" if heal else ""),
    )


def batches(runs: list[Run], per_batch: int) -> Iterator[Run]:
    """Runs cut into batches of at most ``per_batch`` consecutive blocks (lazily: a disk of
    millions of blocks never has its batches listed in memory)."""
    for s, c in runs:
        while c > 0:
            k = min(c, per_batch)
            yield (s, k)
            s += k
            c -= k


# ``count`` is the extents' (engine/datapath/extents.py), named here for the source mover
__all__ = ["ReadPlan", "Run", "batches", "count", "make_plan"]
