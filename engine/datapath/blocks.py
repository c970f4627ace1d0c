"""The per-block work of the data path: zero detection, hashing, compression, and the reverse.

Everything here runs in worker threads. BLAKE3 (the ``blake3`` package) and zstandard release
the GIL, so two threads keep two cores busy while the event loop only routes batches. A batch is
read, checked, hashed, deduplicated and compressed in a single thread hop, because a hop costs
hundreds of microseconds on a virtual machine (see docs/performance.md).

Why BLAKE3: measured on this project's 2-core reference machine, 1 MiB blocks, one core:
BLAKE3 2.2-2.4 GiB/s, SHA-256 (with SHA-NI) 1.2-1.3 GiB/s, BLAKE2b 0.4-0.6 GiB/s. All are
cryptographic; BLAKE3 leaves the most CPU for compression, which dominates a backup.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import Any

import blake3
import msgspec
from blockferry.errors import SourceChangedError
from blockferry.repo.chunks import compressor
from blockferry.repo.format import FLAG_ZSTD, HOLE
from blockferry.repo.index import FOREIGN, MINE, ChunkIndex
from blockferry.runtime.buffers import BufferPool

# kinds of block in a batch
ZERO, KNOWN, NEW, CLAIMED = 0, 1, 2, 3
_KIND_OF_CLASS = {MINE: NEW, FOREIGN: CLAIMED}


# The zero check on a mapped block needs memcmp: comparing a memoryview in Python goes item by
# item, and copying the block to bytes first costs what the mapping saved. ctypes releases the
# GIL during the call.
_libc = ctypes.CDLL(None)
_memcmp = _libc.memcmp
_memcmp.restype = ctypes.c_int
_memcmp.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]


class Block(msgspec.Struct, array_like=True, gc=False):
    """One block in a batch. ``payload`` is set only for NEW blocks (compressed if ``flags``
    has FLAG_ZSTD, else the raw bytes)."""

    index: int
    digest: bytes
    kind: int
    raw_len: int
    payload: bytes | None = None
    flags: int = 0


class Batch(msgspec.Struct, gc=False):
    """Consecutive blocks of one disk, as they travel from the source mover to the target."""

    blocks: list[Block]
    read_bytes: int = 0
    zero_bytes: int = 0
    new_bytes: int = 0
    dedup_bytes: int = 0
    compressed_bytes: int = 0
    read_time: float = 0.0
    proc_time: float = 0.0
    #: the in-flight token this batch holds; the target releases it once the batch is written
    token: Any = None

    def release(self) -> None:
        if self.token is not None:
            self.token.release()
            self.token = None


#: what :meth:`PreparedChunks.take` returns for a chunk it does not hold
NOT_PREPARED: Any = object()


class PreparedChunks:
    """Chunks compressed ahead of a backup (see engine/datapath/prepare.py), by hash: the compressed
    payload, or None for a block that did not shrink and is stored raw.

    A chunk's compressed form depends only on its bytes and the zstd ``level``, and the hash
    names the bytes, so a prepared chunk is right whatever the repository turns out to hold.
    At most ``budget`` bytes of payload are held; :meth:`take` hands each chunk out once.
    Thread-safe: single dict operations are atomic under the GIL, and the byte count is only a
    bound for the preparing side."""

    def __init__(self, level: int, budget: int) -> None:
        self.level = level
        self.budget = budget
        self.held = 0
        self.prepared = 0
        self.used = 0
        #: set once the backup's own lanes start: preparing stops after its current batch
        self.stopped = False
        self._chunks: dict[bytes, bytes | None] = {}

    def __len__(self) -> int:
        return len(self._chunks)

    @property
    def full(self) -> bool:
        return self.held >= self.budget

    def add(self, digest: bytes, payload: bytes | None) -> None:
        if digest not in self._chunks:
            self._chunks[digest] = payload
            self.held += len(payload) if payload is not None else 0
            self.prepared += 1

    def take(self, digest: bytes) -> bytes | None:
        """The payload of ``digest`` (None: store it raw), or NOT_PREPARED."""
        p = self._chunks.pop(digest, NOT_PREPARED)
        if p is not NOT_PREPARED:
            self.used += 1
            if p is not None:
                self.held -= len(p)
        return p

    def discard(self, digest: bytes) -> None:
        p = self._chunks.pop(digest, None)
        if p is not None:
            self.held -= len(p)

    def clear(self) -> None:
        self.stopped = True
        self._chunks.clear()
        self.held = 0


class BlockProcessor:
    """Turns runs of a disk's blocks into batches. One per task; ``process`` is thread-safe."""

    def __init__(
        self,
        *,
        url: str,
        size: int,
        block_size: int,
        level: int | None,
        index: ChunkIndex,
        owner: object,
        claimed: set[bytes],
        read: Callable[[int, Sequence[Any]], int] | None,
        pool: BufferPool,
        map: Callable[[int, int], Any] | None = None,
        prepared: PreparedChunks | None = None,
    ) -> None:
        self.url = url
        self.size = size
        self.block_size = block_size
        self.level = level
        self.index = index
        self.owner = owner
        self.claimed = claimed
        self.read = read
        self.map = map
        self.pool = pool
        self.zero = bytes(block_size)
        #: chunks compressed ahead at this processor's level (others are no use to it)
        self.prepared = prepared if prepared is not None and prepared.level == level else None

    def views(self, first: int, count: int, bufs: list[bytearray]) -> list[Any]:
        """The buffers sized to the blocks (the disk's last block may be short)."""
        bs = self.block_size
        out: list[Any] = []
        for i in range(count):
            n = min(bs, self.size - (first + i) * bs)
            out.append(bufs[i] if n == bs else memoryview(bufs[i])[:n])
        return out

    def process(self, first: int, count: int, bufs: list[bytearray] | None = None) -> Batch:
        """Read, check, hash, dedup and compress blocks ``first .. first+count-1``. Given
        ``bufs`` (already filled by the caller, who keeps them) nothing is read."""
        if bufs is not None:
            return self._blocks(first, self.views(first, count, bufs), None, 0.0, 0)
        if self.map is not None:
            return self._process_mapped(first, count)
        bufs = self.pool.get()
        try:
            views = self.views(first, count, bufs)
            want = sum(len(v) for v in views)
            t0 = perf_counter()
            assert self.read is not None
            got = self.read(first * self.block_size, views)
            if got != want:
                raise SourceChangedError(
                    f"{self.url}: read {got} of {want} bytes at offset {first * self.block_size}: "
                    "the disk shrank while being read"
                )
            return self._blocks(first, views, None, perf_counter() - t0, want)
        finally:
            self.pool.put(bufs)

    def _process_mapped(self, first: int, count: int) -> Batch:
        bs = self.block_size
        offset = first * bs
        want = min(count * bs, self.size - offset)
        t0 = perf_counter()
        assert self.map is not None
        m = self.map(offset, want)
        try:
            anchor = ctypes.c_char.from_buffer(m)
            base = ctypes.addressof(anchor)
            del anchor  # the export must end before the mapping can close
            with memoryview(m) as mv:
                views = [mv[i * bs:min((i + 1) * bs, want)] for i in range(count)]
                try:
                    return self._blocks(first, views, base, perf_counter() - t0, want)
                finally:
                    for v in views:
                        v.release()
        finally:
            m.close()

    def _blocks(self, first: int, views: list[Any], base: int | None, read_time: float, read_bytes: int) -> Batch:
        """Zero check, hash, dedup and compress already-read blocks. ``base`` is the address of
        the views' memory when it is a mapping (then the zero check is a C memcmp)."""
        bs = self.block_size
        t1 = perf_counter()
        classify, claimed, level = self.index.classify, self.claimed, self.level
        cctx = compressor(level) if level is not None else None
        prepared = self.prepared if self.prepared else None  # empty: skip the lookups
        zero = self.zero
        out: list[Block] = []
        zero_bytes = new_bytes = dedup_bytes = compressed = 0
        for i, v in enumerate(views):
            n = len(v)
            if base is not None:
                is_zero = _memcmp(base + i * bs, zero, n) == 0
            else:
                # bytearray == bytes is a memcmp; a memoryview compares item by item (100x slower)
                is_zero = (v == zero) if n == bs else (bytes(v) == bytes(n))
            if is_zero:
                out.append(Block(first + i, HOLE, ZERO, n))
                zero_bytes += n
                continue
            d = blake3.blake3(v).digest()
            cls = classify(d, self.owner)
            if cls == MINE:
                claimed.add(d)
                payload = None
                if cctx is not None:
                    ahead = prepared.take(d) if prepared is not None else NOT_PREPARED
                    if ahead is NOT_PREPARED:
                        c = cctx.compress(v)
                        if len(c) < n:
                            payload = c
                    else:
                        payload = ahead
                if payload is None:
                    out.append(Block(first + i, d, NEW, n, bytes(v), 0))
                    compressed += n
                else:
                    out.append(Block(first + i, d, NEW, n, payload, FLAG_ZSTD))
                    compressed += len(payload)
                new_bytes += n
            else:
                if prepared is not None and cls != FOREIGN:  # stored already: nobody will take it
                    prepared.discard(d)
                out.append(Block(first + i, d, _KIND_OF_CLASS.get(cls, KNOWN), n))
                dedup_bytes += n
        return Batch(
            out, read_bytes=read_bytes, zero_bytes=zero_bytes, new_bytes=new_bytes, dedup_bytes=dedup_bytes,
            compressed_bytes=compressed, read_time=read_time, proc_time=perf_counter() - t1,
        )


