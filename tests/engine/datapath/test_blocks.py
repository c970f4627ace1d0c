"""Block processing on its own: what one batch of a disk becomes (zero blocks, new chunks,
chunks the repository or another task already has), without actors or a repository."""

from __future__ import annotations

import os
from collections.abc import Sequence

import blake3
import pytest
from blockferry.datapath.blocks import CLAIMED, KNOWN, NEW, ZERO, BlockProcessor, PreparedChunks
from blockferry.errors import SourceChangedError
from blockferry.repo.chunks import decode_chunk
from blockferry.repo.format import FLAG_ZSTD, HOLE
from blockferry.repo.index import MINE, ChunkIndex
from blockferry.runtime.buffers import BufferPool

BS = 4096


def reader(data: bytes):
    def read(offset: int, bufs: Sequence[memoryview | bytearray]) -> int:
        n = 0
        for b in bufs:
            chunk = data[offset + n:offset + n + len(b)]
            b[:len(chunk)] = chunk
            n += len(chunk)
            if len(chunk) < len(b):
                break
        return n
    return read


def processor(data: bytes, index: ChunkIndex | None = None, *, owner: object = "task", level: int | None = 3,
              prepared: PreparedChunks | None = None, size: int | None = None) -> BlockProcessor:
    return BlockProcessor(url="disk.img", size=len(data) if size is None else size, block_size=BS, level=level,
                          index=index or ChunkIndex(), owner=owner, claimed=set(), read=reader(data),
                          pool=BufferPool(BS, 8), prepared=prepared)


def test_zero_new_and_repeated_blocks_in_one_batch() -> None:
    text = (b"a log line that compresses well\n" * 200)[:BS]
    noise = os.urandom(BS)
    data = bytes(BS) + text + noise + text
    p = processor(data)
    batch = p.process(0, 4)
    kinds = [b.kind for b in batch.blocks]
    # the repeat of a block this task is storing is deduplicated against its own claim
    assert kinds == [ZERO, NEW, NEW, CLAIMED]
    zero, compressible, random, again = batch.blocks
    assert zero.digest == HOLE and zero.payload is None
    assert compressible.flags & FLAG_ZSTD and len(compressible.payload or b"") < BS
    assert random.flags == 0 and random.payload == noise  # did not shrink: stored raw
    assert again.digest == compressible.digest and again.payload is None
    assert p.claimed == {compressible.digest, random.digest}
    assert batch.zero_bytes == BS and batch.new_bytes == 2 * BS and batch.dedup_bytes == BS
    assert batch.compressed_bytes == len(compressible.payload or b"") + BS
    for b in (compressible, random):
        assert decode_chunk(b.payload or b"", BS, b.flags, b.digest) == data[b.index * BS:(b.index + 1) * BS]


def test_chunks_the_repository_has_or_another_task_claimed_are_not_compressed() -> None:
    a, b = os.urandom(BS), os.urandom(BS)
    index = ChunkIndex()
    index.committed[blake3.blake3(a).digest()] = 1
    assert index.classify(blake3.blake3(b).digest(), "other task") == MINE
    batch = processor(a + b, index).process(0, 2)
    assert [x.kind for x in batch.blocks] == [KNOWN, CLAIMED]
    assert all(x.payload is None for x in batch.blocks)
    assert batch.new_bytes == 0 and batch.dedup_bytes == 2 * BS


def test_a_short_last_block_and_no_compression() -> None:
    data = os.urandom(BS + 100)
    batch = processor(data, level=None).process(0, 2)
    last = batch.blocks[1]
    assert last.raw_len == 100 and last.payload == data[BS:] and last.flags == 0
    assert last.digest == blake3.blake3(data[BS:]).digest()


def test_a_disk_that_shrank_while_read_is_refused() -> None:
    data = os.urandom(2 * BS)
    with pytest.raises(SourceChangedError, match="shrank"):
        processor(data, size=3 * BS).process(0, 3)


def test_prepared_chunks_are_used_once_instead_of_compressing_again() -> None:
    text = (b"prepared ahead of the backup\n" * 200)[:BS]
    d = blake3.blake3(text).digest()
    prepared = PreparedChunks(level=3, budget=1 << 20)
    prepared.add(d, b"marker: not what zstd would produce")
    batch = processor(text, prepared=prepared).process(0, 1)
    assert batch.blocks[0].payload == b"marker: not what zstd would produce"
    assert prepared.used == 1 and len(prepared) == 0 and prepared.held == 0
    # at another level the prepared chunk is of no use, and the block is compressed as usual
    other = PreparedChunks(level=1, budget=1 << 20)
    other.add(d, b"marker")
    assert processor(text, prepared=other).process(0, 1).blocks[0].payload != b"marker"
