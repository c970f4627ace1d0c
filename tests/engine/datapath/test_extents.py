"""Extent lists (engine/datapath/extents.py): merge, union, intersect, subtract, count and
to_blocks against a set-of-units model, with hypothesis."""

from __future__ import annotations

from collections.abc import Iterable

from blockferry.datapath.extents import count, intersect, merge, subtract, to_blocks, union
from hypothesis import given, settings
from hypothesis import strategies as st

Run = tuple[int, int]
N = 64  # blocks in the model universe
BS = 16  # a small block size for the byte-level properties


# -- model ---------------------------------------------------------------------------------------


def blocks_of(runs: Iterable[Run]) -> set[int]:
    return {b for s, c in runs for b in range(s, s + c)}


def runs_from(blocks: set[int]) -> list[Run]:
    """The canonical runs of a set: sorted, disjoint, maximal."""
    out: list[Run] = []
    for b in sorted(blocks):
        if out and out[-1][0] + out[-1][1] == b:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


def assert_canonical(runs: list[Run]) -> None:
    for s, c in runs:
        assert s >= 0 and c > 0
    for (a, n), (b, _) in zip(runs, runs[1:]):
        assert a + n <= b


block_sets = st.sets(st.integers(0, N - 1), max_size=N)
runs_st = block_sets.map(runs_from)


def byte_extents() -> st.SearchStrategy[list[tuple[int, int]]]:
    """Sorted byte extents, possibly overlapping, touching or running past the disk's end (as
    data extents and merged hints are: sorted by offset)."""
    return st.lists(st.tuples(st.integers(0, N * BS + 3 * BS), st.integers(0, 5 * BS)), max_size=10).map(sorted)


# -- run arithmetic ------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(byte_extents(), st.integers(0, N))
def test_to_blocks_matches_model(extents: list[tuple[int, int]], nblocks: int) -> None:
    out = to_blocks(extents, BS, nblocks)
    expected = {b for off, n in extents for x in range(off, off + n) if (b := x // BS) < nblocks}
    assert blocks_of(out) == expected
    assert out == runs_from(expected)  # merged into maximal runs


def test_to_blocks_examples() -> None:
    assert to_blocks([(0, 1)], 100, 10) == [(0, 1)]
    assert to_blocks([(99, 2)], 100, 10) == [(0, 2)]  # straddles a boundary
    assert to_blocks([(100, 100), (200, 50)], 100, 10) == [(1, 2)]  # adjacent blocks merged
    assert to_blocks([(950, 500)], 100, 10) == [(9, 1)]  # clipped at the end of the disk
    assert to_blocks([(1000, 5)], 100, 10) == []  # wholly beyond
    assert to_blocks([(10, 0)], 100, 10) == []  # zero length


@settings(max_examples=200, deadline=None)
@given(runs_st, runs_st)
def test_union_matches_model(x: list[Run], y: list[Run]) -> None:
    out = union(x, y)
    assert blocks_of(out) == blocks_of(x) | blocks_of(y)
    assert out == runs_from(blocks_of(out))


@settings(max_examples=200, deadline=None)
@given(runs_st, runs_st)
def test_intersect_matches_model(x: list[Run], y: list[Run]) -> None:
    out = intersect(x, y)
    assert blocks_of(out) == blocks_of(x) & blocks_of(y)
    assert_canonical(out)


@settings(max_examples=200, deadline=None)
@given(runs_st, runs_st)
def test_subtract_matches_model(x: list[Run], y: list[Run]) -> None:
    out = subtract(x, y)
    assert blocks_of(out) == blocks_of(x) - blocks_of(y)
    assert_canonical(out)


@settings(max_examples=100, deadline=None)
@given(runs_st)
def test_count_matches_model(x: list[Run]) -> None:
    assert count(x) == len(blocks_of(x))


def test_run_arithmetic_examples() -> None:
    assert union([(0, 2)], [(2, 3)]) == [(0, 5)]
    assert union([], []) == []
    assert intersect([(0, 10)], [(2, 2), (5, 1), (9, 5)]) == [(2, 2), (5, 1), (9, 1)]
    assert intersect([(0, 10)], []) == []
    assert subtract([(0, 10)], [(2, 2), (5, 1), (9, 5)]) == [(0, 2), (4, 1), (6, 3)]
    assert subtract([(0, 3), (5, 3)], [(1, 6)]) == [(0, 1), (7, 1)]
    assert subtract([(0, 4)], []) == [(0, 4)]
    assert count([(0, 4), (10, 1)]) == 5
    assert count([]) == 0


# -- merge ---------------------------------------------------------------------------------------

extents_st = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 12)), max_size=12)


@settings(max_examples=300, deadline=None)
@given(extents_st)
def test_merge_property(extents: list[tuple[int, int]]) -> None:
    out = merge(extents)
    assert blocks_of(out) == blocks_of(extents)
    for off, n in out:
        assert off >= 0 and n > 0
    for (a, n), (b, _) in zip(out, out[1:]):
        assert a + n < b  # sorted, disjoint and not adjacent


def test_merge_contained_and_duplicate_extents() -> None:
    assert merge([(0, 100), (10, 10), (0, 100), (50, 50)]) == [(0, 100)]
    assert merge([(5, 1), (4, 1), (3, 1)]) == [(3, 3)]
    assert merge([(0, 0), (7, 0)]) == []
    assert merge([]) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, N * BS), st.integers(0, 5 * BS)), max_size=10), st.integers(0, N))
def test_to_blocks_takes_extents_in_any_order(extents: list[tuple[int, int]], nblocks: int) -> None:
    assert to_blocks(extents, BS, nblocks) == to_blocks(sorted(extents), BS, nblocks)
    assert_canonical(to_blocks(extents, BS, nblocks))


@settings(max_examples=200, deadline=None)
@given(extents_st)
def test_merge_is_idempotent_and_the_identity_of_union(extents: list[tuple[int, int]]) -> None:
    once = merge(extents)
    assert merge(once) == once
    assert union(once, []) == once == union([], once)
    assert subtract(once, once) == [] and intersect(once, once) == once
