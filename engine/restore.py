"""Restore: a restore point's disks back to raw images or block devices, bit-exact.

Holes stay holes: a new image is created at its full size (all holes) and only data blocks are
written. Onto an existing regular file the same happens after it is emptied; onto a block device
(which has no holes) zero blocks are written as zeros. A new image is written under a temporary
name beside its final one and renamed when complete, so a failed restore never leaves a file
that looks whole. Every chunk is checked against its hash before it is written; a mismatch stops
the restore with an error naming the point, disk and offset.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import msgspec

from .blocks import decode_chunk
from .errors import ConfigError, CorruptionError, NotFoundError, RepositoryError
from .format import DIGEST_SIZE, HOLE, DiskRecord, Manifest
from .store import RepositoryStore
from .task import Runtime

_BLKZEROOUT = 0x127F
_BLKGETSIZE64 = 0x80081272


class RestoreResult(msgspec.Struct, kw_only=True):
    point: str
    disk: str
    path: str
    size: int
    data_bytes: int = 0  #: bytes of data blocks written
    hole_bytes: int = 0  #: bytes of zero blocks (left as holes, or zeroed on devices)
    duration: float = 0.0


def _runs(blocks: bytes, nblocks: int, data: bool) -> Iterator[tuple[int, int]]:
    """Runs of consecutive data blocks (``data``) or holes."""
    i = 0
    while i < nblocks:
        is_hole = blocks[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE] == HOLE
        j = i + 1
        while j < nblocks and (blocks[j * DIGEST_SIZE:(j + 1) * DIGEST_SIZE] == HOLE) == is_hole:
            j += 1
        if is_hole != data:
            yield i, j - i
        i = j


@dataclass
class _Target:
    path: Path
    fd: int
    temp: Path | None  #: renamed to ``path`` when complete
    sparse: bool  #: holes can be left unwritten


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
            return _Target(path, fd, None, sparse=False)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path} is neither a regular file nor a block device")
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        os.ftruncate(fd, 0)  # emptied, then sized: every byte is a hole until written
        os.ftruncate(fd, size)
        return _Target(path, fd, None, sparse=sparse)
    if st is not None and not overwrite:
        raise ConfigError(f"{path} exists; remove it, restore elsewhere, or pass --overwrite")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path} exists and is not a regular file")
    temp = path.with_name(f".{path.name}.blockferry-partial")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    os.ftruncate(fd, size)
    return _Target(path, fd, temp, sparse=sparse)


def _zero_fill(fd: int, offset: int, length: int, block_size: int, device: bool) -> None:
    if device:
        try:
            fcntl.ioctl(fd, _BLKZEROOUT, struct.pack("QQ", offset, length))
            return
        except OSError:
            pass  # not supported by this device: write zeros
    zero = bytes(min(length, 8 * block_size))
    end = offset + length
    while offset < end:
        n = os.pwrite(fd, memoryview(zero)[: min(len(zero), end - offset)], offset)
        offset += n


class _DiskRestorer:
    """Restores one disk with ``lanes`` parallel lanes of consecutive-block batches."""

    def __init__(self, store: RepositoryStore, manifest: Manifest, disk: DiskRecord, target: _Target,
                 runtime: Runtime, progress: Callable[[int], None] | None) -> None:
        self.store = store
        self.manifest = manifest
        self.disk = disk
        self.target = target
        self.runtime = runtime
        self.progress = progress
        self.bs = manifest.block_size
        self.nblocks = disk.block_count(self.bs)
        self.sync_get = getattr(store.backend, "get_ranges_sync", None)
        self.data_bytes = 0

    def _where(self, block: int) -> str:
        return f"point {self.manifest.id}, disk {self.disk.name}, offset {block * self.bs}"

    def _plan(self, first: int, n: int) -> list[tuple[str, list[tuple[int, int]], list[tuple[int, int, int, int, int, int]]]]:
        """Reads grouped by pack: (pack key, coalesced ranges, items), an item being
        (range number, offset in the range, stored length, raw length, flags, block)."""
        by_pack: dict[str, list[tuple[int, int, int, int, int]]] = {}
        blocks = self.disk.blocks
        for b in range(first, first + n):
            d = blocks[b * DIGEST_SIZE:(b + 1) * DIGEST_SIZE]
            loc = self.store.locate(d)
            if loc is None:
                raise CorruptionError(f"{self._where(b)}: chunk {d.hex()[:16]} is missing from the repository")
            key, off, length, raw_len, flags = loc
            expect = min(self.bs, self.disk.size - b * self.bs)
            if raw_len != expect:
                raise CorruptionError(f"{self._where(b)}: chunk {d.hex()[:16]} holds {raw_len} bytes, the block {expect}")
            by_pack.setdefault(key, []).append((off, length, raw_len, flags, b))
        out = []
        for key, items in by_pack.items():
            ranges: list[tuple[int, int]] = []
            placed = []
            for off, length, raw_len, flags, b in sorted(items):
                if ranges and ranges[-1][0] + ranges[-1][1] == off:  # adjacent: one read
                    ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
                elif not ranges or off >= ranges[-1][0] + ranges[-1][1]:
                    ranges.append((off, length))
                else:  # the same chunk again (a block repeated in the batch)
                    r = next(i for i, (o, k) in enumerate(ranges) if o <= off < o + k)
                    placed.append((r, off - ranges[r][0], length, raw_len, flags, b))
                    continue
                placed.append((len(ranges) - 1, off - ranges[-1][0], length, raw_len, flags, b))
            out.append((key, ranges, placed))
        return out

    def _decode_write(self, first: int, n: int, plan: list[Any], fetched: list[list[bytes]]) -> int:
        data: dict[int, bytes] = {}
        blocks = self.disk.blocks
        for (key, _, placed), chunks in zip(plan, fetched):
            for r, rel, length, raw_len, flags, b in placed:
                stored = memoryview(chunks[r])[rel:rel + length]
                if len(stored) != length:
                    raise CorruptionError(f"{self._where(b)}: pack {key} is truncated")
                try:
                    data[b] = decode_chunk(stored, raw_len, flags, blocks[b * DIGEST_SIZE:(b + 1) * DIGEST_SIZE])
                except CorruptionError as exc:
                    raise CorruptionError(f"{self._where(b)}: {exc}") from None
        views = [memoryview(data[b]) for b in range(first, first + n)]
        total = sum(len(v) for v in views)
        offset = first * self.bs
        written = 0
        while written < total:
            k = os.pwritev(self.target.fd, views, offset + written)
            written += k
            while views and k >= len(views[0]):
                k -= len(views[0])
                views.pop(0)
            if k:
                views[0] = views[0][k:]
        return total

    def _batch_sync(self, first: int, n: int) -> int:
        plan = self._plan(first, n)
        fetched = [self.sync_get(key, ranges) for key, ranges, _ in plan]
        return self._decode_write(first, n, plan, fetched)

    async def _batch(self, first: int, n: int) -> int:
        if self.sync_get is not None:
            return await anyio.to_thread.run_sync(self._batch_sync, first, n, limiter=self.runtime.cpu)
        plan = self._plan(first, n)
        fetched = [await self.store.backend.get_ranges(key, ranges) for key, ranges, _ in plan]
        return await anyio.to_thread.run_sync(self._decode_write, first, n, plan, fetched, limiter=self.runtime.cpu)

    async def _lane(self, todo: Iterator[tuple[int, int]]) -> None:
        for first, n in todo:
            try:
                k = await self._batch(first, n)
            except (RepositoryError, NotFoundError) as exc:
                raise CorruptionError(f"{self._where(first)}: cannot read its data ({exc})") from exc
            except OSError as exc:
                raise RepositoryError(f"writing {self.target.path} at offset {first * self.bs}: {exc.strerror}") from exc
            self.data_bytes += k
            if self.progress is not None:
                self.progress(k)

    async def run(self) -> None:
        per_batch = max(1, self.runtime.settings.batch_bytes // self.bs)

        def batches() -> Iterator[tuple[int, int]]:
            for first, n in _runs(self.disk.blocks, self.nblocks, data=True):
                while n > 0:
                    k = min(n, per_batch)
                    yield first, k
                    first += k
                    n -= k

        todo = batches()
        async with anyio.create_task_group() as tg:
            for _ in range(self.runtime.settings.lanes):
                tg.start_soon(self._lane, todo)
        if not self.target.sparse:
            device = stat.S_ISBLK(os.fstat(self.target.fd).st_mode)
            for first, n in _runs(self.disk.blocks, self.nblocks, data=False):
                off = first * self.bs
                await anyio.to_thread.run_sync(_zero_fill, self.target.fd, off, min(n * self.bs, self.disk.size - off),
                                               self.bs, device, limiter=self.runtime.io)


async def restore_disk(
    store: RepositoryStore,
    manifest: Manifest,
    disk: DiskRecord,
    dest: Path,
    *,
    runtime: Runtime,
    overwrite: bool = False,
    into_existing: bool = False,
    sparse: bool = True,
    progress: Callable[[int], None] | None = None,
) -> RestoreResult:
    """Restore one disk of ``manifest`` to ``dest`` (a new image, or with ``into_existing`` an
    existing image or block device)."""
    t0 = anyio.current_time()
    target = await anyio.to_thread.run_sync(
        lambda: _open_target(dest, disk.size, overwrite=overwrite, into_existing=into_existing, sparse=sparse)
    )
    ok = False
    restorer = _DiskRestorer(store, manifest, disk, target, runtime, progress)
    try:
        await restorer.run()
        await anyio.to_thread.run_sync(os.fsync, target.fd)
        ok = True
    finally:
        os.close(target.fd)
        if target.temp is not None:
            if ok:
                os.replace(target.temp, target.path)
            else:
                try:
                    os.unlink(target.temp)
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        raise
    return RestoreResult(
        point=manifest.id, disk=disk.name, path=str(dest), size=disk.size, data_bytes=restorer.data_bytes,
        hole_bytes=disk.size - restorer.data_bytes, duration=anyio.current_time() - t0,
    )
