"""Remote restores read pack spans planned over the whole point (engine/restore/files.py _SpanReader)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import blockferry
import pytest
from blockferry.restore.files import _SpanReader, _Spool, restore_disks

from tests.conftest import mixed_disk, same_file

pytestmark = pytest.mark.anyio

MiB = 1 << 20


class CountingBackend:
    """Packs of predictable bytes; counts the requests."""

    def __init__(self) -> None:
        self.gets: list[tuple[str, int, int]] = []
        self.ranged: list[tuple[str, list[tuple[int, int]]]] = []

    @staticmethod
    def body(key: str, off: int, n: int) -> bytes:
        return bytes((hash(key) + i) % 251 for i in range(off, off + n))

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        assert length is not None
        self.gets.append((key, offset, length))
        await anyio.sleep(0)
        return self.body(key, offset, length)

    async def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        self.ranged.append((key, list(ranges)))
        return [self.body(key, o, n) for o, n in ranges]


def planned(backend: CountingBackend, batches: list[dict[str, list[tuple[int, int]]]], budget: int,
            gap: int, **kw: Any) -> _SpanReader:
    reader = _SpanReader(backend, budget, gap, piece=MiB, **kw)
    for batch in batches:
        for key, ranges in batch.items():
            for off, n in ranges:
                reader.add(key, off, off + n)
    for b, batch in enumerate(batches):
        for key, ranges in batch.items():
            reader.count(key, ranges, b)
    reader.plan_spool()
    return reader


async def read_all(reader: _SpanReader, backend: CountingBackend,
                   batches: list[dict[str, list[tuple[int, int]]]], *, prefetch: bool) -> None:
    async def batches_in_order() -> None:
        for batch in batches:
            for key, ranges in batch.items():
                got = await reader.read(key, ranges)
                assert [bytes(g) for g in got] == [backend.body(key, o, n) for o, n in ranges]

    async with anyio.create_task_group() as tg:
        if prefetch:
            tg.start_soon(reader.prefetch, 2)
        await batches_in_order()
        tg.cancel_scope.cancel()


# a pack needed by three batches, out of order and with small gaps, and a second pack
BATCHES = [
    {"p1": [(0, 100), (300, 50)], "p2": [(1000, 10)]},
    {"p1": [(150, 100)]},
    {"p1": [(120, 20), (400, 100)], "p2": [(5000, 10)]},
]


@pytest.mark.parametrize("prefetch", [False, True])
async def test_a_dense_pack_is_one_request_shared_by_its_batches(prefetch: bool) -> None:
    backend = CountingBackend()
    reader = planned(backend, BATCHES, budget=10 * MiB, gap=64)
    assert reader.spans["p1"] == [[0, 500]]
    assert reader.spans["p2"] == [[1000, 1010], [5000, 5010]]  # a gap past the tolerance: two spans
    await read_all(reader, backend, BATCHES, prefetch=prefetch)
    assert sorted(backend.gets) == [("p1", 0, 500), ("p2", 1000, 10), ("p2", 5000, 10)]
    assert backend.ranged == []
    assert reader.held == {} and reader.held_bytes == 0 and reader.users == {}  # all let go


async def test_without_room_a_batch_reads_its_own_ranges() -> None:
    backend = CountingBackend()
    reader = planned(backend, BATCHES, budget=100, gap=64)  # p1's span (500 bytes) never fits
    await read_all(reader, backend, BATCHES, prefetch=False)
    assert [k for k, *_ in backend.gets] == ["p2", "p2"]
    assert [k for k, _ in backend.ranged] == ["p1", "p1", "p1"]
    assert reader.held_bytes == 0


async def test_spans_merge_when_added_out_of_order() -> None:
    reader = _SpanReader(CountingBackend(), MiB, 10)
    for off, end in [(100, 110), (0, 10), (50, 60), (15, 20), (200, 210), (35, 45)]:
        reader.add("p", off, end)
    assert reader.spans["p"] == [[0, 20], [35, 60], [100, 110], [200, 210]]
    reader.add("p", 25, 30)
    assert reader.spans["p"] == [[0, 60], [100, 110], [200, 210]]


async def test_spans_stay_pieces_and_never_overlap() -> None:
    reader = _SpanReader(CountingBackend(), 4 * MiB, MiB, piece=MiB)
    reader.add("p", 0, 600 * 1024)
    reader.add("p", 600 * 1024, 1200 * 1024)  # adjacent, but the span would pass a piece: a new one
    reader.add("p", 1100 * 1024, 1300 * 1024)  # overlaps the second (a chunk coalesced differently)
    reader.add("p", 500 * 1024, 700 * 1024)  # out of order, overlapping both
    spans = reader.spans["p"]
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:]))
    for off, end in [(0, 600 * 1024), (600 * 1024, 1200 * 1024), (1100 * 1024, 1300 * 1024), (500 * 1024, 700 * 1024)]:
        assert any(s <= off and end <= e for s, e in spans)


def late_around_near(near: int) -> list[dict[str, list[tuple[int, int]]]]:
    """A 250-byte span "late" (a later point's pack) needed by the first batch and the last,
    and ``near`` 200-byte spans between, each needed by its own batch."""
    return [{"late": [(0, 100)]}, *({f"near{b}": [(0, 200)]} for b in range(1, near + 1)),
            {"late": [(150, 100)]}]


async def read_with_spool(tmp_path: Path, batches: list[dict[str, list[tuple[int, int]]]], *, budget: int,
                          spool_budget: int, prefetch: bool) -> tuple[CountingBackend, _SpanReader]:
    """Plan and read ``batches`` with a spool file of ``spool_budget`` bytes in ``tmp_path``."""
    backend = CountingBackend()
    spool = _Spool(tmp_path, budget=spool_budget)
    reader = planned(backend, batches, budget=budget, gap=64, spool=spool)
    try:
        await read_all(reader, backend, batches, prefetch=prefetch)
    finally:
        spool.close()
    return backend, reader


@pytest.mark.parametrize("prefetch", [False, True])
async def test_a_span_needed_far_apart_waits_in_the_spool_not_in_memory(prefetch: bool, tmp_path) -> None:
    # "late" (a later point's pack) is needed by the first batch and the last of 40; "near"
    # spans are needed by neighbouring batches only. The read-ahead's room (the budget less the
    # largest span: 350 bytes) cannot hold "late" and a "near" at once.
    batches = late_around_near(38)
    backend, reader = await read_with_spool(tmp_path, batches, budget=600, spool_budget=10 * MiB, prefetch=prefetch)
    assert ("late", 0, 250) in backend.gets and backend.ranged == []  # still one request
    assert len(backend.gets) == 39
    assert reader.spooled_bytes == 250  # the span needed furthest ahead went to disk...
    assert reader.peak_bytes == 200  # ...and memory held the near spans, one at a time
    assert list(tmp_path.iterdir()) == []  # the spool file has no name


async def test_spans_needed_by_a_stretch_of_batches_stay_in_memory(tmp_path) -> None:
    """A full point's packs: each needed by many consecutive batches, few at once. However
    long each one's stretch, they fit the budget together and none goes to the spool."""
    batches: list[dict[str, list[tuple[int, int]]]] = []
    for b in range(100):
        pack = b // 20  # packs p0..p4, each taken from by 20 batches, the next starting as one ends
        batch = {f"p{pack}": [(b % 20 * 15, 15)]}
        if b % 20 == 19 and pack < 4:
            batch[f"p{pack + 1}"] = [(300, 15)]  # the next pack's tail, needed early: an overlap
        batches.append(batch)
    backend, reader = await read_with_spool(tmp_path, batches, budget=1000, spool_budget=10 * MiB, prefetch=True)
    assert len(backend.gets) == 5 and backend.ranged == []  # one request per pack
    assert reader.spooled_bytes == 0 and reader.peak_bytes <= 1000


async def test_a_full_spool_leaves_the_span_in_memory(tmp_path) -> None:
    batches = late_around_near(20)
    # the spool has no room for the 250-byte span
    backend, reader = await read_with_spool(tmp_path, batches, budget=600, spool_budget=100, prefetch=False)
    # planned for the spool, but it is full: held in memory, within the budget, still one GET
    assert backend.gets.count(("late", 0, 250)) == 1 and backend.ranged == []
    assert reader.spooled_bytes == 0 and reader.peak_bytes == 450


class RecyclingBackend(CountingBackend):
    """Also reads into the caller's buffer (as the S3 backend does), counting new ones."""

    def __init__(self) -> None:
        super().__init__()
        self.buffers: set[int] = set()

    async def get_into(self, key: str, offset: int, length: int, buffer: bytearray) -> memoryview:
        self.gets.append((key, offset, length))
        self.buffers.add(id(buffer))
        await anyio.sleep(0)
        view = memoryview(buffer)[:length]
        view[:] = self.body(key, offset, length)
        return view


async def test_buffers_of_spans_let_go_are_reused_only_once_the_batch_is_done() -> None:
    # ten packs one after the other, each taken from by two batches
    batches = [{f"p{b // 2}": [(b % 2 * 100, 100)]} for b in range(20)]
    backend = RecyclingBackend()
    reader = planned(backend, batches, budget=1000, gap=64)

    async def batches_in_order() -> None:
        for batch in batches:
            for key, ranges in batch.items():
                taken: list[tuple[str, int]] = []
                got = await reader.read(key, ranges, taken)
                await anyio.sleep(0)  # the read-ahead goes on meanwhile (the batch decodes)
                assert [bytes(g) for g in got] == [backend.body(key, o, n) for o, n in ranges]
                reader.release(taken)

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader.prefetch, 3)
        await batches_in_order()
        tg.cancel_scope.cancel()
    assert len(backend.gets) == 10
    assert len(backend.buffers) < 10  # buffers came back for later spans
    assert reader.held_bytes == 0 and reader.users == {}


async def test_a_restore_without_holes_writes_the_zero_blocks(tmp_path: Path) -> None:
    """``sparse=False`` (what a block device gets): every zero block is written, none left a hole."""
    img = mixed_disk(tmp_path / "vda.img", 8 * MiB)
    await blockferry.init_repository(str(tmp_path / "repo"), block_size=256 << 10)
    async with blockferry.open_repository(str(tmp_path / "repo")) as repo:
        session = await repo.backup([str(img)], name="vm")
        m = await repo.point(session.points[0])
        out = tmp_path / "out.img"
        await restore_disks(repo.store, m, m.disks, [out], runtime=repo.runtime, sparse=False)
    assert same_file(out, img)
    assert out.stat().st_blocks * 512 >= out.stat().st_size  # fully allocated: no holes left
    assert img.stat().st_blocks * 512 < img.stat().st_size  # (the source has holes)
