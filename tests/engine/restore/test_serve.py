"""Instant recovery: a restore point served over NBD (blockferry's own server), read by our client
and by real tools (nbdinfo, nbdcopy, qemu-img); damaged chunks fail at their offset; writes stay
in an overlay; and a point restored into qcow2 images and NBD targets."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.abc
import blockferry
import pytest
from blockferry.errors import CorruptionError, SourceError
from blockferry.nbd.client import STATE_ZERO, NBDAddress, NBDClient
from blockferry.restore.image import restore_image
from blockferry.restore.serve import serve_repository

from tests.conftest import KiB, MiB, write_disk
from tests.engine.repo.test_verify import block_of, flip
from tests.qemu_vm import QemuNbd, require_qemu, short_dir

pytestmark = pytest.mark.anyio

BS = 256 * KiB
SIZE = 16 * MiB + 4096  # a partial last block


def _tree_digest(repo: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(repo.rglob("*")):
        rel = p.relative_to(repo).as_posix()
        if p.is_file() and not rel.startswith(("tmp/", "locks/", "sessions/")):
            h.update(rel.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def point() -> Iterator[tuple[Path, Path, str]]:
    """A repository with one point of a 16 MiB image (data, holes, explicit zeros)."""
    require_qemu()
    d = short_dir()
    img = write_disk(d / "disk.img", SIZE, [(0, "text", 3 * MiB), (5 * MiB, "random", 2 * MiB + 100),
                                            (9 * MiB, "zeros", MiB), (SIZE - 300 * KiB, "random", 300 * KiB)])

    async def make() -> str:
        await blockferry.init_repository(str(d / "repo"), block_size=BS)
        async with blockferry.open_repository(str(d / "repo")) as r:
            s = await r.backup([str(img)], name="vm")
            assert s.state == "success", s
            return s.points[0]

    pid = anyio.run(make)
    yield d, img, pid
    shutil.rmtree(d, ignore_errors=True)


async def _stop(server: object, tg: anyio.abc.TaskGroup) -> None:
    """Cancel serving once the server saw the client go: cancelling a receive that data is just
    reaching trips a race in anyio's asyncio Unix sockets (a callback's InvalidStateError)."""
    with anyio.fail_after(10):
        while server.connections:  # type: ignore[attr-defined]
            await anyio.sleep(0.005)
    tg.cancel_scope.cancel()


async def test_served_point_reads_bit_exact_with_holes_through_our_client(point: tuple[Path, Path, str]) -> None:
    d, img, pid = point
    sock = d / f"s-{os.getpid()}-{time.monotonic_ns()}.sock"
    content = img.read_bytes()
    async with blockferry.open_repository(str(d / "repo")) as r, anyio.create_task_group() as tg:
        server = await tg.start(lambda task_status: serve_repository(r, pid, str(sock), task_status=task_status))
        c = await NBDClient.connect(NBDAddress(path=str(sock)), "disk.img", meta_contexts=["base:allocation"])
        try:
            assert c.size == SIZE and c.info.read_only
            alloc = await c.block_status("base:allocation")
            holes = [(o, n) for o, n, f in alloc if f & STATE_ZERO]
            assert (3 * MiB, 2 * MiB) in holes  # never-written range: a hole
            assert any(o <= 9 * MiB and o + n >= 10 * MiB for o, n in holes)  # zeros: stored as a hole
            whole = bytearray(SIZE)
            assert await c.read_into(0, [whole]) == SIZE and whole == content
            # a read across data, a hole and data again, unaligned
            assert await c.pread(3 * MiB - 7, 2 * MiB + 14) == content[3 * MiB - 7:5 * MiB + 7]
            with pytest.raises(SourceError, match="read-only"):
                await c.write(0, b"x")
        finally:
            await c.aclose()
        await _stop(server, tg)
    assert not sock.exists()


async def test_damaged_chunk_is_a_read_error_at_its_offset_and_writes_stay_in_the_overlay(tmp_path: Path) -> None:
    require_qemu()
    img = write_disk(tmp_path / "disk.img", 4 * MiB, [(0, "random", 4 * MiB)], seed=3)
    repo = tmp_path / "repo"
    await blockferry.init_repository(str(repo), block_size=BS)
    async with blockferry.open_repository(str(repo)) as r:
        s = await r.backup([str(img)], name="vm")
        pid = s.points[0]
    digest, _ = flip(repo, 2)
    bad = block_of(img, digest) * BS
    before = _tree_digest(repo)
    d = short_dir()
    try:
        sock = d / "s.sock"
        async with blockferry.open_repository(str(repo)) as r, anyio.create_task_group() as tg:
            server = await tg.start(lambda task_status: serve_repository(r, pid, str(sock), writable=True,
                                                                task_status=task_status))
            c = await NBDClient.connect(NBDAddress(path=str(sock)), "")
            try:
                content = img.read_bytes()
                with pytest.raises(SourceError, match=f"offset {bad}") as ei:
                    await c.pread(0, 4 * MiB)
                assert ei.value.offset == bad  # type: ignore[attr-defined]
                # the blocks around it read fine, the damaged one never returns wrong bytes
                assert await c.pread(bad - BS, BS) == content[bad - BS:bad]
                with pytest.raises(SourceError, match="EIO"):
                    await c.pread(bad + 100, 10)
                # writes land in the overlay: read back, partial and whole units, zeroes
                await c.write(100, b"hello")
                await c.write(MiB, b"\x77" * (128 * KiB))
                await c.write_zeroes(2 * MiB, 64 * KiB)
                want = bytearray(content[:3 * MiB])
                want[100:105] = b"hello"
                want[MiB:MiB + 128 * KiB] = b"\x77" * (128 * KiB)
                want[2 * MiB:2 * MiB + 64 * KiB] = bytes(64 * KiB)
                for off in range(0, 3 * MiB, BS):
                    if off != bad:
                        assert await c.pread(off, BS) == want[off:off + BS], off
                await c.flush()
            finally:
                await c.aclose()
            await _stop(server, tg)
        assert _tree_digest(repo) == before  # the repository never saw a write
    finally:
        shutil.rmtree(d, ignore_errors=True)
    # the same damage stops a restore into an image at its offset, or is zeroed with allow_damaged
    async with blockferry.open_repository(str(repo)) as r:
        with pytest.raises(CorruptionError, match=f"offset {bad}"):
            await restore_image(r, pid, str(tmp_path / "out.qcow2"))
        assert not (tmp_path / "out.qcow2").exists()  # no half image left
        res = await restore_image(r, pid, str(tmp_path / "out.qcow2"), allow_damaged=True)
        assert res.damaged_ranges == [(bad, BS)]


def test_cli_serve_with_real_tools(point: tuple[Path, Path, str]) -> None:
    """``blockferry serve`` as users run it: ready fast; nbdinfo, nbdcopy and qemu-img agree."""
    d, img, pid = point
    sock = d / "cli.sock"
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "blockferry", "serve", str(d / "repo"), pid[:8], "--socket",
                             str(sock), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        startup = time.monotonic() - t0
        assert ready["point"] == pid and sock.exists()
        uri = ready["exports"]["disk.img"]
        assert startup < 10, startup  # typically well under a second: nothing is restored first
        info = json.loads(subprocess.run(["nbdinfo", "--json", uri], capture_output=True, check=True).stdout)
        assert info["exports"][0]["export-size"] == SIZE
        cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", str(img), ready["exports"][""]],
                             capture_output=True, text=True)
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr
        out = d / "copy.img"
        subprocess.run(["nbdcopy", uri, str(out)], check=True)
        assert out.read_bytes() == img.read_bytes()
    finally:
        proc.terminate()
        proc.wait(20)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    assert not sock.exists()


async def test_restore_into_qcow2_and_an_nbd_target(point: tuple[Path, Path, str], tmp_path: Path) -> None:
    d, img, pid = point
    async with blockferry.open_repository(str(d / "repo")) as r:
        # a new qcow2 image: holes stay unallocated
        q = tmp_path / "new.qcow2"
        res = await restore_image(r, pid, str(q))
        assert res.data_bytes < SIZE and res.hole_bytes > 0
        assert subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(img), str(q)]).returncode == 0
        # an existing qcow2 full of other data: the point's holes are zeroed in it
        old = tmp_path / "old.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(old), str(SIZE + MiB)], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {SIZE}", str(old)], check=True,
                       capture_output=True)
        await restore_image(r, pid, str(old))
        raw = tmp_path / "old.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(old), str(raw)], check=True)
        assert raw.read_bytes()[:SIZE] == img.read_bytes()
        # a new raw image
        res = await restore_image(r, pid, str(tmp_path / "new.raw"))
        assert (tmp_path / "new.raw").read_bytes() == img.read_bytes()
        # any NBD export: a raw file behind a writable qemu-nbd
        target = tmp_path / "t.raw"
        with open(target, "wb") as f:
            f.truncate(SIZE)
        s = short_dir()
        srv = QemuNbd(target, s / "t.sock", "--format=raw", "--export-name=t")
        try:
            await restore_image(r, pid, f"nbd+unix:///t?socket={s / 't.sock'}")
        finally:
            srv.stop()
            shutil.rmtree(s, ignore_errors=True)
        assert target.read_bytes() == img.read_bytes()


async def test_a_vm_runs_on_a_served_point(point: tuple[Path, Path, str], tmp_path: Path) -> None:
    """A VM attaches the served disk with ``-blockdev nbd`` and reads the point's bytes through
    its virtio device; its writes land in the overlay, the repository stays as it was."""
    from tests.qemu_vm import VM

    d, img, pid = point
    content = img.read_bytes()
    before = _tree_digest(d / "repo")
    vmdir = short_dir()
    sock = vmdir / "serve.sock"
    vm = VM(vmdir, None, blockdev={"driver": "nbd", "server": {"type": "unix", "path": str(sock)},
                                   "export": "disk.img"})
    try:
        async with blockferry.open_repository(str(d / "repo")) as r, anyio.create_task_group() as tg:
            server = await tg.start(lambda task_status: serve_repository(r, pid, str(sock), writable=True,
                                                                        task_status=task_status))
            # QEMU connects while starting: our server must be answering meanwhile
            await anyio.to_thread.run_sync(vm.start)
            assert vm.ctl is not None
            ctl = vm.ctl
            (blk,) = await anyio.to_thread.run_sync(ctl.execute, "query-block")
            assert blk["inserted"]["image"]["virtual-size"] == SIZE
            # the guest writes through its virtio device (into the overlay)...
            await anyio.to_thread.run_sync(ctl.guest_write, "vda", "write -P 0x42 0 1M")
            # ...and QEMU copies the whole disk as the VM sees it into a local file
            copy = vmdir / "copy.raw"
            with open(copy, "wb") as f:
                f.truncate(SIZE)

            def copy_disk() -> None:
                ctl.execute("blockdev-add", driver="raw", **{"node-name": "t0"},
                            file={"driver": "file", "filename": str(copy)})
                ctl.execute("blockdev-backup", **{"job-id": "cp"}, device="fmt0", target="t0", sync="full")
                deadline = time.monotonic() + 60
                while ctl.execute("query-block-jobs"):
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                ctl.execute("blockdev-del", **{"node-name": "t0"})

            await anyio.to_thread.run_sync(copy_disk)
            assert copy.read_bytes() == b"\x42" * MiB + content[MiB:]
            await anyio.to_thread.run_sync(vm.stop)
            await _stop(server, tg)
    finally:
        vm.stop()
        shutil.rmtree(vmdir, ignore_errors=True)
    assert _tree_digest(d / "repo") == before
