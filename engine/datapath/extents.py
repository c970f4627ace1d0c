"""Extents: ``(start, length)`` pairs, of bytes (hints, a source's data extents, damaged ranges) or
of blocks (read plans, the runs of a restore), and the one set of interval arithmetic on them.

An *extent list* is sorted, with no two extents overlapping or touching and none empty: what
:func:`merge` makes of any extents, and what every function here takes and returns (except
:func:`merge`, which takes any).
"""

from __future__ import annotations

from collections.abc import Iterable

Extent = tuple[int, int]  #: (start, length)


def merge(extents: Iterable[Extent]) -> list[Extent]:
    """An extent list of ``extents`` (in any order, overlapping or not): empty ones dropped,
    overlapping and touching ones joined."""
    out: list[Extent] = []
    for start, n in sorted(e for e in extents if e[1] > 0):
        if out and start <= out[-1][0] + out[-1][1]:
            first, length = out[-1]
            out[-1] = (first, max(length, start + n - first))
        else:
            out.append((start, n))
    return out


def union(x: list[Extent], y: list[Extent]) -> list[Extent]:
    return merge([*x, *y])


def intersect(x: list[Extent], y: list[Extent]) -> list[Extent]:
    out: list[Extent] = []
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


def subtract(x: list[Extent], y: list[Extent]) -> list[Extent]:
    """What ``x`` covers and ``y`` does not."""
    out: list[Extent] = []
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


def count(extents: Iterable[Extent]) -> int:
    """The bytes (or blocks) an extent list covers."""
    return sum(c for _, c in extents)


def to_blocks(extents: Iterable[Extent], block_size: int, nblocks: int) -> list[Extent]:
    """The extent list of the blocks (of ``block_size`` bytes, the first ``nblocks``) that byte
    ``extents`` touch."""
    blocks = []
    for off, n in extents:
        a = off // block_size
        b = min(nblocks, -(-(off + n) // block_size))
        if n > 0 and a < b:
            blocks.append((a, b - a))
    return merge(blocks)


__all__ = ["Extent", "count", "intersect", "merge", "subtract", "to_blocks", "union"]
