"""Read plans (engine/datapath/plan.py): batching, and make_plan's full and incremental cases
(the run arithmetic is tested in test_extents.py)."""

from __future__ import annotations

import inspect

import pytest
from blockferry.datapath.extents import count, union
from blockferry.datapath.plan import Run, batches, make_plan
from blockferry.repo.format import DIGEST_SIZE, HOLE, DiskRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.engine.datapath.test_extents import BS, assert_canonical, blocks_of, byte_extents, runs_st


@settings(max_examples=200, deadline=None)
@given(runs_st, st.integers(1, 9))
def test_batches_bounded_and_cover_runs_in_order(runs: list[Run], per_batch: int) -> None:
    out = list(batches(runs, per_batch))
    for s, c in out:
        assert 1 <= c <= per_batch
    # concatenating the batches' blocks gives the runs' blocks in order, each once
    flat = [b for s, c in out for b in range(s, s + c)]
    assert flat == [b for s, c in runs for b in range(s, s + c)]
    # no batch spans two runs
    for s, c in out:
        assert any(rs <= s and s + c <= rs + rc for rs, rc in runs)


def test_batches_is_lazy() -> None:
    gen = batches([(0, 10**12)], 4)
    assert inspect.isgenerator(gen)
    assert next(gen) == (0, 4)
    assert next(gen) == (4, 4)


def test_batches_examples() -> None:
    assert list(batches([(0, 5), (10, 2)], 2)) == [(0, 2), (2, 2), (4, 1), (10, 2)]
    assert list(batches([], 3)) == []


# -- make_plan -------------------------------------------------------------------------------------

B = 256 << 10  # block size


def base_disk(size: int, block_size: int = B) -> DiskRecord:
    n = -(-size // block_size)
    return DiskRecord(name="sda", size=size, source="/vm/sda.img", blocks=b"\x11" * DIGEST_SIZE * n)


def test_base_helper_is_consistent() -> None:
    d = base_disk(10 * B + 1)
    assert len(d.blocks) == d.block_count(B) * DIGEST_SIZE == 11 * DIGEST_SIZE
    assert d.blocks[:DIGEST_SIZE] != HOLE


def test_no_hints_reads_data_blocks_only() -> None:
    data = [(0, 100), (3 * B + 5, B), (9 * B, 10)]
    plan = make_plan(size=10 * B, block_size=B, data=data, hints=None, base=base_disk(10 * B), base_point="p1")
    assert plan.nblocks == 10
    assert plan.read == [(0, 1), (3, 2), (9, 1)]
    assert plan.holes == []
    assert plan.from_base is False
    assert plan.unchanged_blocks == 0
    assert plan.reason.startswith("full read")
    assert "hint" in plan.reason


def test_unknown_data_extents_read_everything() -> None:
    plan = make_plan(size=10 * B + 7, block_size=B, data=None, hints=None, base=None)
    assert plan.nblocks == 11
    assert plan.read == [(0, 11)]
    assert plan.holes == []
    assert plan.from_base is False


def test_empty_disk() -> None:
    plan = make_plan(size=0, block_size=B, data=None, hints=None, base=None)
    assert plan.nblocks == 0 and plan.read == [] and plan.holes == []


def test_hints_without_base_is_a_full_read_saying_why() -> None:
    data = [(0, 2 * B), (5 * B, B)]
    plan = make_plan(size=8 * B, block_size=B, data=data, hints=[(0, 10)], base=None)
    assert plan.read == [(0, 2), (5, 1)]  # the data, not just the hinted block
    assert plan.holes == []
    assert plan.from_base is False
    assert plan.unchanged_blocks == 0
    assert plan.reason.startswith("full read")
    assert "no earlier point" in plan.reason


def test_hints_with_base_same_size() -> None:
    size = 16 * B
    data = [(0, 4 * B), (8 * B, 4 * B)]  # blocks 0-3 and 8-11 hold data
    hints = [(B + 1, 1), (3 * B, 2 * B), (10 * B, B), (14 * B, 2 * B)]  # blocks 1, 3-4, 10, 14-15
    plan = make_plan(size=size, block_size=B, data=data, hints=hints, base=base_disk(size), base_point="ab12cd34")
    assert plan.nblocks == 16
    assert plan.from_base is True
    assert plan.read == [(1, 1), (3, 1), (10, 1)]  # hinted and holding data
    assert plan.holes == [(4, 1), (14, 2)]  # hinted but now without data: zeros
    assert plan.unchanged_blocks == 16 - 3 - 3
    assert plan.reason.startswith("incremental")
    assert "ab12cd34" in plan.reason
    assert "6 of 16" in plan.reason


def test_hints_with_base_and_unknown_data_extents() -> None:
    size = 8 * B
    plan = make_plan(size=size, block_size=B, data=None, hints=[(2 * B, 2 * B)], base=base_disk(size))
    assert plan.read == [(2, 2)]
    assert plan.holes == []
    assert plan.from_base is True
    assert plan.unchanged_blocks == 6


def test_empty_hints_with_base_reads_nothing() -> None:
    size = 8 * B
    plan = make_plan(size=size, block_size=B, data=[(0, size)], hints=[], base=base_disk(size), base_point="p")
    assert plan.read == [] and plan.holes == []
    assert plan.from_base is True
    assert plan.unchanged_blocks == 8


@pytest.mark.parametrize("old_size,old_last", [(10 * B, 10), (10 * B - B // 2, 9), (1, 0)])
def test_disk_grew_reads_from_old_last_block_to_the_end(old_size: int, old_last: int) -> None:
    size = 14 * B
    data = [(0, size)]
    plan = make_plan(size=size, block_size=B, data=data, hints=[(0, 1)], base=base_disk(old_size), base_point="p0")
    assert plan.from_base is True
    assert plan.read == union([(0, 1)], [(old_last, 14 - old_last)])
    assert blocks_of(plan.read) >= set(range(old_last, 14))
    assert plan.holes == []
    assert plan.unchanged_blocks == 14 - count(plan.read)


def test_disk_grew_new_tail_without_data_becomes_holes() -> None:
    size = 14 * B
    data = [(0, 10 * B + 10)]  # data up to the start of block 10; blocks 11-13 sparse
    plan = make_plan(size=size, block_size=B, data=data, hints=[], base=base_disk(10 * B + 10), base_point="p0")
    assert plan.read == [(10, 1)]
    assert plan.holes == [(11, 3)]
    assert plan.unchanged_blocks == 10


@pytest.mark.parametrize("new_size,last", [(6 * B + 7, 6), (B // 2, 0), (10 * B - 1, 9)])
def test_disk_shrank_reads_the_new_last_block(new_size: int, last: int) -> None:
    plan = make_plan(size=new_size, block_size=B, data=None, hints=[], base=base_disk(12 * B + 3), base_point="p0")
    assert plan.nblocks == last + 1
    assert plan.from_base is True
    assert plan.read == [(last, 1)]
    assert plan.unchanged_blocks == last


def test_disk_shrank_hints_beyond_the_new_end_are_clipped() -> None:
    size = 6 * B + 7
    plan = make_plan(size=size, block_size=B, data=None, hints=[(B, B), (9 * B, B)], base=base_disk(12 * B))
    assert plan.read == [(1, 1), (6, 1)]
    assert all(s + c <= plan.nblocks for s, c in plan.read + plan.holes)


@settings(max_examples=150, deadline=None)
@given(
    size=st.integers(0, 40 * BS),
    base_size=st.one_of(st.none(), st.integers(0, 40 * BS)),
    data=st.one_of(st.none(), byte_extents()),
    hints=st.one_of(st.none(), byte_extents()),
)
def test_make_plan_model(size: int, base_size: int | None, data: list[tuple[int, int]] | None,
                         hints: list[tuple[int, int]] | None) -> None:
    base = base_disk(base_size, BS) if base_size is not None else None
    plan = make_plan(size=size, block_size=BS, data=data, hints=hints, base=base, base_point="pp")
    n = -(-size // BS)
    assert plan.nblocks == n
    all_blocks = set(range(n))
    data_blocks = all_blocks if data is None else {x // BS for off, ln in data for x in range(off, off + ln)} & all_blocks
    read, holes = blocks_of(plan.read), blocks_of(plan.holes)
    assert_canonical(plan.read)
    assert_canonical(plan.holes)
    assert not read & holes
    if hints is None or base is None:
        assert plan.from_base is False
        assert read == data_blocks and holes == set()
        assert plan.unchanged_blocks == 0
        return
    changed = {x // BS for off, ln in hints for x in range(off, off + ln)} & all_blocks
    if base.size != size:
        changed |= set(range(min(base.size, size) // BS, n))
    assert plan.from_base is True
    assert read == changed & data_blocks
    assert holes == changed - data_blocks
    assert plan.unchanged_blocks == n - len(changed)
    assert "pp" in plan.reason
