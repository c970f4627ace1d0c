"""Restore: a restore point's disks back to raw images or block devices, bit-exact.

Holes stay holes: a new image is created at its full size (all holes) and only data blocks are
written. Onto an existing regular file the same happens after it is emptied; onto a block device
(which has no holes) zero blocks are written as zeros. A new image is written under a temporary
name beside its final one and renamed when complete, so a failed restore never leaves a file
that looks whole. Every chunk is checked against its id before it is written; a mismatch stops
the restore with an error naming the point, disk and offset.

The disks of a point are restored together, block range by block range: a chunk that several
disks hold at the same place (VMs cloned from one template) is read and decompressed once per
batch. Image files are written with ``O_DIRECT`` from reused page-aligned buffers where the
filesystem allows it (no page cache to fill; see docs/performance.md), the last partial block of
an image through an ordinary descriptor.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import heapq
import mmap
import os
import shutil
import stat
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import msgspec
from blockferry.datapath.extents import Extent, union
from blockferry.errors import ConfigError, CorruptionError, NotFoundError, RepositoryError
from blockferry.fileio import write_all
from blockferry.repo.backend import MapsObjects, ReadsInto
from blockferry.repo.chunks import decode_chunk_into
from blockferry.repo.format import DIGEST_SIZE, HOLE, DiskRecord, Manifest
from blockferry.repo.store import RepositoryStore
from blockferry.runtime.resources import Runtime

_BLKGETSIZE64 = 0x80081272
_BLKZEROOUT = 0x127F
_ALIGN = 4096


class RestoreResult(msgspec.Struct, kw_only=True):
    point: str
    disk: str
    path: str
    size: int
    data_bytes: int = 0  #: bytes of data blocks written
    hole_bytes: int = 0  #: bytes of zero blocks (left as holes, or zeroed on devices)
    duration: float = 0.0
    #: (offset, length) ranges whose data was damaged and written as zeros (allow_damaged only)
    damaged_ranges: list[tuple[int, int]] = msgspec.field(default_factory=list)


def data_runs(blocks: bytes, nblocks: int, *, holes: bool = False) -> list[Extent]:
    """Runs of consecutive data blocks (or, with ``holes``, of hole blocks) of a block map."""
    out: list[Extent] = []
    i = 0
    while i < nblocks:
        is_hole = blocks[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE] == HOLE
        j = i + 1
        while j < nblocks and (blocks[j * DIGEST_SIZE:(j + 1) * DIGEST_SIZE] == HOLE) == is_hole:
            j += 1
        if is_hole == holes:
            out.append((i, j - i))
        i = j
    return out


class _Target(msgspec.Struct, kw_only=True):
    path: Path
    fd: int  #: ordinary descriptor
    direct: int | None  #: O_DIRECT descriptor, when the filesystem allows it
    temp: Path | None  #: renamed to ``path`` when complete
    sparse: bool  #: holes can be left unwritten
    device: bool

    def close(self) -> None:
        for fd in (self.direct, self.fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.direct = None
        self.fd = -1


def _open_direct(path: Path) -> int | None:
    try:
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # tmpfs and some network filesystems
            return None
        raise


def _open_target(path: Path, size: int, *, overwrite: bool, into_existing: bool, sparse: bool) -> _Target:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc
    if into_existing:
        if st is None:
            raise NotFoundError(f"{path} does not exist (restoring onto a file or device needs it to)")
        if stat.S_ISBLK(st.st_mode):
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            dev_size = struct.unpack("Q", fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8))[0]
            if dev_size < size:
                os.close(fd)
                raise ConfigError(f"{path} holds {dev_size} bytes, the disk needs {size}")
            return _Target(path=path, fd=fd, direct=None, temp=None, sparse=False, device=True)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path} is neither a regular file nor a block device")
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        os.ftruncate(fd, 0)  # emptied, then sized: every byte is a hole until written
        os.ftruncate(fd, size)
        return _Target(path=path, fd=fd, direct=_open_direct(path), temp=None, sparse=sparse, device=False)
    if st is not None and not overwrite:
        raise ConfigError(f"{path} exists; remove it, restore elsewhere, or pass --overwrite")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path} exists and is not a regular file")
    temp = path.with_name(f".{path.name}.blockferry-partial")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    os.ftruncate(fd, size)
    return _Target(path=path, fd=fd, direct=_open_direct(temp), temp=temp, sparse=sparse, device=False)


class _StagePool:
    """Page-aligned buffers that hold a window's decoded blocks from decoding to writing
    (O_DIRECT needs aligned memory), reused so their pages stay mapped."""

    def __init__(self) -> None:
        self._free: list[tuple[mmap.mmap, memoryview]] = []
        self._lock = threading.Lock()

    def get(self, size: int) -> tuple[mmap.mmap, memoryview]:
        with self._lock:
            for i, (buf, view) in enumerate(self._free):
                if len(buf) >= size:
                    return self._free.pop(i)
        buf = mmap.mmap(-1, -(-size // _ALIGN) * _ALIGN)
        return buf, memoryview(buf)

    def put(self, item: tuple[mmap.mmap, memoryview]) -> None:
        with self._lock:
            self._free.append(item)

    def close(self) -> None:
        for buf, view in self._free:
            try:
                view.release()
                buf.close()
            except BufferError:
                pass  # a slice is still referenced (by an error's traceback): the GC frees it
        self._free.clear()


class _Held:
    """A span being read or read: waiters share the one request. Its bytes are in memory
    (``data``) or in the spool file at ``spooled``."""

    __slots__ = ("ready", "data", "size", "spooled", "buffer")

    def __init__(self, size: int) -> None:
        self.ready = anyio.Event()
        self.data: bytes | None = None
        self.size = size
        self.spooled: int | None = None
        self.buffer: bytearray | None = None  #: the recycled buffer ``data`` lies in


class _Spool:
    """An unnamed temporary file that holds long-lived spans (append only, for one restore)."""

    def __init__(self, directory: Path, budget: int) -> None:
        self.directory = directory
        self.budget = budget
        self.used = 0
        self._file: Any = None

    def reserve(self, n: int) -> int | None:
        """Room for ``n`` bytes: their offset, or None if over budget."""
        if self.used + n > self.budget:
            return None
        off, self.used = self.used, self.used + n
        return off

    def write(self, off: int, data: bytes) -> None:
        if self._file is None:
            # beside the restored images: the restore needs that disk anyway, and not a tmpfs
            self._file = tempfile.TemporaryFile(dir=self.directory, prefix=".blockferry-spool-")
        write_all(self._file.fileno(), [data], off)

    def read(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        return [os.pread(self._file.fileno(), n, off) for off, n in ranges]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _SpanReader:
    """Reads of a remote repository's packs (S3) for one restore, planned over the whole point
    rather than per batch: the chunks the point needs from each pack are grouped into spans
    (ranges closer than ``gap`` bytes merged), and each span is read with one request the first
    time a batch needs it and held until the last batch that needs it has taken its chunks. At
    most ``budget`` bytes of spans are held; a batch that finds no room reads its own ranges as
    before. Requests are what object storage bills and what its latency makes slow: a dense pack
    (every chunk of a full point's pack is needed) is one GET, as restic reads whole packs. The
    plan holds a few integers per span, flat in disk size.

    When the spans needed at once would not fit the budget (a later point's pack is needed from
    the first batch to the last; a full point's packs each cover a stretch of batches), those
    needed furthest ahead go to the ``spool`` (a temporary file), when one is given: still one
    request each. :meth:`plan_spool` decides which, before the reads start."""

    def __init__(self, backend: Any, budget: int, gap: int, piece: int | None = None, *,
                 spool: _Spool | None = None) -> None:
        self.backend = backend
        self.budget = budget
        self.gap = gap
        #: spans grow up to this many bytes (past it only to take in an overlapping range): a
        #: third of the budget, so that several fit (a whole default pack in the default budget)
        self.piece = piece if piece is not None else max(1, budget // 3)
        self.spans: dict[str, list[list[int]]] = {}  #: pack key → sorted [start, end) spans
        self.users: dict[tuple[str, int], int] = {}  #: (pack key, span) → batches still to take from it
        self.held: dict[tuple[str, int], _Held] = {}
        self.held_bytes = 0
        self.peak_bytes = 0
        self.order: list[tuple[str, int]] = []  #: spans in the order the batches first need them
        self.first: dict[tuple[str, int], int] = {}  #: span → first and last batch that needs it
        self.last: dict[tuple[str, int], int] = {}
        self.spool = spool
        self._spooled: set[tuple[str, int]] = set()  #: spans planned to wait in the spool
        self.spooled_bytes = 0
        self._freed = anyio.Event()
        #: buffers of spans let go, for the next ones (when the backend reads into a buffer):
        #: a new one is zeroed and faulted in on the event loop. Kept while they and the held
        #: spans stay within the budget and one more span.
        self._buffers: list[bytearray] = []
        self._get_into = backend.get_into if isinstance(backend, ReadsInto) else None

    def add(self, key: str, off: int, end: int) -> None:
        """The point needs ``[off, end)`` of pack ``key``. Spans never overlap (each range
        added lies in one span); a range merges with a neighbour it overlaps, or one within
        ``gap`` while the merged span stays within ``piece`` bytes."""
        spans = self.spans.setdefault(key, [])
        i = bisect.bisect_left(spans, [off, end])
        spans.insert(i, [off, end])

        def joins(a: list[int], b: list[int]) -> bool:
            return b[0] < a[1] or (b[0] <= a[1] + self.gap and max(a[1], b[1]) - a[0] <= self.piece)

        while i > 0 and joins(spans[i - 1], spans[i]):
            spans[i - 1][1] = max(spans[i - 1][1], spans[i][1])
            del spans[i]
            i -= 1
        while i + 1 < len(spans) and joins(spans[i], spans[i + 1]):
            spans[i][1] = max(spans[i][1], spans[i + 1][1])
            del spans[i + 1]

    def _groups(self, key: str, ranges: list[tuple[int, int]]) -> dict[int, list[int]]:
        """The ranges' indexes by the span that holds them."""
        spans = self.spans[key]
        groups: dict[int, list[int]] = {}
        for r, (off, _) in enumerate(ranges):
            groups.setdefault(bisect.bisect_right(spans, [off, 1 << 62]) - 1, []).append(r)
        return groups

    def count(self, key: str, ranges: list[tuple[int, int]], batch: int = 0) -> None:
        """Batch number ``batch`` will read these ranges of ``key`` (after every :meth:`add`;
        batches counted in the order they run)."""
        for i in self._groups(key, ranges):
            if (key, i) not in self.users:
                self.order.append((key, i))
                self.first[(key, i)] = batch
            self.last[(key, i)] = batch
            self.users[(key, i)] = self.users.get((key, i), 0) + 1

    def _to_spool(self, k: tuple[str, int]) -> bool:
        return k in self._spooled

    def _room(self) -> int:
        """Bytes of spans the read-ahead may hold: room for the largest span is kept for the
        batches, so those under way never wait behind spans that only later batches need."""
        return self.budget - max((e - s for spans in self.spans.values() for s, e in spans), default=0)

    def plan_spool(self) -> None:
        """Choose the spans that wait in the spool (after every :meth:`count`): going through the
        spans in the order the batches first need them, while those needed at once would not fit
        the read-ahead's room, the one needed again furthest ahead goes to the spool (the choice
        that spools the fewest spans when they are of a size). Spans needed by neighbouring
        batches, however long the stretch, stay in memory."""
        self._spooled = set()
        if self.spool is None:
            return
        room = self._room()
        size = {k: self.spans[k[0]][k[1]][1] - self.spans[k[0]][k[1]][0] for k in self.order}
        ending: list[tuple[int, int, tuple[str, int]]] = []  # (last batch, n, span): to let go
        farthest: list[tuple[int, int, tuple[str, int]]] = []  # (-last batch, n, span): to spool
        in_memory: set[tuple[str, int]] = set()
        held = 0
        for n, k in enumerate(self.order):  # in the order of first use
            while ending and ending[0][0] < self.first[k]:
                _, _, gone = heapq.heappop(ending)
                if gone in in_memory:
                    in_memory.discard(gone)
                    held -= size[gone]
            in_memory.add(k)
            held += size[k]
            heapq.heappush(ending, (self.last[k], n, k))
            heapq.heappush(farthest, (-self.last[k], n, k))
            while held > room:
                _, _, victim = heapq.heappop(farthest)
                if victim in in_memory:
                    in_memory.discard(victim)
                    held -= size[victim]
                    self._spooled.add(victim)

    def close(self) -> None:
        self._buffers.clear()
        if self.spool is not None:
            self.spool.close()

    async def prefetch(self, streams: int) -> None:
        """Read spans ahead of the batches, in the order they need them, ``streams`` at once, as
        the budget allows: the next spans arrive while the batches decode the current ones (one
        stream alone is slower than the store can send)."""
        todo = iter(self.order)
        room = self._room()

        async def stream() -> None:
            for key, i in todo:
                start, end = self.spans[key][i]
                while not self._to_spool((key, i)) and self.held_bytes + (end - start) > room and self.held:
                    await self._freed.wait()
                if (key, i) in self.users and (key, i) not in self.held and end - start <= self.budget:
                    await self._span(key, i)

        async with anyio.create_task_group() as tg:
            for _ in range(streams):
                tg.start_soon(stream)

    async def read(self, key: str, ranges: list[tuple[int, int]],
                   taken: list[tuple[str, int]] | None = None) -> list[Any]:
        """The ranges' bytes (views of held spans). With ``taken``, the spans read from are
        added to it and stay held until :meth:`release` (their buffers are reused after)."""
        out: list[Any] = [b""] * len(ranges)
        for i, idxs in self._groups(key, ranges).items():
            try:
                held = await self._span(key, i)
                if held is not None and held.spooled is not None:
                    assert self.spool is not None
                    at = held.spooled - self.spans[key][i][0]
                    got = await anyio.to_thread.run_sync(self.spool.read, [(at + ranges[r][0], ranges[r][1]) for r in idxs])
                    for r, d in zip(idxs, got):
                        out[r] = d
                    continue
                data = held.data if held is not None else None
                if data is None:  # no room: this batch's own ranges, as without a plan
                    got = await self.backend.get_ranges(key, [ranges[r] for r in idxs])
                    for r, d in zip(idxs, got):
                        out[r] = d
                    continue
                start = self.spans[key][i][0]
                view = memoryview(data)
                for r in idxs:
                    off, n = ranges[r]
                    out[r] = view[off - start:off - start + n]
            finally:
                if taken is not None:
                    taken.append((key, i))
                else:
                    self._done(key, i)
        return out

    def release(self, taken: list[tuple[str, int]]) -> None:
        """The batch is done with what it read (see :meth:`read`)."""
        for key, i in taken:
            self._done(key, i)
        taken.clear()

    async def _span(self, key: str, i: int) -> _Held | None:
        held = self.held.get((key, i))
        if held is not None:
            await held.ready.wait()
            return held
        start, end = self.spans[key][i]
        spool = self.spool if self._to_spool((key, i)) else None
        spooled = spool.reserve(end - start) if spool is not None else None
        if spooled is None and self.held_bytes + (end - start) > self.budget:
            return None
        held = self.held[(key, i)] = _Held(end - start)
        if spooled is None:
            self.held_bytes += held.size
            self.peak_bytes = max(self.peak_bytes, self.held_bytes)
        buf = self._buffer(end - start) if self._get_into is not None else None
        try:
            if buf is not None:
                data = await self._get_into(key, start, end - start, buf)
            else:
                data = await self.backend.get(key, start, end - start)
            if spool is not None and spooled is not None:
                await anyio.to_thread.run_sync(spool.write, spooled, data)
                held.spooled = spooled
                self.spooled_bytes += held.size
            else:
                held.data, held.buffer, buf = data, buf, None
        finally:
            self._recycle(buf)  # a spooled span's buffer, or a failed read's
            held.ready.set()  # a failed read: the waiters read their own ranges (and say why)
        return held

    def _buffer(self, n: int) -> bytearray:
        """The smallest recycled buffer that holds ``n`` bytes, or a new one."""
        fits = [b for b in self._buffers if len(b) >= n]
        if not fits:
            # let go of kept buffers (too small for this span) as far as the bound asks
            self._buffers.sort(key=len)
            while self._buffers and not self._may_keep(n):
                self._buffers.pop(0)
            return bytearray(n)
        b = min(fits, key=len)
        self._buffers.remove(b)
        return b

    def _may_keep(self, n: int) -> bool:
        """Whether ``n`` more bytes of buffers keep the held spans and the kept buffers within
        the budget and one more span."""
        return self.held_bytes + sum(map(len, self._buffers)) + n <= self.budget + self.piece

    def _recycle(self, buf: bytearray | None) -> None:
        if buf is not None and self._may_keep(len(buf)):
            self._buffers.append(buf)

    def _done(self, key: str, i: int) -> None:
        left = self.users[(key, i)] = self.users[(key, i)] - 1
        if left <= 0:
            del self.users[(key, i)]
            held = self.held.pop((key, i), None)
            if held is not None and held.spooled is None:
                self.held_bytes -= held.size
                buf, held.data, held.buffer = held.buffer, None, None
                self._recycle(buf)
                self._freed.set()
                self._freed = anyio.Event()


class _PointRestorer:
    """Restores some disks of one point together, with ``lanes`` parallel batches."""

    def __init__(self, store: RepositoryStore, manifest: Manifest, disks: list[DiskRecord], targets: list[_Target],
                 runtime: Runtime, progress: Callable[[int], None] | None, allow_damaged: bool = False) -> None:
        self.allow_damaged = allow_damaged
        self.damaged: list[set[int]] = [set() for _ in disks]  # blocks written as zeros, per disk
        self.store = store
        self.manifest = manifest
        self.disks = disks
        self.targets = targets
        self.runtime = runtime
        self.progress = progress
        self.bs = manifest.block_size
        self.runs = [data_runs(d.blocks, d.block_count(self.bs)) for d in disks]
        self.starts = [[r[0] for r in runs] for runs in self.runs]
        self.sync_map = store.backend.map_sync if isinstance(store.backend, MapsObjects) else None
        self.reader: _SpanReader | None = None
        settings = runtime.settings
        #: from a remote repository the planned spans, not the batches, decide the requests:
        #: smaller batches there hold less decoded data at once
        self.batch_bytes = settings.restore_batch_bytes if self.sync_map is not None else \
            min(settings.restore_batch_bytes, settings.restore_remote_batch_bytes)
        self.data_bytes = [0] * len(disks)
        self.stages = _StagePool()

    def _where(self, k: int, block: int) -> str:
        return f"point {self.manifest.id}, disk {self.disks[k].name}, offset {block * self.bs}"

    def batches(self) -> Iterator[list[tuple[int, int, int]]]:
        """Windows of block numbers, each the (disk, first, count) runs of data inside it."""
        per = max(1, self.batch_bytes // (self.bs * len(self.disks)))
        everything: list[Extent] = []
        for runs in self.runs:
            everything = union(everything, runs)
        for s, c in everything:
            for w in range(s, s + c, per):
                end = min(w + per, s + c)
                work = []
                for k, runs in enumerate(self.runs):
                    i = max(0, bisect.bisect_right(self.starts[k], w) - 1)
                    while i < len(runs) and runs[i][0] < end:
                        a, b = max(w, runs[i][0]), min(end, runs[i][0] + runs[i][1])
                        if a < b:
                            work.append((k, a, b - a))
                        i += 1
                if work:
                    yield work

    def _plan(self, work: list[tuple[int, int, int]]) -> tuple[list[tuple[str, list[tuple[int, int]], list[Any]]], dict[bytes, tuple[int, int]]]:
        """Reads of the window's distinct chunks, grouped by pack and coalesced: (pack key, ranges,
        [(range number, offset in range, length, raw length, flags, digest)])."""
        by_pack: dict[str, list[tuple[int, int, int, int, bytes]]] = {}
        first_use: dict[bytes, tuple[int, int]] = {}
        for k, first, count in work:
            disk = self.disks[k]
            blocks = disk.blocks
            for b in range(first, first + count):
                d = blocks[b * DIGEST_SIZE:(b + 1) * DIGEST_SIZE]
                expect = min(self.bs, disk.size - b * self.bs)
                if d in first_use:
                    continue
                # a copy a health check found damaged is still tried when it is the only one: a
                # transient read error may have marked it, and every chunk is checked anyway
                loc = self.store.locate(d, suspect=True)
                if loc is None:
                    if self.allow_damaged:  # left as zeros, reported
                        continue
                    raise CorruptionError(f"{self._where(k, b)}: chunk {d.hex()[:16]} has no good copy in the "
                                          "repository (missing or damaged; restore with allow_damaged to skip it)")
                key, off, length, raw_len, flags = loc
                if raw_len != expect:
                    raise CorruptionError(
                        f"{self._where(k, b)}: chunk {d.hex()[:16]} holds {raw_len} bytes, the block {expect}")
                first_use[d] = (k, b)
                by_pack.setdefault(key, []).append((off, length, raw_len, flags, d))
        plan = []
        for key, items in by_pack.items():
            ranges: list[tuple[int, int]] = []
            placed = []
            for off, length, raw_len, flags, d in sorted(items):
                if ranges and ranges[-1][0] + ranges[-1][1] == off:  # adjacent chunks: one read
                    ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
                else:
                    ranges.append((off, length))
                placed.append((len(ranges) - 1, off - ranges[-1][0], length, raw_len, flags, d))
            plan.append((key, ranges, placed))
        return plan, first_use

    def _layout(self, work: list[tuple[int, int, int]]) -> tuple[list[tuple[int, int]], dict[tuple[int, int], int], int]:
        """Where each run of the window lies in the stage (aligned), and each block."""
        bs = self.bs
        layout: list[tuple[int, int]] = []  # per run: stage offset, bytes
        at: dict[tuple[int, int], int] = {}  # (disk, block) → stage offset
        pos = 0
        for k, first, count in work:
            n = min(count * bs, self.disks[k].size - first * bs)
            layout.append((pos, n))
            for i in range(count):
                at[(k, first + i)] = pos + i * bs
            pos += -(-n // _ALIGN) * _ALIGN
        return layout, at, pos

    def _decode(self, work: list[tuple[int, int, int]], plan: list[Any], first_use: dict[bytes, tuple[int, int]],
                fetched: list[list[bytes]], stage: memoryview) -> list[tuple[int, int]]:
        """Decode the window's distinct chunks straight into the stage, where each run of blocks
        lies at an aligned offset, and copy repeated chunks into place. Returns the layout."""
        layout, at, _ = self._layout(work)
        decoded: dict[bytes, tuple[int, int]] = {}
        for (key, _, placed), chunks in zip(plan, fetched):
            for r, rel, length, raw_len, flags, d in placed:
                stored = memoryview(chunks[r])[rel:rel + length]
                dest = at[first_use[d]]
                if len(stored) != length:
                    if self.allow_damaged:
                        continue
                    raise CorruptionError(f"{self._where(*first_use[d])}: pack {key} is truncated")
                try:
                    decode_chunk_into(stored, raw_len, flags, d, stage[dest:dest + raw_len])
                except CorruptionError as exc:
                    if self.allow_damaged:
                        continue
                    if self.store.index.lookup(d) is None:
                        raise CorruptionError(
                            f"{self._where(*first_use[d])}: chunk {d.hex()[:16]} has no good copy in the repository "
                            f"({exc}; restore with allow_damaged to skip it)") from None
                    raise CorruptionError(f"{self._where(*first_use[d])}: {exc}") from None
                decoded[d] = (dest, raw_len)
        for k, first, count in work:
            blocks = self.disks[k].blocks
            for b in range(first, first + count):
                dest = at[(k, b)]
                found = decoded.get(blocks[b * DIGEST_SIZE:(b + 1) * DIGEST_SIZE])
                if found is None:  # damaged, allowed: zeros, and say where
                    length = min(self.bs, self.disks[k].size - b * self.bs)
                    stage[dest:dest + length] = bytes(length)
                    self.damaged[k].add(b)
                    continue
                src, length = found
                if dest != src:  # the same chunk again (a cloned disk, a repeated block)
                    stage[dest:dest + length] = stage[src:src + length]
        return layout

    def _write(self, work: list[tuple[int, int, int]], layout: list[tuple[int, int]], stage: memoryview) -> list[int]:
        written = [0] * len(self.disks)
        for (k, first, _), (start, n) in zip(work, layout):
            target = self.targets[k]
            offset = first * self.bs
            if target.direct is not None:
                whole = n // _ALIGN * _ALIGN  # a partial last block goes through the page cache
                write_all(target.direct, [stage[start:start + whole]], offset)
                if whole < n:
                    write_all(target.fd, [stage[start + whole:start + n]], offset + whole)
            else:
                write_all(target.fd, [stage[start:start + n]], offset)
            written[k] += n
        return written

    def _map(self, key: str, ranges: list[tuple[int, int]]) -> Any:
        """A mapping of pack ``key`` that covers ``ranges``; with ``allow_damaged``, of as much as
        a truncated pack still holds (the chunks before its end are whole)."""
        assert self.sync_map is not None
        need = max(o + n for o, n in ranges)
        try:
            return self.sync_map(key, need)
        except (CorruptionError, NotFoundError):
            if not self.allow_damaged:
                raise
        lo, hi, best = 1, need - 1, None  # the longest mapping the pack still allows
        while lo <= hi:
            mid = (lo + hi) // 2
            try:
                m = self.sync_map(key, mid)
            except (CorruptionError, NotFoundError):
                hi = mid - 1
                continue
            if best is not None:
                best.close()
            best, lo = m, mid + 1
        return best if best is not None else b""

    def _read_decode(self, work: list[tuple[int, int, int]], stage: memoryview) -> list[tuple[int, int]]:
        """Decode straight from mappings of the packs (no copy out of the page cache)."""
        plan, first_use = self._plan(work)
        maps: list[Any] = []
        views: list[memoryview] = []
        try:
            fetched = []
            for key, ranges, _ in plan:
                m = self._map(key, ranges)
                maps.append(m)
                whole = memoryview(m)
                views.append(whole)
                parts = [whole[o:o + n] for o, n in ranges]  # past a truncated end: short
                views.extend(parts)
                fetched.append(parts)
            return self._decode(work, plan, first_use, fetched, stage)
        finally:
            try:
                for v in reversed(views):
                    v.release()
                for m in maps:
                    if not isinstance(m, bytes):
                        m.close()
            except BufferError:
                pass  # an error's traceback still holds a slice: the mapping closes when it goes

    async def _fetch(self, key: str, ranges: list[tuple[int, int]], taken: list[tuple[str, int]]) -> list[Any]:
        """The ranges' bytes, through the span reader when there is one. With ``allow_damaged`` a
        pack that is gone reads as empty ranges: its chunks are damaged, and decoding zeroes them."""
        try:
            if self.reader is not None:
                return await self.reader.read(key, ranges, taken)
            return await self.store.backend.get_ranges(key, ranges)
        except NotFoundError:
            if not self.allow_damaged:
                raise
            return [b""] * len(ranges)

    async def _batch(self, work: list[tuple[int, int, int]]) -> list[int]:
        """One window: read and decode it (a CPU hop), then write it (an I/O hop, so waiting for
        the disk never holds a CPU slot)."""
        cpu, io = self.runtime.cpu, self.runtime.io
        item = self.stages.get(self._layout(work)[2])
        try:
            if self.sync_map is not None:  # a local backend: map and decode in one hop
                layout = await anyio.to_thread.run_sync(self._read_decode, work, item[1], limiter=cpu)
            else:
                plan, first_use = self._plan(work)
                taken: list[tuple[str, int]] = []  # spans held until decoded (their buffers are reused)
                try:
                    fetched = [await self._fetch(key, ranges, taken) for key, ranges, _ in plan]
                    layout = await anyio.to_thread.run_sync(self._decode, work, plan, first_use, fetched, item[1],
                                                            limiter=cpu)
                finally:
                    if self.reader is not None:
                        self.reader.release(taken)
            return await anyio.to_thread.run_sync(self._write, work, layout, item[1], limiter=io)
        finally:
            self.stages.put(item)

    async def _lane(self, todo: Iterator[list[tuple[int, int, int]]]) -> None:
        for work in todo:
            try:
                written = await self._batch(work)
            except NotFoundError as exc:  # a pack is gone: its chunks are lost
                k, first, _ = work[0]
                raise CorruptionError(f"{self._where(k, first)}: cannot read its data ({exc})") from exc
            except RepositoryError as exc:  # unreadable now (permissions, I/O, a timeout): not damage
                k, first, _ = work[0]
                raise type(exc)(f"{self._where(k, first)}: cannot read its data ({exc})") from exc
            except OSError as exc:
                k, first, _ = work[0]
                raise RepositoryError(
                    f"writing {self.targets[k].path} at offset {first * self.bs}: {exc.strerror}") from exc
            for k, n in enumerate(written):
                self.data_bytes[k] += n
            if self.progress is not None:
                self.progress(sum(written))

    def _plan_spans(self) -> _SpanReader:
        """The spans of every pack the point needs, and how many batches take from each (two
        passes over the batches' plans: spans first, then their users)."""
        settings = self.runtime.settings
        spool = None
        if settings.restore_spool_bytes:
            t = self.targets[0]
            directory = Path(tempfile.gettempdir()) if t.device else t.path.parent
            free = shutil.disk_usage(directory).free
            spool = _Spool(directory, min(settings.restore_spool_bytes, free // 2))
        reader = _SpanReader(self.store.backend, settings.restore_span_bytes, settings.restore_span_gap,
                             spool=spool)
        for work in self.batches():
            for key, ranges, _ in self._plan(work)[0]:
                for off, n in ranges:
                    reader.add(key, off, off + n)
        for b, work in enumerate(self.batches()):
            for key, ranges, _ in self._plan(work)[0]:
                reader.count(key, ranges, b)
        reader.plan_spool()
        return reader

    async def run(self) -> None:
        if self.sync_map is None:
            self.reader = await anyio.to_thread.run_sync(self._plan_spans, limiter=self.runtime.cpu)
        todo = self.batches()
        try:
            async with anyio.create_task_group() as outer:
                if self.reader is not None:
                    outer.start_soon(self.reader.prefetch, self.runtime.settings.restore_span_streams)
                async with anyio.create_task_group() as tg:
                    # more lanes than cores: while some wait for the disk, others decode
                    for _ in range(self.runtime.settings.restore_lanes):
                        tg.start_soon(self._lane, todo)
                outer.cancel_scope.cancel()  # spans the batches no longer need
        finally:
            self.stages.close()
            if self.reader is not None:
                self.reader.close()
        for k, target in enumerate(self.targets):
            disk = self.disks[k]
            if not target.sparse:
                for first, n in data_runs(disk.blocks, disk.block_count(self.bs), holes=True):
                    off = first * self.bs
                    await anyio.to_thread.run_sync(_zero_fill, target.fd, off, min(n * self.bs, disk.size - off),
                                                   self.bs, target.device, limiter=self.runtime.io)


def _zero_fill(fd: int, offset: int, length: int, block_size: int, device: bool) -> None:
    """Zeros over ``length`` bytes at ``offset`` of a target without holes: BLKZEROOUT on a
    device that supports it, else written (at most 8 blocks of zeros held)."""
    if device:
        try:
            fcntl.ioctl(fd, _BLKZEROOUT, struct.pack("QQ", offset, length))
            return
        except OSError:
            pass  # not supported by this device: write zeros
    zero = memoryview(bytes(min(length, 8 * block_size)))
    end = offset + length
    while offset < end:
        offset += write_all(fd, [zero[:min(len(zero), end - offset)]], offset)


async def restore_disks(
    store: RepositoryStore,
    manifest: Manifest,
    disks: list[DiskRecord],
    dests: list[Path],
    *,
    runtime: Runtime,
    overwrite: bool = False,
    into_existing: bool = False,
    sparse: bool = True,
    allow_damaged: bool = False,
    progress: Callable[[int], None] | None = None,
) -> list[RestoreResult]:
    """Restore ``disks`` of ``manifest`` to ``dests`` (new images, or with ``into_existing``
    existing images or block devices), together."""
    t0 = anyio.current_time()
    targets: list[_Target] = []
    ok = False
    try:
        for d, dest in zip(disks, dests):
            targets.append(await anyio.to_thread.run_sync(
                lambda d=d, dest=dest: _open_target(dest, d.size, overwrite=overwrite, into_existing=into_existing,
                                                    sparse=sparse)))
        restorer = _PointRestorer(store, manifest, disks, targets, runtime, progress, allow_damaged)
        await restorer.run()
        for t in targets:
            await anyio.to_thread.run_sync(os.fsync, t.fd)
        ok = True
    finally:
        for t in targets:
            t.close()
            if t.temp is not None:
                if ok:
                    os.replace(t.temp, t.path)
                else:
                    try:
                        os.unlink(t.temp)
                    except OSError as exc:
                        if exc.errno != errno.ENOENT:
                            raise
    duration = anyio.current_time() - t0
    return [RestoreResult(point=manifest.id, disk=d.name, path=str(dest), size=d.size,
                          data_bytes=restorer.data_bytes[k], hole_bytes=d.size - restorer.data_bytes[k],
                          duration=duration, damaged_ranges=_ranges(restorer.damaged[k], manifest.block_size, d.size))
            for k, (d, dest) in enumerate(zip(disks, dests))]


def _ranges(blocks: set[int], bs: int, size: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for b in sorted(blocks):
        off, n = b * bs, min(bs, size - b * bs)
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((off, n))
    return out


async def restore_disk(store: RepositoryStore, manifest: Manifest, disk: DiskRecord, dest: Path, **kw: Any) -> RestoreResult:
    """Restore one disk (see :func:`restore_disks`)."""
    (result,) = await restore_disks(store, manifest, [disk], [dest], **kw)
    return result
