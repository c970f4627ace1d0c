"""Which blocks of a disk a task reads, which it marks as holes, which it keeps from the base.

Runs are ``(first block, count)`` pairs, sorted and disjoint.
"""

from __future__ import annotations

from collections.abc import Iterator

import msgspec
from blockferry.repo.format import DiskRecord

Run = tuple[int, int]
Extent = tuple[int, int]


def runs_of(extents: list[Extent], block_size: int, nblocks: int) -> list[Run]:
    """The blocks that byte extents touch, merged into runs."""
    out: list[Run] = []
    for off, n in extents:
        if n <= 0:
            continue
        a = off // block_size
        b = min(nblocks, -(-(off + n) // block_size))
        if a >= b:
            continue
        if out and a <= out[-1][0] + out[-1][1]:
            s, c = out[-1]
            out[-1] = (s, max(c, b - s))
        else:
            out.append((a, b - a))
    return out


def union(x: list[Run], y: list[Run]) -> list[Run]:
    out: list[Run] = []
    for s, c in sorted(x + y):
        if out and s <= out[-1][0] + out[-1][1]:
            ps, pc = out[-1]
            out[-1] = (ps, max(pc, s + c - ps))
        else:
            out.append((s, c))
    return out


def intersect(x: list[Run], y: list[Run]) -> list[Run]:
    out: list[Run] = []
    i = j = 0
    while i < len(x) and j < len(y):
        a = max(x[i][0], y[j][0])
        b = min(x[i][0] + x[i][1], y[j][0] + y[j][1])
        if a < b:
            out.append((a, b - a))
        if x[i][0] + x[i][1] < y[j][0] + y[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(x: list[Run], y: list[Run]) -> list[Run]:
    out: list[Run] = []
    j = 0
    for s, c in x:
        cur, end = s, s + c
        while j < len(y) and y[j][0] + y[j][1] <= cur:
            j += 1
        k = j
        while k < len(y) and y[k][0] < end:
            if y[k][0] > cur:
                out.append((cur, y[k][0] - cur))
            cur = max(cur, y[k][0] + y[k][1])
            k += 1
        if cur < end:
            out.append((cur, end - cur))
    return out


def count(runs: list[Run]) -> int:
    return sum(c for _, c in runs)


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
    data_runs = everything if data is None else runs_of(data, block_size, nblocks)
    if hints is None:
        return ReadPlan(nblocks, data_runs, [], False, "full read: no changed-extent hints")
    if base is None:
        return ReadPlan(nblocks, data_runs, [], False, "full read: no earlier point of this disk to apply hints to")
    candidates = runs_of(hints, block_size, nblocks)
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
