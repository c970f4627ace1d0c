"""The async NBD client against a real ``qemu-nbd``: handshake, meta contexts, block status, reads
across holes, pipelining, the server's block size limits, errors with their offset, disconnect.
(blockferry's own NBD server is tested against it and against nbdinfo/qemu-img in
tests.engine.restore.test_serve.py.)"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from blockferry.errors import SourceError
from blockferry.nbd.client import STATE_DIRTY, STATE_HOLE, STATE_ZERO, NBDAddress, NBDClient, parse_nbd_url

from tests.conftest import KiB, MiB
from tests.qemu_vm import QemuNbd, qcow2, qemu_io, require_qemu, short_dir

pytestmark = pytest.mark.anyio

SIZE = 64 * MiB


@pytest.fixture(scope="module")
def image() -> Iterator[tuple[Path, bytes]]:
    """A qcow2 image with data, an explicit zero range, holes and a bitmap ``b0`` that saw one
    write; returns it and its content."""
    require_qemu()
    d = short_dir()
    img = qcow2(d / "d.qcow2", SIZE, "write -P 0x11 1M 2M", "write -z 8M 1M", "write -P 0x33 63M 1M")
    subprocess.run(["qemu-img", "bitmap", "--add", "--enable", str(img), "b0"], check=True)
    qemu_io(img, "write -P 0x22 20M 64k")
    data = bytearray(SIZE)
    data[1 * MiB:3 * MiB] = b"\x11" * (2 * MiB)
    data[20 * MiB:20 * MiB + 64 * KiB] = b"\x22" * (64 * KiB)
    data[63 * MiB:] = b"\x33" * MiB
    yield img, bytes(data)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def server(image: tuple[Path, bytes]) -> Iterator[Path]:
    img, _ = image
    srv = QemuNbd(img, img.parent / "nbd.sock", "--read-only", "--format=qcow2", "--bitmap=b0", "--export-name=vda")
    yield srv.sock
    srv.stop()


async def test_handshake_contexts_and_block_status(server: Path) -> None:
    c = await NBDClient.connect(NBDAddress(path=str(server)), "vda",
                                meta_contexts=["base:allocation", "qemu:dirty-bitmap:b0"])
    try:
        assert c.size == SIZE and c.info.read_only and c.info.structured
        assert set(c.info.contexts) == {"base:allocation", "qemu:dirty-bitmap:b0"}
        assert 0 < c.info.max_block <= 32 * MiB
        alloc = await c.block_status("base:allocation")
        assert sum(n for _, n, _ in alloc) == SIZE  # the whole export, merged across replies
        data = [(o, n) for o, n, f in alloc if not f & STATE_ZERO]
        assert data == [(1 * MiB, 2 * MiB), (20 * MiB, 64 * KiB), (63 * MiB, 1 * MiB)]
        # written as zeros (dirty for a bitmap, but never to be read): reported zero
        assert any(o <= 8 * MiB and o + n >= 9 * MiB and f & STATE_ZERO for o, n, f in alloc)
        assert all(f & STATE_HOLE for o, n, f in alloc if o == 0)
        dirty = [(o, n) for o, n, f in await c.block_status("qemu:dirty-bitmap:b0") if f & STATE_DIRTY]
        assert dirty == [(20 * MiB, 64 * KiB)]
        # a range in the middle
        part = await c.block_status("base:allocation", 2 * MiB, 2 * MiB)
        assert part[0] == (2 * MiB, 1 * MiB, 0) and sum(n for _, n, _ in part) == 2 * MiB
        with pytest.raises(SourceError, match="did not grant"):
            await c.block_status("qemu:dirty-bitmap:nope")
    finally:
        await c.aclose()


async def test_reads_across_holes_pipelined_and_split_at_max_block(server: Path, image: tuple[Path, bytes]) -> None:
    _, content = image
    # a request size above the server's maximum is cut down to it
    c = await NBDClient.connect(f"nbd+unix:///vda?socket={server}", request_size=1 << 30, max_inflight=8)
    try:
        assert c.request_size == c.info.max_block
        whole = bytearray(SIZE)
        n = await c.read_into(0, [memoryview(whole)[:SIZE // 2], memoryview(whole)[SIZE // 2:]])
        assert n == SIZE and whole == content
        assert c.stats["requests"] == SIZE // c.info.max_block
        # many readers at once, odd offsets and lengths across data/hole boundaries
        got: dict[tuple[int, int], bytes] = {}

        async def one(off: int, ln: int) -> None:
            got[off, ln] = await c.pread(off, ln)

        spans = [(1 * MiB - 4097, 8191), (3 * MiB - 1, 2), (20 * MiB - 100, 64 * KiB + 200), (63 * MiB - 5, 100),
                 (SIZE - 10, 10), (7 * MiB, 3 * MiB)] + [(i * MiB, MiB) for i in range(16)]
        async with anyio.create_task_group() as tg:
            for off, ln in spans:
                tg.start_soon(one, off, ln)
        for off, ln in spans:
            assert got[off, ln] == content[off:off + ln], (off, ln)
        assert c.stats["peak_inflight"] > 1
        # reading past the end is short, never an error
        assert await c.pread(SIZE - 3, 10) == content[-3:]
    finally:
        await c.aclose()


async def test_server_error_carries_the_offset(tmp_path: Path) -> None:
    require_qemu()
    d = short_dir()
    try:
        raw = d / "e.raw"
        raw.write_bytes(b"\x11" * (16 * MiB))
        opts = {"driver": "raw", "file": {"driver": "blkdebug", "image": {"driver": "file", "filename": str(raw)},
                                          "inject-error": [{"event": "read_aio", "errno": 5, "sector": 8192}]}}
        srv = QemuNbd(Path(f"json:{json.dumps(opts)}"), d / "s.sock", "--read-only")
        try:
            c = await NBDClient.connect(NBDAddress(path=str(d / "s.sock")), "")
            try:
                assert await c.pread(0, 64 * KiB) == b"\x11" * (64 * KiB)
                # qemu-nbd answers a failed sparse read by dropping the connection (not an error
                # chunk): the client says so, with the offset of the read
                with pytest.raises(SourceError, match=f"closed the connection.*at offset {4 * MiB - 64 * KiB}") as ei:
                    await c.pread(4 * MiB - 64 * KiB, 256 * KiB)
                assert ei.value.offset == 4 * MiB - 64 * KiB  # type: ignore[attr-defined]
                with pytest.raises(SourceError, match="closed"):
                    await c.pread(8 * MiB, 4)
            finally:
                await c.aclose()
        finally:
            srv.stop()
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def test_clean_disconnect_and_refusals(image: tuple[Path, bytes]) -> None:
    img, content = image
    sock = img.parent / "once.sock"
    sock.unlink(missing_ok=True)
    # not --persistent: qemu-nbd exits once its client has gone, with status 0 after a clean DISC
    proc = subprocess.Popen(["qemu-nbd", "--read-only", "--format=qcow2", "--socket", str(sock), "--export-name=x",
                             str(img)], stderr=subprocess.PIPE)
    try:
        with anyio.fail_after(20):
            while True:  # listening (a probe that leaves before negotiating does not end qemu-nbd)
                try:
                    await (await anyio.connect_unix(str(sock))).aclose()
                    break
                except OSError:
                    await anyio.sleep(0.02)
        with pytest.raises(SourceError, match="refused export"):
            await NBDClient.connect(NBDAddress(path=str(sock)), "no-such-export")
        c = await NBDClient.connect(NBDAddress(path=str(sock)), "x")
        assert await c.pread(63 * MiB, 4) == content[63 * MiB:63 * MiB + 4]
        await c.aclose()
        await c.aclose()  # idempotent
        with pytest.raises(SourceError, match="closed"):
            await c.pread(0, 1)
        assert await anyio.to_thread.run_sync(proc.wait, 20) == 0
        assert b"error" not in (proc.stderr.read() if proc.stderr else b"").lower()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_parse_nbd_url() -> None:
    a, e = parse_nbd_url("nbd+unix:///disk%201?socket=/run/x.sock")
    assert (a.path, e) == ("/run/x.sock", "disk 1")
    a, e = parse_nbd_url("nbd://host:10810/vda")
    assert (a.host, a.port, e) == ("host", 10810, "vda")
