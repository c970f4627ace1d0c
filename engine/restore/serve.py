"""Instant recovery: a restore point's disks as live block devices, served over NBD.

``blockferry serve REPO POINT --socket PATH`` exports each disk of the point under its name (the
only disk, or the one chosen with ``--disk``, also as the default export), so ``qemu-img``,
``nbdinfo``, ``nbdcopy`` or a VM's ``-blockdev nbd`` can use it at once: nothing is restored
first. Chunks are read from the repository when a client reads them and kept in a small cache
of decoded blocks (least recently used first out); a chunk several clients want at once is read
and decoded once. Every chunk is checked against its id: a damaged or missing one makes the
read fail at its offset (an NBD error chunk that names it), never return wrong bytes.

Read-only by default. With ``writable``, writes go to an overlay that lives only as long as the
server (an unlinked temporary file and a map of which 64 KiB units it holds): the repository is
never written, and what a client wrote is gone when serving stops. To keep a recovered VM, move
its disk elsewhere while it runs (QEMU's ``blockdev-mirror``), see docs/qemu.md.
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.to_thread
from blockferry.errors import BlockferryError, ConfigError, CorruptionError, NotFoundError, RepositoryError
from blockferry.fileio import write_all
from blockferry.log import get_logger
from blockferry.nbd.server import NBDServer
from blockferry.repo.chunks import decode_chunk
from blockferry.repo.format import DIGEST_SIZE, HOLE, DiskRecord, Manifest
from blockferry.repo.store import RepositoryStore
from blockferry.runtime.resources import Runtime
from blockferry.units import MiB

log = get_logger(component="serve")

STATE_HOLE, STATE_ZERO = 1, 2  # base:allocation flags
#: default bytes of decoded blocks kept in memory, across the disks served
DEFAULT_CACHE_BYTES = 64 * MiB
#: the overlay tracks writes in units of this many bytes (a partial write copies its unit in first)
OVERLAY_UNIT = 64 * 1024
_BASE, _DATA, _ZEROED = 0, 1, 2  # overlay unit states


class ChunkCache:
    """Decoded chunks by id, at most ``capacity`` bytes, least recently used out first.

    ``get`` reads and decodes a chunk once however many callers want it at the same moment
    (the others wait for that one read); a chunk that fails its check is never cached.
    """

    def __init__(self, store: RepositoryStore, runtime: Runtime, capacity: int = DEFAULT_CACHE_BYTES) -> None:
        self.store = store
        self.runtime = runtime
        self.capacity = capacity
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._loading: dict[bytes, _Load] = {}
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"<ChunkCache {len(self._cache)} chunks {self._bytes}/{self.capacity} bytes hits={self.hits} misses={self.misses}>"

    def statistics(self) -> dict[str, int]:
        return {"chunks": len(self._cache), "bytes": self._bytes, "capacity": self.capacity, "hits": self.hits,
                "misses": self.misses, "loading": len(self._loading)}

    async def get(self, digest: bytes, expect_len: int) -> bytes:
        """The block whose id is ``digest`` (``expect_len`` bytes). CorruptionError (without the
        disk and offset: callers add them) if it is missing, unreadable or damaged."""
        data = self._cache.get(digest)
        if data is not None:
            self._cache.move_to_end(digest)
            self.hits += 1
            return data
        load = self._loading.get(digest)
        if load is not None:
            await load.done.wait()
            if load.error is not None:
                raise load.error
            assert load.data is not None
            return load.data
        self.misses += 1
        load = self._loading[digest] = _Load()
        try:
            load.data = await self._fetch(digest, expect_len)
            self._put(digest, load.data)
            return load.data
        except BaseException as exc:
            load.error = exc if isinstance(exc, BlockferryError) else CorruptionError(f"chunk {digest.hex()[:16]}: {exc!r}")
            raise
        finally:
            del self._loading[digest]
            load.done.set()

    def _put(self, digest: bytes, data: bytes) -> None:
        self._cache[digest] = data
        self._bytes += len(data)
        while self._bytes > self.capacity and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._bytes -= len(old)

    async def _fetch(self, digest: bytes, expect_len: int) -> bytes:
        loc = self.store.locate(digest, suspect=True)  # a marked copy is checked like any other
        if loc is None:
            raise CorruptionError(f"chunk {digest.hex()[:16]} is missing from the repository")
        key, off, length, raw_len, flags = loc
        if raw_len != expect_len:
            raise CorruptionError(f"chunk {digest.hex()[:16]} holds {raw_len} bytes, the block {expect_len}")
        try:
            stored = await self.store.backend.get(key, off, length)
        except (RepositoryError, NotFoundError) as exc:
            raise CorruptionError(f"chunk {digest.hex()[:16]} cannot be read ({exc})") from exc
        if len(stored) != length:
            raise CorruptionError(f"chunk {digest.hex()[:16]}: pack {key} is truncated")
        data: bytes = await anyio.to_thread.run_sync(decode_chunk, stored, raw_len, flags, digest,
                                                     limiter=self.runtime.cpu)
        return data


class _Load:
    __slots__ = ("done", "data", "error")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class Overlay:
    """Where a writable export's writes go: an unlinked temporary file (gone with the process,
    whatever happens) and one state byte per 64 KiB unit (base, written, zeroed)."""

    def __init__(self, size: int, directory: str | None = None) -> None:
        self.size = size
        fd, path = tempfile.mkstemp(prefix="blockferry-overlay-", dir=directory)
        os.unlink(path)
        os.ftruncate(fd, size)
        self.fd = fd
        self.units = bytearray(-(-size // OVERLAY_UNIT))
        self.lock = anyio.Lock()
        self.written_bytes = 0

    def __repr__(self) -> str:
        return f"<Overlay size={self.size} units={sum(1 for u in self.units if u)}/{len(self.units)}>"

    def touched(self, offset: int, length: int) -> bool:
        a, b = offset // OVERLAY_UNIT, -(-(offset + length) // OVERLAY_UNIT)
        return any(self.units[a:b])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PointDisk:
    """One disk of a restore point as an NBD :class:`~blockferry.nbd.server.BlockDevice`."""

    def __init__(self, manifest: Manifest, record: DiskRecord, cache: ChunkCache, *, writable: bool = False,
                 overlay_dir: str | None = None) -> None:
        self.manifest = manifest
        self.record = record
        self.cache = cache
        self.size = record.size
        self.block_size = manifest.block_size
        self.writable = writable
        self.overlay = Overlay(record.size, overlay_dir) if writable else None
        self.reads = 0
        self.read_errors = 0

    def __repr__(self) -> str:
        return f"<PointDisk {self.manifest.id}/{self.record.name} size={self.size} {'rw' if self.writable else 'ro'}>"

    def close(self) -> None:
        if self.overlay is not None:
            self.overlay.close()

    def _digest(self, block: int) -> bytes:
        return self.record.blocks[block * DIGEST_SIZE:(block + 1) * DIGEST_SIZE]

    def _where(self, offset: int) -> str:
        return f"point {self.manifest.id}, disk {self.record.name}, offset {offset}"

    # -- reading the point -------------------------------------------------------------------------

    async def _base_read(self, offset: int, length: int) -> list[tuple[int, int, Any]]:
        """The point's bytes: per block a data view, None for a hole, or the error at its offset."""
        bs = self.block_size
        pieces: list[Any] = []
        loads: list[tuple[int, int, int, int, bytes]] = []  # piece index, block, lo, hi, digest
        pos, end = offset, offset + length
        while pos < end:
            b = pos // bs
            lo, hi = pos - b * bs, min(bs, end - b * bs)
            d = self._digest(b)
            if d == HOLE:
                if pieces and pieces[-1] is not None and pieces[-1][2] is None:
                    o, n, _ = pieces[-1]
                    pieces[-1] = (o, n + hi - lo, None)
                else:
                    pieces.append((pos, hi - lo, None))
            else:
                loads.append((len(pieces), b, lo, hi, d))
                pieces.append(None)
            pos = b * bs + hi

        async def load(i: int, b: int, lo: int, hi: int, d: bytes) -> None:
            expect = min(bs, self.size - b * bs)
            try:
                data = await self.cache.get(d, expect)
                pieces[i] = (b * bs + lo, hi - lo, memoryview(data)[lo:hi])
            except CorruptionError as exc:
                self.read_errors += 1
                err = CorruptionError(f"{self._where(b * bs)}: {exc}")
                err.offset = b * bs + lo  # type: ignore[attr-defined]
                pieces[i] = (b * bs + lo, hi - lo, err)

        if len(loads) == 1:
            await load(*loads[0])
        elif loads:
            async with anyio.create_task_group() as tg:
                for item in loads:
                    tg.start_soon(load, *item)
        return pieces

    async def read(self, offset: int, length: int) -> list[tuple[int, int, Any]]:
        self.reads += 1
        ov = self.overlay
        if ov is None or not ov.touched(offset, length):
            return await self._base_read(offset, length)
        out: list[tuple[int, int, Any]] = []
        pos, end = offset, offset + length
        while pos < end:
            u = pos // OVERLAY_UNIT
            state = ov.units[u]
            stop = min(end, (u + 1) * OVERLAY_UNIT)
            while stop < end and ov.units[stop // OVERLAY_UNIT] == state:  # a run of one state
                stop = min(end, (stop // OVERLAY_UNIT + 1) * OVERLAY_UNIT)
            n = stop - pos
            if state == _BASE:
                out.extend(await self._base_read(pos, n))
            elif state == _ZEROED:
                out.append((pos, n, None))
            else:
                data = await anyio.to_thread.run_sync(os.pread, ov.fd, n, pos)
                out.append((pos, n, data))
            pos = stop
        return out

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """base:allocation from the point's map (holes are holes), and the overlay's writes."""
        bs = self.block_size
        ov = self.overlay
        end = min(self.size, offset + length)
        out: list[tuple[int, int]] = []

        def add(n: int, flags: int) -> None:
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + n, flags)
            else:
                out.append((n, flags))

        pos = offset
        while pos < end and len(out) < 100_000:  # a client asks again for the rest
            b = pos // bs
            stop = min(end, (b + 1) * bs)
            hole = self._digest(b) == HOLE
            if ov is not None and ov.touched(pos, stop - pos):
                while pos < stop:
                    u = pos // OVERLAY_UNIT
                    n = min(stop, (u + 1) * OVERLAY_UNIT) - pos
                    state = ov.units[u]
                    zero = state == _ZEROED or (state == _BASE and hole)
                    add(n, STATE_HOLE | STATE_ZERO if zero else 0)
                    pos += n
            else:
                add(stop - pos, STATE_HOLE | STATE_ZERO if hole else 0)
                pos = stop
        return out

    # -- writing (into the overlay only) ------------------------------------------------------------

    async def _unit_content(self, u: int) -> bytearray:
        """The current bytes of overlay unit ``u`` (before a partial write changes them)."""
        ov = self.overlay
        assert ov is not None
        start = u * OVERLAY_UNIT
        n = min(OVERLAY_UNIT, self.size - start)
        if ov.units[u] == _DATA:
            return bytearray(await anyio.to_thread.run_sync(os.pread, ov.fd, n, start))
        buf = bytearray(n)
        if ov.units[u] == _BASE:
            for off, ln, data in await self._base_read(start, n):
                if isinstance(data, BaseException):
                    raise data  # cannot merge a partial write into bytes we cannot read
                if data is not None:
                    buf[off - start:off - start + ln] = data
        return buf

    async def write(self, offset: int, data: bytes) -> None:
        ov = self.overlay
        if ov is None:
            raise ConfigError("the export is read-only")
        await self._apply(offset, len(data), memoryview(data))

    async def write_zeroes(self, offset: int, length: int) -> None:
        if self.overlay is None:
            raise ConfigError("the export is read-only")
        await self._apply(offset, length, None)

    async def _apply(self, offset: int, length: int, data: memoryview | None) -> None:
        ov = self.overlay
        assert ov is not None
        async with ov.lock:  # partial units are read, merged and written whole: one writer at a time
            pos, end = offset, offset + length
            while pos < end:
                u = pos // OVERLAY_UNIT
                ustart = u * OVERLAY_UNIT
                uend = min(self.size, ustart + OVERLAY_UNIT)
                stop = min(end, uend)
                whole = pos == ustart and stop == uend
                if data is None and whole:
                    ov.units[u] = _ZEROED
                elif whole or ov.units[u] == _DATA:
                    chunk = data[pos - offset:stop - offset] if data is not None else bytes(stop - pos)
                    await anyio.to_thread.run_sync(write_all, ov.fd, [chunk], pos)
                    ov.units[u] = _DATA
                else:
                    buf = await self._unit_content(u)
                    buf[pos - ustart:stop - ustart] = data[pos - offset:stop - offset] if data is not None else bytes(stop - pos)
                    await anyio.to_thread.run_sync(write_all, ov.fd, [buf], ustart)
                    ov.units[u] = _DATA
                ov.written_bytes += stop - pos
                pos = stop

    async def flush(self) -> None:
        """Nothing to make durable: the overlay lives only as long as the server."""


async def serve_point(
    store: RepositoryStore,
    manifest: Manifest,
    disks: Sequence[DiskRecord],
    socket_path: str,
    *,
    runtime: Runtime,
    writable: bool = False,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    overlay_dir: str | None = None,
    task_status: Any = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``disks`` of ``manifest`` on a Unix socket until cancelled. Each disk is an export
    named after it; when there is one disk it is also the default export (the empty name).
    ``task_status.started`` gets the server once clients can connect."""
    if not disks:
        raise ConfigError(f"point {manifest.id} has no disk to serve")
    await store.load_index()
    await store.find_unindexed(store.referenced(manifest))
    cache = ChunkCache(store, runtime, cache_bytes)
    devices = {d.name: PointDisk(manifest, d, cache, writable=writable, overlay_dir=overlay_dir) for d in disks}
    try:
        server = NBDServer(devices, default=next(iter(devices)) if len(devices) == 1 else None,
                           description=f"blockferry point {manifest.id}")
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve_unix, socket_path)
            log.info("serving", point=manifest.id, disks=list(devices), socket=socket_path, writable=writable)
            task_status.started(server)
    finally:
        for dev in devices.values():
            dev.close()
        log.info("serve_stopped", point=manifest.id, cache=cache.statistics())


async def serve_repository(
    repo: Any,
    point: str,
    socket_path: str,
    *,
    disk: str | None = None,
    writable: bool = False,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    task_status: Any = anyio.TASK_STATUS_IGNORED,
) -> None:
    """``blockferry serve``: the disks of ``point`` (or only ``disk``) of an open repository, as a
    read session (garbage collection leaves their packs alone) until cancelled."""
    m = await repo.point(point)
    disks = [m.disk(disk)] if disk else list(m.disks)
    async with repo.store.reading("serve"):
        await serve_point(repo.store, m, disks, socket_path, runtime=repo.runtime, writable=writable,
                          cache_bytes=cache_bytes, task_status=task_status)
