"""Chunks compressed ahead of a backup (engine/datapath/prepare.py, blocks.PreparedChunks): the lanes use
a prepared chunk instead of compressing, only at the level it was made for; preparing covers the
hinted non-zero blocks, keeps to its budget, stops when told, and never raises. The S3 end of it
(preparing while a real repository opens) is in tests/plugins/test_s3.py."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import zstandard
from blockferry.api import init_repository, open_repository
from blockferry.datapath import prepare
from blockferry.datapath.blocks import KNOWN, NEW, NOT_PREPARED, BlockProcessor, PreparedChunks
from blockferry.datapath.prepare import _hops, prepare_chunks, wants_preparing
from blockferry.repo.chunks import decode_chunk, digest
from blockferry.repo.format import FLAG_ZSTD
from blockferry.repo.index import ChunkIndex
from blockferry.runtime.buffers import BufferPool

from tests.conftest import KiB, MiB, write_disk

BS = 64 * KiB


def _text(seed: int) -> bytes:
    rng = random.Random(seed)
    return b"".join(b"line %d of a log that compresses well\n" % rng.randrange(10**6) for _ in range(BS // 30))[:BS]


def _processor(data: bytes, index: ChunkIndex, prepared: PreparedChunks | None, level: int = 3) -> BlockProcessor:
    def read(offset: int, views: list[memoryview]) -> int:
        n = 0
        for v in views:
            chunk = data[offset + n:offset + n + len(v)]
            v[:len(chunk)] = chunk
            n += len(chunk)
        return n

    return BlockProcessor(url="mem", size=len(data), block_size=BS, level=level, index=index, owner=object(),
                          claimed=set(), read=read, pool=BufferPool(BS, 4), prepared=prepared)


def test_the_lanes_take_prepared_chunks_instead_of_compressing() -> None:
    blocks = [_text(1), _text(2), bytes(BS), _text(3)]
    data = b"".join(blocks)
    ids = [digest(b) for b in blocks]
    prepared = PreparedChunks(3, MiB)
    # recognisable payloads: level 19 output differs from the processor's level 3, yet decodes
    odd = zstandard.ZstdCompressor(level=19).compress(blocks[0])
    assert odd != zstandard.ZstdCompressor(level=3).compress(blocks[0])
    prepared.add(ids[0], odd)
    prepared.add(ids[1], None)  # "did not shrink": stored raw, although it would compress
    prepared.add(ids[3], zstandard.ZstdCompressor(level=3).compress(blocks[3]))
    index = ChunkIndex()
    index.committed[ids[3]] = 0  # already in the repository: the prepared copy is dropped
    batch = _processor(data, index, prepared).process(0, 4)
    b0, b1, b2, b3 = batch.blocks
    assert (b0.kind, b0.payload, b0.flags) == (NEW, odd, FLAG_ZSTD)
    assert (b1.kind, b1.payload, b1.flags) == (NEW, blocks[1], 0)
    assert b2.payload is None and b3.kind == KNOWN
    for b, raw in ((b0, blocks[0]), (b1, blocks[1])):
        assert b.payload is not None and decode_chunk(b.payload, len(raw), b.flags, b.digest) == raw
    assert prepared.used == 2 and len(prepared) == 0 and prepared.held == 0
    assert prepared.take(ids[0]) is NOT_PREPARED  # handed out once


def test_chunks_prepared_at_another_level_are_not_used() -> None:
    block = _text(4)
    prepared = PreparedChunks(1, MiB)
    prepared.add(digest(block), None)
    p = _processor(block, ChunkIndex(), prepared, level=3)
    assert p.prepared is None
    (b,) = p.process(0, 1).blocks
    assert b.flags == FLAG_ZSTD and b.payload == zstandard.ZstdCompressor(level=3).compress(block)
    assert len(prepared) == 1 and prepared.used == 0


@pytest.mark.anyio
async def test_preparing_covers_the_hinted_non_zero_blocks_and_keeps_to_its_budget(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = write_disk(tmp_path / "a.img", 8 * BS, [(0, "text", 3 * BS), (5 * BS, "random", 3 * BS)], seed=1)
    b = write_disk(tmp_path / "b.img", 8 * BS, [(0, "random", 8 * BS)], seed=2)
    (tmp_path / "a.hints").write_text(f"{BS // 2} {BS}\n{3 * BS} {3 * BS}\n")  # blocks 0, 1 (text), 3-5
    (tmp_path / "b.hints").write_text(f"0 {2 * BS}\n")
    hints = {str(a): str(tmp_path / "a.hints"), str(b): str(tmp_path / "b.hints"),
             str(tmp_path / "missing.img"): str(tmp_path / "a.hints"), "qemu:/no/such.qmp": str(tmp_path / "a.hints")}
    data_a, data_b = a.read_bytes(), b.read_bytes()
    blocks_a = {digest(data_a[i * BS:(i + 1) * BS]): data_a[i * BS:(i + 1) * BS] for i in (0, 1)}
    random_a = digest(data_a[5 * BS:6 * BS])
    blocks_b = {digest(data_b[i * BS:(i + 1) * BS]): data_b[i * BS:(i + 1) * BS] for i in (0, 1)}
    chunks = PreparedChunks(3, MiB)
    # blocks 3 and 4 of a are a hole: nothing to prepare there; the source that does not exist
    # and the VM are left to the backup's own checks
    await prepare_chunks(chunks, hints, BS)
    assert set(chunks._chunks) == set(blocks_a) | set(blocks_b) | {random_a} and chunks.prepared == 5
    # text blocks are kept compressed (and decode to themselves); random ones as "store raw"
    for d, raw in blocks_a.items():
        p = chunks._chunks[d]
        assert p is not None and decode_chunk(p, BS, FLAG_ZSTD, d) == raw
    assert all(chunks._chunks[d] is None for d in [*blocks_b, random_a])
    # a budget of one compressed block, hops of two blocks: preparing stops once it is spent
    monkeypatch.setattr(prepare, "_PREPARE_HOP_BYTES", 2 * BS)
    small = PreparedChunks(3, 1)
    await prepare_chunks(small, {str(a): str(tmp_path / "a.hints")}, BS)
    assert 1 <= small.prepared < 3 and small.full
    stopped = PreparedChunks(3, MiB)
    stopped.stopped = True
    await prepare_chunks(stopped, {str(a): str(tmp_path / "a.hints")}, BS)
    assert stopped.prepared == 0


def test_hops_group_short_runs_and_cut_long_ones() -> None:
    assert list(_hops([(0, 3), (10, 2), (20, 9), (40, 1)], 8)) == [[(0, 3), (10, 2)], [(20, 8)], [(28, 1), (40, 1)]]
    assert list(_hops([], 8)) == [] and list(_hops([(5, 8)], 8)) == [[(5, 8)]]


@pytest.mark.anyio
async def test_a_local_repository_prepares_nothing(tmp_path: Path) -> None:
    assert wants_preparing("s3://b/p", {"x": "y"}, MiB) and not wants_preparing("s3://b/p", {"x": "y"}, 0)
    assert not wants_preparing(str(tmp_path), {"x": "y"}, MiB) and not wants_preparing("s3://b/p", {}, MiB)
    await init_repository(str(tmp_path / "repo"))
    img = write_disk(tmp_path / "d.img", 2 * MiB, [(0, "text", 2 * MiB)])
    (tmp_path / "h").write_text(f"0 {MiB}\n")
    async with open_repository(str(tmp_path / "repo"), prepare={str(img): str(tmp_path / "h")}) as r:
        assert r.store.index.prepared is None
