"""Generic conformance suites for repository backends and source plugins.

Written against the protocols (:mod:`blockferry.repo.backend`, :mod:`blockferry.datapath.source`), never against
an implementation: a plugin's test module subclasses a suite and supplies factories as fixtures.

Backends (``class TestMyBackend(BackendConformance)``) supply:

``backend``
    an async-yield fixture giving a fresh, empty :class:`~blockferry.repo.backend.Backend` (and closing
    it afterwards).
``declared_capabilities``
    the optional capability protocols (:data:`~blockferry.repo.backend.BACKEND_CAPABILITIES`) the
    backend offers: the suite checks it offers exactly those (so dropping one fails a test) and
    tests each one against its written contract.

Sources (``class TestMySource(SourceConformance)``) supply:

``source_plugin``
    the :class:`~blockferry.datapath.source.SourcePlugin` under test.
``make_source_url``
    a callable ``(size, segments) -> url``: a disk of ``size`` bytes, zero everywhere (holes
    where the source can have them) except the ``(offset, bytes)`` segments; the URL opens it.
``missing_source_url``
    ``(url, fragment)``: a URL naming a source that does not exist, and the text (its path) the
    SourceError's message must contain.
``source_options`` (optional)
    the options passed to ``open`` (default ``{}``); parametrize it to run the suite per option set.
``declared_capabilities``
    the optional capability protocols the plugin (:data:`~blockferry.datapath.source.PLUGIN_CAPABILITIES`)
    and the disks it opens with ``source_options`` (:data:`~blockferry.datapath.source.DISK_CAPABILITIES`)
    offer, checked as for backends.

Every async test runs on asyncio and on trio (the ``anyio_backend`` fixture of conftest).
"""

from __future__ import annotations

import ctypes
import datetime as dt
import mmap
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
from blockferry.datapath.source import (
    DISK_CAPABILITIES,
    PLUGIN_CAPABILITIES,
    ChangeTracking,
    Expands,
    MapsBlocking,
    ReadsBlocking,
    SourceDisk,
    SourcePlugin,
)
from blockferry.errors import CorruptionError, ImmutableError, NotFoundError, RepositoryError, SourceError
from blockferry.repo.backend import (
    BACKEND_CAPABILITIES,
    AbortsUploads,
    Backend,
    BackendCapabilities,
    CleansTmp,
    KeyExistsError,
    MapsObjects,
    ObjectInfo,
    PreparesRead,
    Protects,
    ReadsInto,
    Retention,
    StorageClasses,
    Upload,
)
from blockferry.repo.format import DiskRecord

KiB = 1 << 10
MiB = 1 << 20


def rand(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


async def listed(backend: Backend, prefix: str) -> dict[str, int]:
    """``{key: size}`` of what ``list(prefix)`` yields (a key yielded twice is an error)."""
    out: dict[str, int] = {}
    async for info in backend.list(prefix):
        assert isinstance(info, ObjectInfo)
        assert info.key not in out, f"list({prefix!r}) yielded {info.key!r} twice"
        out[info.key] = info.size
    return out


async def upload(backend: Backend, key: str, writes: Sequence[Sequence[bytes | bytearray | memoryview]]) -> int:
    """Write ``writes`` (one ``write`` call per inner sequence) and commit; returns bytes written."""
    up = await backend.open_upload(key)
    total = 0
    try:
        for parts in writes:
            total += await up.write(parts)
        await up.commit()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await up.abort()
        raise
    return total


def names(capabilities: set[type]) -> list[str]:
    return sorted(c.__name__ for c in capabilities)


def offers(obj: object, capability: type, declared: set[type]) -> bool:
    """Whether ``obj`` offers ``capability``; a capability it lacks must not be declared either
    (so a capability test asserts something whether or not the plugin offers it)."""
    if isinstance(obj, capability):
        return True
    assert capability not in declared, f"{obj!r} is declared to offer {capability.__name__} but does not"
    return False


def split(data: bytes, sizes: Sequence[int]) -> list[memoryview]:
    """``data`` cut into consecutive parts of ``sizes`` (which must add up to its length)."""
    assert sum(sizes) == len(data)
    view, out, off = memoryview(data), [], 0
    for n in sizes:
        out.append(view[off:off + n])
        off += n
    return out


class BackendConformance:
    """The contract of :class:`blockferry.repo.backend.Backend` and :class:`~blockferry.repo.backend.Upload`."""

    pytestmark = pytest.mark.anyio

    @pytest.fixture
    async def backend(self) -> AsyncIterator[Backend]:
        raise NotImplementedError("a BackendConformance subclass provides the `backend` fixture")
        yield  # pragma: no cover

    @pytest.fixture
    def declared_capabilities(self) -> set[type]:
        raise NotImplementedError("a BackendConformance subclass names the capabilities its backend offers")

    # -- shape ---------------------------------------------------------------------------------

    async def test_is_a_backend(self, backend: Backend) -> None:
        assert isinstance(backend, Backend)
        assert isinstance(backend.url, str) and backend.url
        assert isinstance(backend.capabilities, BackendCapabilities)
        assert backend.capabilities.max_connections >= 1

    async def test_fresh_backend_is_empty(self, backend: Backend) -> None:
        assert await listed(backend, "") == {}

    # -- put / get -----------------------------------------------------------------------------

    @pytest.mark.parametrize("size", [0, 1, 255, 4097, MiB + 3])
    async def test_put_get_round_trip(self, backend: Backend, size: int) -> None:
        data = (bytes(range(256)) * (size // 256 + 1))[:size] if size < 4096 else rand(size, size)
        await backend.put("config", data)
        await backend.put("points/2024/p1", data[::-1])
        assert await backend.get("config") == data
        assert await backend.get("points/2024/p1") == data[::-1]
        assert (await backend.stat("config")) == ObjectInfo("config", size)
        assert await backend.exists("config")

    async def test_get_with_offset_and_length(self, backend: Backend) -> None:
        data = rand(100_000, 1)
        await backend.put("packs/ab/ab01", data)
        for off, n in [(0, 1), (0, 100_000), (1, 99_999), (4095, 4097), (65_536, 3), (99_999, 1), (12_345, 0)]:
            assert await backend.get("packs/ab/ab01", off, n) == data[off:off + n], (off, n)
        for off in [0, 1, 50_000, 99_999]:
            assert await backend.get("packs/ab/ab01", off) == data[off:], off

    async def test_get_past_the_end_returns_what_exists(self, backend: Backend) -> None:
        data = rand(10_000, 2)
        await backend.put("k", data)
        assert await backend.get("k", 9_990, 100) == data[9_990:]
        assert await backend.get("k", 0, 20_000) == data
        assert await backend.get("k", 10_000, 10) == b""
        assert await backend.get("k", 10_000) == b""
        assert await backend.get("k", 50_000, 10) == b""

    async def test_get_ranges_in_the_order_asked(self, backend: Backend) -> None:
        data = rand(300_000, 3)
        await backend.put("packs/cd/cd02", data)
        ranges = [(200_000, 5), (0, 10), (299_999, 1), (100, 65_536), (0, 10), (150_000, 100_000), (5, 1)]
        got = await backend.get_ranges("packs/cd/cd02", ranges)
        assert got == [data[o:o + n] for o, n in ranges]
        assert await backend.get_ranges("packs/cd/cd02", []) == []

    async def test_missing_key_raises_not_found(self, backend: Backend) -> None:
        await backend.put("present", b"x")
        for key in ["absent", "nope/deeper/key", "presen", "present2"]:
            with pytest.raises(NotFoundError):
                await backend.get(key)
            with pytest.raises(NotFoundError):
                await backend.get(key, 1, 10)
            with pytest.raises(NotFoundError):
                await backend.stat(key)
            with pytest.raises(NotFoundError):
                await backend.get_ranges(key, [(0, 1)])
            assert not await backend.exists(key)

    async def test_key_below_an_object_is_missing(self, backend: Backend) -> None:
        """``config/x`` does not exist because ``config`` does (keys are names, not paths)."""
        await backend.put("config", b"x")
        assert not await backend.exists("config/x")
        with pytest.raises(NotFoundError):
            await backend.stat("config/x")
        with pytest.raises(NotFoundError):
            await backend.get("config/x")
        with pytest.raises(NotFoundError):
            await backend.get_ranges("config/x", [(0, 1)])
        await backend.delete("config/x")  # missing key: not an error
        assert await backend.get("config") == b"x"

    async def test_key_that_is_only_a_prefix_is_missing(self, backend: Backend) -> None:
        """``packs/ab`` is not an object just because ``packs/ab/ab03`` is (object stores have no
        directories): stat and get say NotFoundError, consistently with exists."""
        await backend.put("packs/ab/ab03", b"data")
        for key in ["packs", "packs/ab"]:
            assert not await backend.exists(key)
            with pytest.raises(NotFoundError):
                await backend.stat(key)
            with pytest.raises(NotFoundError):
                await backend.get(key)
        assert await listed(backend, "") == {"packs/ab/ab03": 4}

    async def test_delete_of_a_key_that_is_only_a_prefix_is_a_no_op(self, backend: Backend) -> None:
        await backend.put("packs/ab/ab04", b"data")
        await backend.delete("packs/ab")  # missing key: not an error
        await backend.delete("packs")
        assert await backend.get("packs/ab/ab04") == b"data"

    async def test_put_overwrites(self, backend: Backend) -> None:
        await backend.put("index/0001", rand(5000, 4))
        await backend.put("index/0001", b"short")
        assert await backend.get("index/0001") == b"short"
        assert (await backend.stat("index/0001")).size == 5
        assert await listed(backend, "index/") == {"index/0001": 5}
        await backend.put("index/0001", b"short")  # a retried put is idempotent
        assert await backend.get("index/0001") == b"short"

    async def test_exclusive_put(self, backend: Backend) -> None:
        await backend.put("locks/writer", b"first", exclusive=True)
        with pytest.raises(KeyExistsError) as info:
            await backend.put("locks/writer", b"second, longer", exclusive=True)
        assert isinstance(info.value, RepositoryError) and not info.value.transient
        assert await backend.get("locks/writer") == b"first"
        assert await listed(backend, "") == {"locks/writer": 5}
        # once deleted, the key can be created again
        await backend.delete("locks/writer")
        await backend.put("locks/writer", b"third", exclusive=True)
        assert await backend.get("locks/writer") == b"third"

    async def test_exclusive_put_onto_a_plain_put_key(self, backend: Backend) -> None:
        await backend.put("config", b"cfg")
        with pytest.raises(KeyExistsError):
            await backend.put("config", b"other", exclusive=True)
        assert await backend.get("config") == b"cfg"

    async def test_concurrent_exclusive_puts_have_one_winner(self, backend: Backend) -> None:
        results: dict[int, str] = {}

        async def contender(i: int) -> None:
            try:
                await backend.put("locks/exclusive", b"owner %d" % i, exclusive=True)
                results[i] = "won"
            except KeyExistsError:
                results[i] = "lost"

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(contender, i)
        winners = [i for i, r in results.items() if r == "won"]
        assert len(results) == 8 and len(winners) == 1, results
        assert await backend.get("locks/exclusive") == b"owner %d" % winners[0]

    # -- delete / exists / list ----------------------------------------------------------------

    async def test_delete_is_idempotent(self, backend: Backend) -> None:
        await backend.put("points/a", b"a")
        await backend.put("points/b", b"bb")
        await backend.delete("points/a")
        assert not await backend.exists("points/a")
        with pytest.raises(NotFoundError):
            await backend.get("points/a")
        await backend.delete("points/a")
        await backend.delete("never/was/here")
        assert await backend.get("points/b") == b"bb"
        assert await listed(backend, "") == {"points/b": 2}

    async def test_exists(self, backend: Backend) -> None:
        assert not await backend.exists("config")
        await backend.put("config", b"")
        assert await backend.exists("config")
        assert not await backend.exists("confi")
        assert not await backend.exists("config2")
        await backend.delete("config")
        assert not await backend.exists("config")

    async def test_list_by_prefix(self, backend: Backend) -> None:
        objects = {
            "config": 3,
            "points/p1": 10,
            "points/p2": 11,
            "pointsx": 1,
            "packs/ab/ab01": 100,
            "packs/ab/ab02": 101,
            "packs/ac/ac01": 102,
            "index/0001": 7,
        }
        for key, size in objects.items():
            await backend.put(key, rand(size, size))
        assert await listed(backend, "") == objects
        assert await listed(backend, "points/") == {"points/p1": 10, "points/p2": 11}
        assert await listed(backend, "points") == {"points/p1": 10, "points/p2": 11, "pointsx": 1}
        assert await listed(backend, "po") == {"points/p1": 10, "points/p2": 11, "pointsx": 1}
        assert await listed(backend, "packs/ab/") == {"packs/ab/ab01": 100, "packs/ab/ab02": 101}
        assert await listed(backend, "packs/a") == {"packs/ab/ab01": 100, "packs/ab/ab02": 101, "packs/ac/ac01": 102}
        assert await listed(backend, "packs/ab/ab02") == {"packs/ab/ab02": 101}
        assert await listed(backend, "config") == {"config": 3}
        assert await listed(backend, "missing/") == {}
        assert await listed(backend, "packs/zz/") == {}
        await backend.delete("packs/ab/ab01")
        await backend.put("points/p2", b"1")
        assert await listed(backend, "p") == {"points/p1": 10, "points/p2": 1, "pointsx": 1,
                                               "packs/ab/ab02": 101, "packs/ac/ac01": 102}

    # -- uploads -------------------------------------------------------------------------------

    async def test_upload_is_invisible_until_commit(self, backend: Backend) -> None:
        data = rand(3 * MiB + 5, 5)
        up = await backend.open_upload("packs/ef/ef01")
        assert isinstance(up, Upload)
        assert up.key == "packs/ef/ef01"
        assert await up.write([data[:MiB]]) == MiB
        assert await up.write([data[MiB:]]) == len(data) - MiB
        assert not await backend.exists("packs/ef/ef01")
        with pytest.raises(NotFoundError):
            await backend.get("packs/ef/ef01")
        with pytest.raises(NotFoundError):
            await backend.stat("packs/ef/ef01")
        assert await listed(backend, "") == {}
        await up.commit()
        assert await backend.get("packs/ef/ef01") == data
        assert await listed(backend, "") == {"packs/ef/ef01": len(data)}

    async def test_upload_over_an_existing_key_keeps_the_old_object_until_commit(self, backend: Backend) -> None:
        await backend.put("packs/ef/ef02", b"old object")
        up = await backend.open_upload("packs/ef/ef02")
        await up.write([b"new ", b"object, longer"])
        assert await backend.get("packs/ef/ef02") == b"old object"
        assert await listed(backend, "packs/") == {"packs/ef/ef02": 10}
        await up.commit()
        assert await backend.get("packs/ef/ef02") == b"new object, longer"
        assert await listed(backend, "packs/") == {"packs/ef/ef02": 18}

    async def test_abort_discards_and_is_idempotent(self, backend: Backend) -> None:
        up = await backend.open_upload("packs/aa/aa01")
        await up.write([rand(5 * MiB + 3, 6)])
        await up.abort()
        await up.abort()
        assert not await backend.exists("packs/aa/aa01")
        with pytest.raises(NotFoundError):
            await backend.get("packs/aa/aa01")
        assert await listed(backend, "") == {}
        # nothing written at all
        up = await backend.open_upload("packs/aa/aa02")
        await up.abort()
        await up.abort()
        assert await listed(backend, "") == {}
        # the key is still usable afterwards
        await upload(backend, "packs/aa/aa01", [[b"later"]])
        assert await backend.get("packs/aa/aa01") == b"later"

    async def test_abort_keeps_the_old_object(self, backend: Backend) -> None:
        await backend.put("packs/aa/aa03", b"keep me")
        up = await backend.open_upload("packs/aa/aa03")
        await up.write([b"replacement"])
        await up.abort()
        assert await backend.get("packs/aa/aa03") == b"keep me"

    async def test_failed_writer_leaves_no_object(self, backend: Backend) -> None:
        """The engine's pattern: the writer fails between writes and aborts the upload."""
        class WriterFailed(Exception):
            pass

        async def writer() -> None:
            up = await backend.open_upload("packs/bb/bb01")
            try:
                await up.write([rand(MiB, 7)])
                await up.write([b"x" * 5000])
                raise WriterFailed
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await up.abort()
                raise

        with pytest.raises(WriterFailed):
            await writer()
        assert not await backend.exists("packs/bb/bb01")
        assert await listed(backend, "") == {}

    async def test_cancelled_upload_leaves_no_object(self, backend: Backend) -> None:
        with anyio.CancelScope() as scope:
            up = await backend.open_upload("packs/bb/bb02")
            try:
                await up.write([rand(4 * MiB + 1, 8)])
                scope.cancel()
                await anyio.lowlevel.checkpoint()
                await up.write([b"never written"])
                await up.commit()
            finally:
                with anyio.CancelScope(shield=True):
                    await up.abort()
        assert scope.cancelled_caught
        assert not await backend.exists("packs/bb/bb02")
        assert await listed(backend, "") == {}

    async def test_upload_of_many_odd_parts_crossing_4mib_boundaries(self, backend: Backend) -> None:
        sizes = [3, 5000, MiB + 7, 4 * MiB - 1, 1, 4 * MiB, 4 * MiB + 4095, 2 * MiB - 3, 4096, 511, 3 * MiB + 1]
        data = rand(sum(sizes), 9)
        parts = split(data, sizes)
        writes = [parts[0:1], parts[1:3], parts[3:4], parts[4:6], parts[6:9], parts[9:10], parts[10:]]
        assert await upload(backend, "packs/cc/cc01", writes) == len(data)
        assert (await backend.stat("packs/cc/cc01")).size == len(data)
        assert await backend.get("packs/cc/cc01") == data
        edges = [(k * 4 * MiB - 5, 10) for k in range(1, len(data) // (4 * MiB) + 1)]
        edges.append((len(data) - 7, 7))
        assert await backend.get_ranges("packs/cc/cc01", edges) == [data[o:o + n] for o, n in edges]

    @pytest.mark.parametrize("total", [1, 3, 4095, 4096, 4097, 4 * MiB - 1, 4 * MiB, 4 * MiB + 1, 8 * MiB + 4096])
    async def test_upload_sizes_around_page_and_buffer_boundaries(self, backend: Backend, total: int) -> None:
        data = rand(total, total)
        step = 65_537
        sizes = [min(step, total - o) for o in range(0, total, step)]
        await upload(backend, "packs/dd/dd01", [split(data, sizes)])
        assert await backend.get("packs/dd/dd01") == data
        assert await listed(backend, "packs/") == {"packs/dd/dd01": total}

    async def test_upload_of_thousands_of_parts_in_one_write(self, backend: Backend) -> None:
        sizes = [(i * 7919) % 1500 + 1 for i in range(3000)]
        data = rand(sum(sizes), 10)
        assert await upload(backend, "packs/dd/dd02", [split(data, sizes)]) == len(data)
        assert await backend.get("packs/dd/dd02") == data

    async def test_upload_accepts_every_buffer_type_and_copies_it(self, backend: Backend) -> None:
        """bytes, bytearray and (offset) memoryview parts; a caller may reuse its buffers as soon as
        ``write`` returns (the engine's buffer pools do)."""
        a, b, c = rand(5000, 11), bytearray(rand(70_000, 12)), bytearray(rand(4 * MiB + 9, 13))
        expect = a + bytes(b) + bytes(c[3:-3]) + b"tail"
        up = await backend.open_upload("packs/ee/ee01")
        try:
            assert await up.write([a, b, memoryview(c)[3:-3]]) == len(expect) - 4
            b[:] = bytes(len(b))  # reused by the caller
            c[:] = bytes(len(c))
            assert await up.write([memoryview(b"tail")]) == 4
            await up.commit()
        except BaseException:
            await up.abort()
            raise
        assert await backend.get("packs/ee/ee01") == expect

    async def test_concurrent_uploads_do_not_mix(self, backend: Backend) -> None:
        datas = {f"packs/ff/ff{i:02d}": rand(2 * MiB + 1000 * i + 1, 20 + i) for i in range(5)}

        async def one(key: str, data: bytes) -> None:
            third = len(data) // 3
            up = await backend.open_upload(key)
            for part in (data[:third], data[third:2 * third], data[2 * third:]):
                await up.write([part])
                await anyio.lowlevel.checkpoint()
            await up.commit()

        async with anyio.create_task_group() as tg:
            for key, data in datas.items():
                tg.start_soon(one, key, data)
        assert await listed(backend, "packs/") == {k: len(v) for k, v in datas.items()}
        for key, data in datas.items():
            assert await backend.get(key) == data, key

    async def test_concurrent_puts_all_land(self, backend: Backend) -> None:
        datas = {f"index/{i:04d}": rand(100 + 37 * i, 40 + i) for i in range(24)}

        async def one(key: str, data: bytes) -> None:
            await backend.put(key, data)

        async with anyio.create_task_group() as tg:
            for key, data in datas.items():
                tg.start_soon(one, key, data)
        assert await listed(backend, "index/") == {k: len(v) for k, v in datas.items()}
        for key, data in datas.items():
            assert await backend.get(key) == data

    # -- health --------------------------------------------------------------------------------

    async def test_check_writable_on_a_healthy_backend(self, backend: Backend) -> None:
        assert await backend.check_writable() is None
        assert await listed(backend, "") == {}  # no probe left visible

    async def test_free_space(self, backend: Backend) -> None:
        free = await backend.free_space()
        assert free is None or (type(free) is int and free >= 0), free


    # -- optional capabilities -----------------------------------------------------------------

    async def test_declares_exactly_its_capabilities(self, backend: Backend, declared_capabilities: set[type]) -> None:
        assert declared_capabilities <= set(BACKEND_CAPABILITIES)
        offered = {c for c in BACKEND_CAPABILITIES if isinstance(backend, c)}
        assert offered == declared_capabilities, f"offers {names(offered)}, declared {names(declared_capabilities)}"

    async def test_protects(self, backend: Backend, declared_capabilities: set[type]) -> None:
        if not offers(backend, Protects, declared_capabilities):
            return
        assert isinstance(backend, Protects)
        key = "points/p1"
        await backend.put(key, b"manifest")
        when = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + dt.timedelta(minutes=2)
        until = when.isoformat()
        try:
            done = await backend.protect(key, until)
            assert type(done) is bool
            assert await backend.protect(key, until) is done  # idempotent
            assert await backend.get(key) == b"manifest"  # still readable
            if done:
                with pytest.raises(ImmutableError):
                    await backend.delete(key)
                assert await backend.get(key) == b"manifest"
                if isinstance(backend, Retention):
                    locked = await backend.locked_until(key)
                    assert locked is not None and dt.datetime.fromisoformat(locked) >= when
                with pytest.raises(NotFoundError):
                    await backend.protect("points/absent", until)
            else:
                try:
                    assert await backend.protect("points/absent", until) is False
                except NotFoundError:
                    pass
        finally:
            lifted = await backend.unprotect(key)
        assert type(lifted) is bool
        assert await backend.unprotect(key) is lifted  # idempotent
        assert await backend.unprotect("points/absent") is False
        if not done or lifted:
            await backend.delete(key)
            assert not await backend.exists(key)

    async def test_unprotect_of_an_unprotected_object_keeps_it(self, backend: Backend,
                                                              declared_capabilities: set[type]) -> None:
        if not offers(backend, Protects, declared_capabilities):
            return
        assert isinstance(backend, Protects)
        await backend.put("packs/ab/ab01", b"data")
        assert type(await backend.unprotect("packs/ab/ab01")) is bool
        assert await backend.get("packs/ab/ab01") == b"data"
        await backend.delete("packs/ab/ab01")
        assert not await backend.exists("packs/ab/ab01")

    async def test_retention(self, backend: Backend, declared_capabilities: set[type]) -> None:
        if not offers(backend, Retention, declared_capabilities):
            return
        assert isinstance(backend, Retention)
        await backend.put("packs/ab/ab02", b"data")
        assert await backend.locked_until("packs/ab/ab02") is None  # never protected
        assert await backend.locked_until("packs/ab/absent") is None

    async def test_aborts_uploads_left_by_dead_writers(self, backend: Backend,
                                                       declared_capabilities: set[type]) -> None:
        if not offers(backend, AbortsUploads, declared_capabilities):
            return
        assert isinstance(backend, AbortsUploads)
        assert await backend.abort_incomplete_uploads() == 0  # a fresh backend has none
        up = await backend.open_upload("packs/aa/aa01")
        await up.write([rand(7 * MiB, 30)])  # past a multipart threshold: the storage holds it
        # the writer dies here: neither commit nor abort
        assert await backend.abort_incomplete_uploads(older_than=3600.0) == 0  # too young
        n = await backend.abort_incomplete_uploads()
        assert type(n) is int and n >= 0
        assert await backend.abort_incomplete_uploads() == 0  # idempotent: nothing left
        assert await listed(backend, "") == {}
        await up.abort()  # the writer's own abort, late, is still harmless
        # an upload that commits after an abort of only old ones is whole
        data = rand(7 * MiB, 31)
        up = await backend.open_upload("packs/aa/aa02")
        await up.write([data])
        assert await backend.abort_incomplete_uploads(older_than=3600.0) == 0
        await up.commit()
        assert await backend.get("packs/aa/aa02") == data

    async def test_clean_tmp_keeps_live_uploads(self, backend: Backend, declared_capabilities: set[type]) -> None:
        if not offers(backend, CleansTmp, declared_capabilities):
            return
        assert isinstance(backend, CleansTmp)
        assert await anyio.to_thread.run_sync(backend.clean_tmp) == 0
        data = rand(3 * MiB, 32)
        up = await backend.open_upload("packs/bb/bb01")
        await up.write([data[:MiB]])
        # this process's own upload stays, however old
        removed = await anyio.to_thread.run_sync(lambda: backend.clean_tmp(older_than=0.0))
        assert removed == 0
        await up.write([data[MiB:]])
        await up.commit()
        assert await backend.get("packs/bb/bb01") == data
        assert await anyio.to_thread.run_sync(backend.clean_tmp) == 0
        assert await listed(backend, "") == {"packs/bb/bb01": len(data)}

    async def test_prepare_read(self, backend: Backend, declared_capabilities: set[type]) -> None:
        if not offers(backend, PreparesRead, declared_capabilities):
            return
        assert isinstance(backend, PreparesRead)
        data = rand(10_000, 33)
        await backend.put("packs/cc/cc01", data)
        said: list[str] = []
        assert await backend.prepare_read(["packs/cc/cc01"], said.append) == 0  # nothing archived
        assert await backend.prepare_read(["packs/cc/cc01", "packs/cc/absent", "points/p1"], None) == 0
        assert await backend.prepare_read([], None) == 0
        assert all(isinstance(s, str) for s in said)
        assert await backend.get("packs/cc/cc01") == data

    async def test_storage_classes(self, backend: Backend, declared_capabilities: set[type]) -> None:
        if not offers(backend, StorageClasses, declared_capabilities):
            return
        assert isinstance(backend, StorageClasses)
        assert isinstance(backend.archive_class, str) and backend.archive_class
        data = rand(10_000, 34)
        await backend.put("packs/dd/dd01", data)
        current = await backend.storage_class("packs/dd/dd01")
        assert isinstance(current, str) and current
        assert await backend.set_storage_class("packs/dd/dd01", current) is False  # there already
        assert await backend.storage_class("packs/dd/dd01") == current
        assert await backend.get("packs/dd/dd01") == data
        with pytest.raises(NotFoundError):
            await backend.storage_class("packs/dd/absent")
        with pytest.raises(NotFoundError):
            await backend.set_storage_class("packs/dd/absent", current)

    @pytest.mark.parametrize("offset,length", [(0, 100), (5, 4 * MiB), (MiB, MiB + 17), (4 * MiB, 2 * MiB)])
    async def test_get_into(self, backend: Backend, declared_capabilities: set[type], offset: int, length: int) -> None:
        if not offers(backend, ReadsInto, declared_capabilities):
            return
        assert isinstance(backend, ReadsInto)
        data = rand(5 * MiB, 35)
        await backend.put("packs/ee/ee01", data)
        want = data[offset:offset + length]
        for buffer in (bytearray(length), bytearray(length + 100), bytearray(10)):  # fits, roomy, too small
            got = await backend.get_into("packs/ee/ee01", offset, length, buffer)
            assert bytes(got) == want, (len(buffer), offset, length)
            assert bytes(got) == await backend.get("packs/ee/ee01", offset, length)
        with pytest.raises(NotFoundError):
            await backend.get_into("packs/ee/absent", 0, 10, bytearray(10))

    async def test_map_sync(self, backend: Backend, declared_capabilities: set[type]) -> None:
        if not offers(backend, MapsObjects, declared_capabilities):
            return
        assert isinstance(backend, MapsObjects)
        data = rand(3 * MiB + 5, 36)
        await backend.put("packs/ff/ff01", data)
        for size in (1, 4096, len(data)):
            m = await anyio.to_thread.run_sync(backend.map_sync, "packs/ff/ff01", size)
            try:
                assert len(m) == size and m[:] == data[:size]
            finally:
                m.close()
        with pytest.raises(CorruptionError):
            await anyio.to_thread.run_sync(backend.map_sync, "packs/ff/ff01", len(data) + 1)
        with pytest.raises(NotFoundError):
            await anyio.to_thread.run_sync(backend.map_sync, "packs/ff/absent", 10)


# =================================================================================================
# Sources
# =================================================================================================

MakeSourceUrl = Callable[[int, Sequence[tuple[int, bytes]]], str]


@dataclass
class Image:
    url: str
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


def image_bytes(size: int, segments: Sequence[tuple[int, bytes]]) -> bytes:
    out = bytearray(size)
    for off, chunk in segments:
        out[off:off + len(chunk)] = chunk
    return bytes(out)


#: 3 MiB + 12345 bytes: not a multiple of any block size; data, explicit zeros and holes
MIXED_SIZE = 3 * MiB + 12_345


def mixed_segments(size: int = MIXED_SIZE) -> list[tuple[int, bytes]]:
    text = b"".join(b"Nov 21 10:00:00 host app[123]: request %05d served\n" % i for i in range(4000))
    return [
        (0, rand(5000, 100)),                       # data at the very start, ends mid-page
        (70_000, b"\x01"),                           # a lone byte inside a hole
        (300_000, text[:200_000]),                   # compressible data
        (600_000, bytes(100_000)),                   # explicit zeros (not a hole)
        (MiB + 4096, rand(64 * KiB, 101)),           # page-aligned data
        (2 * MiB + 77, b"\xff" * 13),                # a few bytes at an odd offset
        (3 * MiB - 1, b"\x7f\x80"),                  # across the 3 MiB boundary
        (size - 3000, rand(3000, 102)),              # the tail, in the last partial block
    ]


def check_extents(extents: list[tuple[int, int]] | None, data: bytes) -> None:
    """Sorted, disjoint, within the disk, and covering every non-zero byte."""
    if extents is None:
        return
    size, prev_end = len(data), 0
    rest = bytearray(data)
    for off, n in extents:
        assert type(off) is int and type(n) is int, (off, n)
        assert n >= 0 and off >= prev_end and off + n <= size, f"bad extent {(off, n)} in {extents} (size {size})"
        prev_end = off + n
        rest[off:off + n] = bytes(n)
    if rest != bytes(size):
        first = size - len(rest.lstrip(b"\0"))
        pytest.fail(f"non-zero byte at offset {first} lies outside every data extent {extents}")


class SourceConformance:
    """The contract of :class:`blockferry.datapath.source.SourcePlugin` and :class:`~blockferry.datapath.source.SourceDisk`."""

    pytestmark = pytest.mark.anyio

    # -- what a subclass provides --------------------------------------------------------------

    @pytest.fixture
    def source_plugin(self) -> SourcePlugin:
        raise NotImplementedError("a SourceConformance subclass provides the `source_plugin` fixture")

    @pytest.fixture
    def make_source_url(self) -> MakeSourceUrl:
        raise NotImplementedError("a SourceConformance subclass provides the `make_source_url` fixture")

    @pytest.fixture
    def missing_source_url(self) -> tuple[str, str]:
        raise NotImplementedError("a SourceConformance subclass provides the `missing_source_url` fixture")

    @pytest.fixture
    def source_options(self) -> dict[str, Any]:
        return {}

    @pytest.fixture
    def declared_capabilities(self) -> set[type]:
        raise NotImplementedError("a SourceConformance subclass names the capabilities its plugin and disks offer")

    # -- built on it ---------------------------------------------------------------------------

    @pytest.fixture
    def make_image(self, make_source_url: MakeSourceUrl) -> Callable[[int, Sequence[tuple[int, bytes]]], Image]:
        def make(size: int, segments: Sequence[tuple[int, bytes]]) -> Image:
            return Image(make_source_url(size, segments), image_bytes(size, segments))
        return make

    @pytest.fixture
    def image(self, make_image: Callable[..., Image]) -> Image:
        return make_image(MIXED_SIZE, mixed_segments())

    @pytest.fixture
    async def open_source(self, source_plugin: SourcePlugin,
                          source_options: dict[str, Any]) -> AsyncIterator[Callable[[str], Awaitable[SourceDisk]]]:
        opened: list[SourceDisk] = []

        async def open_(url: str) -> SourceDisk:
            disk = await source_plugin.open(url, source_options)
            opened.append(disk)
            return disk

        yield open_
        for disk in opened:
            await disk.aclose()

    @pytest.fixture
    async def disk(self, image: Image, open_source: Callable[[str], Awaitable[SourceDisk]]) -> SourceDisk:
        return await open_source(image.url)

    @staticmethod
    async def read(disk: SourceDisk, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        n = await disk.read_into(offset, [buf])
        return bytes(buf[:n])

    # -- the tests -----------------------------------------------------------------------------

    async def test_attributes(self, disk: SourceDisk, image: Image, source_plugin: SourcePlugin) -> None:
        assert isinstance(source_plugin, SourcePlugin)
        assert isinstance(disk, SourceDisk)
        assert disk.size == image.size and type(disk.size) is int
        assert isinstance(disk.name, str) and disk.name
        assert disk.name == source_plugin.disk_name(image.url)
        assert isinstance(disk.identity, dict) and disk.identity
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in disk.identity.items()), disk.identity
        assert isinstance(disk.metadata, dict)
        assert disk.change_id is None or isinstance(disk.change_id, str)
        assert isinstance(disk.url, str) and disk.url

    async def test_identity_differs_between_disks(self, make_image: Callable[..., Image],
                                                  open_source: Callable[[str], Awaitable[SourceDisk]]) -> None:
        a = await open_source(make_image(MiB, [(0, b"a")]).url)
        b = await open_source(make_image(MiB, [(0, b"a")]).url)
        assert a.identity != b.identity

    async def test_read_whole_image(self, disk: SourceDisk, image: Image) -> None:
        buf = bytearray(image.size)
        assert await disk.read_into(0, [buf]) == image.size
        assert buf == image.data

    @pytest.mark.parametrize("offset,length", [
        (0, 1), (0, 4096), (1, 4095), (4095, 2), (4999, 2), (69_999, 3), (70_000, 1), (299_999, 200_002),
        (MiB, 64 * KiB), (MiB + 4095, 64 * KiB + 2), (2 * MiB + 70, 30), (3 * MiB - 2, 4), (3 * MiB - 4096, 8192),
    ])
    async def test_read_at_any_offset(self, disk: SourceDisk, image: Image, offset: int, length: int) -> None:
        buf = bytearray(b"\xaa" * length)  # not zeros: holes must be filled with zeros
        assert await disk.read_into(offset, [buf]) == length
        assert buf == image.data[offset:offset + length]

    async def test_read_spanning_several_buffers(self, disk: SourceDisk, image: Image) -> None:
        sizes = [3, 4096, 65_536, 1, 100_000, 4093, 300_000]
        backing = bytearray(b"\xaa" * (sum(sizes) + 10))
        view = memoryview(backing)
        bufs: list[bytearray | memoryview] = []
        off = 5
        for i, n in enumerate(sizes):  # bytearrays and memoryview slices, like the mover's views
            bufs.append(view[off:off + n] if i % 2 else bytearray(b"\xaa" * n))
            off += n
        for start in [0, 4999, 69_998, 599_999, MiB + 1]:
            assert await disk.read_into(start, bufs) == sum(sizes)
            assert b"".join(bytes(b) for b in bufs) == image.data[start:start + sum(sizes)], start
        assert backing[:5] == b"\xaa" * 5 and backing[-5:] == b"\xaa" * 5  # nothing outside the views

    async def test_read_into_thousands_of_buffers(self, disk: SourceDisk, image: Image) -> None:
        """A batch may hold many blocks: the number of buffers is not limited (e.g. by IOV_MAX)."""
        bufs = [bytearray(512) for _ in range(2048)]
        assert await disk.read_into(4096, bufs) == 2048 * 512
        assert b"".join(bufs) == image.data[4096:4096 + MiB]

    @pytest.mark.parametrize("block", [4096, 64 * KiB, MiB])
    async def test_short_read_only_at_the_end(self, disk: SourceDisk, image: Image, block: int) -> None:
        got = bytearray()
        for off in range(0, image.size, block):
            buf = bytearray(b"\xaa" * block)
            n = await disk.read_into(off, [buf])
            assert n == min(block, image.size - off), (off, n)
            got += buf[:n]
        assert got == image.data
        # the last partial block through two buffers, the second one past the end
        last = image.size // block * block
        a, b = bytearray(b"\xaa" * (block // 2)), bytearray(b"\xaa" * block)
        n = await disk.read_into(last, [a, b])
        assert n == image.size - last
        assert (bytes(a) + bytes(b))[:n] == image.data[last:]
        # nothing at or past the end
        assert await disk.read_into(image.size, [bytearray(block)]) == 0

    async def test_concurrent_reads(self, disk: SourceDisk, image: Image) -> None:
        results: dict[int, bytes] = {}

        async def reader(off: int) -> None:
            for _ in range(3):
                buf = bytearray(100_000)
                view = memoryview(buf)
                n = await disk.read_into(off, [view[:50_000], view[50_000:]])
                results[off] = bytes(buf[:n])

        offsets = [0, 250_000, 550_000, MiB, 2 * MiB, image.size - 100_000]
        async with anyio.create_task_group() as tg:
            for off in offsets:
                tg.start_soon(reader, off)
        for off in offsets:
            assert results[off] == image.data[off:off + 100_000], off

    @pytest.mark.parametrize("layout", ["mixed", "holes-only", "dense", "data-at-end"])
    async def test_data_extents_cover_every_non_zero_byte(self, make_image: Callable[..., Image],
                                                          open_source: Callable[[str], Awaitable[SourceDisk]],
                                                          layout: str) -> None:
        if layout == "mixed":
            img = make_image(MIXED_SIZE, mixed_segments())
        elif layout == "holes-only":
            img = make_image(2 * MiB + 5, [])
        elif layout == "dense":
            img = make_image(MiB + 1, [(0, rand(MiB + 1, 103))])
        else:
            img = make_image(4 * MiB + 1, [(4 * MiB, b"\x01\x02")])
        disk = await open_source(img.url)
        extents = await disk.data_extents()
        assert extents is None or isinstance(extents, list)
        check_extents(extents, img.data)
        if layout == "holes-only" and extents is not None:
            buf = bytearray(b"\xaa" * img.size)
            assert await disk.read_into(0, [buf]) == img.size and buf == img.data

    async def test_declares_exactly_its_capabilities(self, disk: SourceDisk, source_plugin: SourcePlugin,
                                                     declared_capabilities: set[type]) -> None:
        assert declared_capabilities <= set(PLUGIN_CAPABILITIES + DISK_CAPABILITIES)
        offered = {c for c in PLUGIN_CAPABILITIES if isinstance(source_plugin, c)}
        offered |= {c for c in DISK_CAPABILITIES if isinstance(disk, c)}
        assert offered == declared_capabilities, f"offers {names(offered)}, declared {names(declared_capabilities)}"

    async def test_read_blocking_matches_read_into(self, disk: SourceDisk, image: Image,
                                                   declared_capabilities: set[type]) -> None:
        if not offers(disk, ReadsBlocking, declared_capabilities):
            return
        assert isinstance(disk, ReadsBlocking)
        read_blocking = disk.read_blocking
        for off, sizes in [(0, [image.size]), (4999, [1, 4096, 70_000]), (MiB + 4095, [64 * KiB + 2]),
                           (image.size - 5000, [4096, 4096])]:
            bufs = [bytearray(b"\xaa" * n) for n in sizes]
            n = await anyio.to_thread.run_sync(read_blocking, off, bufs)
            want = min(sum(sizes), image.size - off)
            assert n == want
            assert b"".join(bufs)[:n] == image.data[off:off + n] == await self.read(disk, off, sum(sizes))

    async def test_map_blocking_matches_the_image(self, disk: SourceDisk, image: Image,
                                                  declared_capabilities: set[type]) -> None:
        if not offers(disk, MapsBlocking, declared_capabilities):
            return
        assert isinstance(disk, MapsBlocking)
        map_blocking = disk.map_blocking
        g = mmap.ALLOCATIONGRANULARITY
        tail = image.size // g * g
        for off, n in [(0, image.size), (0, g), (g, 300_000), (MiB, MiB), (tail, image.size - tail)]:
            m = await anyio.to_thread.run_sync(map_blocking, off, n)
            try:
                assert len(m) == n
                assert m[:] == image.data[off:off + n], (off, n)
            finally:
                m.close()

    async def test_mapping_is_writable_and_private(self, disk: SourceDisk, image: Image,
                                                   declared_capabilities: set[type]) -> None:
        """The engine takes a C pointer to the mapping (it must be writable); a write to it must
        never reach the disk (the mapping is private)."""
        if not offers(disk, MapsBlocking, declared_capabilities):
            return
        assert isinstance(disk, MapsBlocking)
        m = await anyio.to_thread.run_sync(disk.map_blocking, 0, 2 * mmap.ALLOCATIONGRANULARITY)
        try:
            anchor = ctypes.c_char.from_buffer(m)
            assert ctypes.addressof(anchor)
            del anchor
            m[0:4] = b"\xde\xad\xbe\xef"
        finally:
            m.close()
        assert await self.read(disk, 0, 16) == image.data[:16]

    async def test_open_missing_source(self, source_plugin: SourcePlugin, missing_source_url: tuple[str, str],
                                       source_options: dict[str, Any]) -> None:
        url, fragment = missing_source_url
        with pytest.raises(SourceError) as info:
            await source_plugin.open(url, source_options)
        assert fragment in str(info.value)

    async def test_aclose(self, source_plugin: SourcePlugin, image: Image, source_options: dict[str, Any]) -> None:
        disk = await source_plugin.open(image.url, source_options)
        assert await self.read(disk, 0, 100) == image.data[:100]
        assert await disk.aclose() is None
        # a closed disk can be opened again
        again = await source_plugin.open(image.url, source_options)
        try:
            assert await self.read(again, image.size - 10, 10) == image.data[-10:]
        finally:
            await again.aclose()

    async def test_change_tracking_without_a_base_of_its_own(self, source_plugin: SourcePlugin, image: Image,
                                                             source_options: dict[str, Any],
                                                             declared_capabilities: set[type]) -> None:
        """A base this source's tracking did not write: the whole disk is read (None), and the
        reason says why; ``finish`` after ``aclose`` is harmless whether committed or not."""
        for committed in (False, True):
            disk = await source_plugin.open(image.url, source_options)
            try:
                if not offers(disk, ChangeTracking, declared_capabilities):
                    return
                assert isinstance(disk, ChangeTracking)
                for change_id in (None, "elsewhere:0123456789ab"):
                    base = DiskRecord(name=disk.name, size=disk.size, source=image.url, change_id=change_id)
                    extents, why = await disk.changed_extents(base)
                    assert extents is None, (change_id, extents)
                    assert isinstance(why, str) and why, change_id
                assert await self.read(disk, 0, 100) == image.data[:100]
            finally:
                await disk.aclose()
            assert await disk.finish(committed) is None

    async def test_expand_of_a_single_disk_is_itself(self, source_plugin: SourcePlugin, image: Image,
                                                     declared_capabilities: set[type]) -> None:
        if not offers(source_plugin, Expands, declared_capabilities):
            return
        assert isinstance(source_plugin, Expands)
        assert await source_plugin.expand(image.url) == [image.url]
        assert await source_plugin.expand(image.url) == [image.url]  # no side effects
