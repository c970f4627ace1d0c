"""blockferry's NBD server with an in-memory device, against our client and real tools (nbdinfo,
nbdcopy): the maximum block size it announces is honoured, errors carry offsets, several exports,
writes, and one bad connection never ends the server. (A restore point as the device:
tests.engine.restore.test_serve.py.)"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.to_thread
import pytest
from blockferry.errors import BlockferryError, SourceError
from blockferry.nbd.client import NBDAddress, NBDClient
from blockferry.nbd.server import NBDServer

from tests.conftest import KiB, MiB
from tests.qemu_vm import short_dir

pytestmark = pytest.mark.anyio


class MemoryDevice:
    """A disk in memory; a range marked bad fails to read (as a damaged chunk would)."""

    def __init__(self, size: int, *, writable: bool = False, bad: tuple[int, int] | None = None) -> None:
        self.size = size
        self.writable = writable
        self.data = bytearray(size)
        self.bad = bad
        self.reads: list[tuple[int, int]] = []

    async def read(self, offset: int, length: int) -> Sequence[tuple[int, int, Any]]:
        self.reads.append((offset, length))
        if self.bad and offset < self.bad[0] + self.bad[1] and self.bad[0] < offset + length:
            a = max(offset, self.bad[0])
            pieces: list[tuple[int, int, Any]] = []
            if a > offset:
                pieces.append((offset, a - offset, bytes(self.data[offset:a])))
            err = BlockferryError(f"damaged at offset {a}")
            pieces.append((a, offset + length - a, err))
            return pieces
        chunk = bytes(self.data[offset:offset + length])
        return [(offset, length, None if chunk == bytes(length) else chunk)]

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        return [(length, 0)]

    async def write(self, offset: int, data: bytes) -> None:
        self.data[offset:offset + len(data)] = data

    async def write_zeroes(self, offset: int, length: int) -> None:
        self.data[offset:offset + length] = bytes(length)

    async def flush(self) -> None:
        pass


async def test_max_block_is_honoured_and_exports_are_named() -> None:
    d = short_dir()
    sock = str(d / "s.sock")
    a, b = MemoryDevice(4 * MiB), MemoryDevice(MiB, writable=True)
    a.data[:] = bytes(range(256)) * (4 * MiB // 256)
    server = NBDServer({"a": a, "b": b}, default="a", max_block=64 * KiB)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve_unix, sock)
            c = await NBDClient.connect(NBDAddress(path=sock), "", request_size=MiB)
            try:
                assert c.info.max_block == 64 * KiB and c.request_size == 64 * KiB
                assert await c.pread(100, 3 * MiB) == bytes(a.data[100:100 + 3 * MiB])
                assert max(n for _, n in a.reads) <= 64 * KiB  # the server never got more than it allows
                assert c.stats["peak_inflight"] > 1
                with pytest.raises(SourceError, match="read-only"):
                    await c.write(0, b"x")
            finally:
                await c.aclose()
            w = await NBDClient.connect(NBDAddress(path=sock), "b")
            try:
                await w.write(4096, b"\x55" * (200 * KiB))  # split at the maximum too
                await w.write_zeroes(8192, 4096)
                await w.flush()
                assert await w.pread(4096, 8192) == b"\x55" * 4096 + bytes(4096)
            finally:
                await w.aclose()
            assert b.data[4096 + 8192:4096 + 200 * KiB] == b"\x55" * (200 * KiB - 8192)
            with pytest.raises(SourceError, match="no export 'zz'"):
                await NBDClient.connect(NBDAddress(path=sock), "zz")
            # nbdinfo lists both exports and sees the block size
            out = await anyio.to_thread.run_sync(lambda: subprocess.run(
                ["nbdinfo", "--json", "--list", f"nbd+unix://?socket={sock}"], capture_output=True, text=True))
            assert out.returncode == 0, out.stderr
            exports = {e["export-name"]: e for e in json.loads(out.stdout)["exports"]}
            assert {"a", "b"} <= set(exports), exports
            assert exports["a"]["export-size"] == 4 * MiB and exports["a"]["block_size_maximum"] == 64 * KiB
            await _until_idle(server)
            tg.cancel_scope.cancel()
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def test_read_errors_name_their_offset_and_bad_clients_do_not_end_the_server() -> None:
    d = short_dir()
    sock = str(d / "s.sock")
    dev = MemoryDevice(MiB, bad=(300 * KiB, 10))
    dev.data[:] = b"\x01" * MiB
    server = NBDServer({"x": dev}, default="x")
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve_unix, sock)
            # a client that speaks nonsense
            junk = await anyio.connect_unix(sock)
            await junk.receive()
            await junk.send(b"\xde\xad\xbe\xef" * 8)
            await junk.aclose()
            c = await NBDClient.connect(NBDAddress(path=sock), "x")
            try:
                with pytest.raises(SourceError, match=f"read error at offset {300 * KiB}") as ei:
                    await c.pread(256 * KiB, 128 * KiB)
                assert ei.value.offset == 300 * KiB  # type: ignore[attr-defined]
                assert await c.pread(0, 256 * KiB) == b"\x01" * (256 * KiB)
            finally:
                await c.aclose()
            # nbdcopy meets the same error and fails, rather than copying wrong bytes
            out = await anyio.to_thread.run_sync(lambda: subprocess.run(
                ["nbdcopy", f"nbd+unix:///x?socket={sock}", str(d / "copy")], capture_output=True, text=True))
            assert out.returncode != 0
            await _until_idle(server)
            tg.cancel_scope.cancel()
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def _until_idle(server: NBDServer) -> None:
    """Cancel only once clients are gone (see tests.engine.restore.test_serve.py: an anyio race)."""
    with anyio.fail_after(10):
        while server.connections:
            await anyio.sleep(0.005)
