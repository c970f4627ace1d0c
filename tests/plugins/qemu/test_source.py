"""The ``qemu`` source against real QEMU: a VM under TCG (no guest OS) with a qcow2 disk, written
through the guest's path (``qemu-io`` on the device over HMP), backed up full and incrementally
with dirty bitmaps, and stopped images read through ``qemu-nbd``."""

from __future__ import annotations

import itertools
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import blockferry
import pytest
from blockferry.datapath.source import ChangeTracking, Expands
from blockferry.plugins.qemu.source import BITMAP_PREFIX, QemuSourcePlugin
from blockferry.repo.format import DiskRecord

from tests.conformance import SourceConformance
from tests.conftest import KiB, MiB
from tests.qemu_vm import VM, qcow2, qemu_io, require_qemu, short_dir, tool

pytestmark = pytest.mark.anyio

BS = 256 * KiB
SIZE = 64 * MiB


class Expected:
    """The disk's content as the test wrote it (``write -P PATTERN OFFSET LENGTH`` only)."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    def write(self, pattern: int, offset: int, length: int) -> str:
        self.data[offset:offset + length] = bytes([pattern]) * length
        return f"write -P {pattern:#x} {offset} {length}"

    def zero(self, offset: int, length: int) -> str:
        self.data[offset:offset + length] = bytes(length)
        return f"write -z {offset} {length}"

    def copy(self) -> bytes:
        return bytes(self.data)

    def data_bytes(self, block: int) -> int:
        """Bytes of the blocks that hold non-zero data (what a full read reads)."""
        zero = bytes(block)
        return sum(block for o in range(0, len(self.data), block) if self.data[o:o + block] != zero)


@pytest.fixture(scope="module")
def vmdir() -> Iterator[Path]:
    require_qemu()
    d = short_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def vm(vmdir: Path) -> Iterator[tuple[VM, Expected]]:
    """One VM shared by the module's tests: each backs up into its own repository (a full read
    first), so they do not depend on each other's bitmaps."""
    exp = Expected(SIZE)
    img = qcow2(vmdir / "disk.qcow2", SIZE, exp.write(0x11, 1 * MiB, 3 * MiB), exp.write(0x22, 40 * MiB, 512 * KiB))
    v = VM(vmdir, img).start()
    yield v, exp
    v.stop()


async def _repo(path: Path) -> str:
    await blockferry.init_repository(str(path), block_size=BS)
    return str(path)


def _disk(session: blockferry.SessionResult) -> tuple[str, int, str]:  # type: ignore[name-defined]
    assert session.state == "success", session
    (obj,) = session.objects
    (d,) = obj.disks
    return obj.point or "", d.stats.read_bytes, d.plan


async def _restored(r: object, point: str, out: Path) -> bytes:
    res = await r.restore(point, out)  # type: ignore[attr-defined]
    (one,) = res
    return (out / one.disk).read_bytes()


async def test_full_then_incremental_reads_only_dirty_extents(vm: tuple[VM, Expected], tmp_path: Path) -> None:
    v, exp = vm
    assert v.ctl is not None
    v.ctl.guest_write("vda", exp.write(0x33, 10 * MiB, 1 * MiB))
    first = exp.copy()
    repo = await _repo(tmp_path / "repo")
    async with blockferry.open_repository(repo) as r:
        p1, read1, plan1 = _disk(await r.backup([v.url], name="vm"))
        # holes and zeros are never read
        assert read1 == exp.data_bytes(BS) < 8 * MiB, plan1
        assert plan1.startswith("full read") and "no earlier point of this disk" in plan1, plan1
        m1 = await r.point(p1)
        bitmap1 = m1.disks[0].metadata["bitmap"]
        assert m1.disks[0].change_id == f"qemu-bitmap:{bitmap1}"
        assert set(v.ctl.bitmaps("fmt0")) == {bitmap1}

        v.ctl.guest_write("vda", exp.write(0x44, 20 * MiB, 1 * MiB))  # 4 blocks
        v.ctl.guest_write("vda", exp.write(0x55, 40 * MiB + 64 * KiB, 64 * KiB))  # inside 1 block
        v.ctl.guest_write("vda", exp.zero(1 * MiB, 256 * KiB))  # dirty, but reads as zero: a hole
        second = exp.copy()
        p2, read2, plan2 = _disk(await r.backup([v.url], name="vm"))
        assert plan2.startswith("incremental"), plan2
        assert f"dirty bitmap {bitmap1}" in plan2
        assert read2 == 5 * BS, plan2
        m2 = await r.point(p2)
        bitmap2 = m2.disks[0].metadata["bitmap"]
        assert m2.disks[0].metadata["base_bitmap"] == bitmap1
        # rotated only after the commit: the old bitmap is gone, the new one tracks
        assert set(v.ctl.bitmaps("fmt0")) == {bitmap2}

        assert await _restored(r, p1, tmp_path / "o1") == first
        assert await _restored(r, p2, tmp_path / "o2") == second
    # nothing of the backup is left in the VM
    assert not v.ctl.exports() and not v.ctl.jobs()
    assert not any(n.startswith("bf-") for n in v.ctl.node_names())


async def test_point_in_time_and_teardown_after_a_failed_read(vm: tuple[VM, Expected]) -> None:
    """Guest writes during the read do not show in it; an abandoned read (finish(False)) leaves no
    fleece node, export, job or new bitmap behind, and the old bitmaps as they were."""
    v, exp = vm
    assert v.ctl is not None
    before = set(v.ctl.bitmaps("fmt0"))
    assert len(before) == 1  # the chain the first test left
    plugin = QemuSourcePlugin()
    disk = await plugin.open(v.url, {})
    try:
        # as an incremental would: the base point recorded the VM's bitmap
        base = DiskRecord(name="vda", size=SIZE, source=v.url, change_id=f"qemu-bitmap:{next(iter(before))}")
        dirty, why = await disk.changed_extents(base)
        assert dirty is not None, why
        extents = await disk.data_extents()
        assert extents and (1 * MiB, 256 * KiB) not in extents
        assert any(n.startswith("bf-fleece-") for n in v.ctl.node_names())
        assert len(v.ctl.exports()) == 1
        old = bytearray(64 * KiB)
        await disk.read_into(40 * MiB, [old])
        pattern = old[0] % 200 + 1
        v.ctl.guest_write("vda", exp.write(pattern, 40 * MiB, 64 * KiB))  # after the fleece started
        seen = bytearray(64 * KiB)
        await disk.read_into(40 * MiB, [seen])
        assert seen == old != bytes([pattern]) * (64 * KiB)
        assert disk.new_bitmap in v.ctl.bitmaps("fmt0")
    finally:
        await disk.aclose()
        await disk.finish(False)
    assert not v.ctl.exports() and not v.ctl.jobs()
    assert not any(n.startswith("bf-") for n in v.ctl.node_names())
    assert set(v.ctl.bitmaps("fmt0")) == before


async def test_cancelled_read_tears_down(vm: tuple[VM, Expected]) -> None:
    import anyio

    v, _ = vm
    assert v.ctl is not None
    disk = await QemuSourcePlugin().open(v.url, {})
    with anyio.CancelScope() as scope:
        await disk.data_extents()
        scope.cancel()
        await disk.read_into(0, [bytearray(MiB)])
    assert scope.cancelled_caught
    await disk.aclose()
    await disk.finish(False)
    assert not v.ctl.exports() and not v.ctl.jobs()
    assert not any(n.startswith("bf-") for n in v.ctl.node_names())


async def test_killed_vm_leaves_an_inconsistent_bitmap_and_the_next_backup_reads_everything(
        tmp_path: Path, anyio_backend: str) -> None:
    require_qemu()
    d = short_dir()
    v = VM(d, qcow2(d / "disk.qcow2", 16 * MiB, "write -P 0x11 0 2M"))
    try:
        v.start()
        repo = await _repo(tmp_path / "repo")
        async with blockferry.open_repository(repo) as r:
            _, read1, _ = _disk(await r.backup([v.url], name="vm"))
            assert read1 == 2 * MiB
            assert v.ctl is not None
            # a bitmap added at run time reaches the image when QEMU quits; loaded again, it is
            # flagged in use in the image until QEMU saves it once more, which a kill prevents
            v.stop()
            v.start()
            v.ctl.guest_write("vda", "write -P 0x22 0 256k")  # an incremental would read 256 KiB
            v.stop(kill=True)
            v.start()
            (bm,) = v.ctl.bitmaps("fmt0").values()
            assert bm.get("inconsistent"), bm
            _, read2, plan2 = _disk(await r.backup([v.url], name="vm"))
            assert plan2.startswith("full read") and "inconsistent" in plan2, plan2
            assert read2 == 2 * MiB
            # the inconsistent bitmap is gone, a fresh one tracks
            names = set(v.ctl.bitmaps("fmt0"))
            assert len(names) == 1 and bm["name"] not in names
    finally:
        v.stop()
        shutil.rmtree(d, ignore_errors=True)


async def test_offline_qcow2_with_bitmaps_and_raw(tmp_path: Path) -> None:
    require_qemu()
    d = short_dir()
    try:
        img = qcow2(d / "off.qcow2", 16 * MiB, "write -P 0x11 0 1M", "write -P 0x22 8M 1M")
        repo = await _repo(tmp_path / "repo")
        async with blockferry.open_repository(repo) as r:
            p1, read1, _ = _disk(await r.backup([f"qemu:{img}"], name="off"))
            assert read1 == 2 * MiB
            out = subprocess.run(["qemu-img", "info", "--output=json", str(img)], capture_output=True, check=True)
            assert BITMAP_PREFIX in out.stdout.decode()
            qemu_io(img, "write -P 0x33 12M 256k")
            p2, read2, plan2 = _disk(await r.backup([f"qemu:{img}"], name="off"))
            assert plan2.startswith("incremental") and read2 == 256 * KiB, plan2
            raw = d / "off.raw"
            subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(raw)], check=True)
            assert await _restored(r, p2, tmp_path / "o2") == raw.read_bytes()
            # a raw image: no tracking, holes skipped all the same
            _, read3, plan3 = _disk(await r.backup([f"qemu:{raw}"], name="raw"))
            assert read3 == 2 * MiB + 256 * KiB and plan3.startswith("full read"), plan3
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def guest_agent(vmdir: Path) -> Iterator[Path]:
    """The real ``qemu-ga``, run on the host (no guest OS here) on a Unix socket, with the
    freeze/thaw commands disabled: a freeze here would freeze the host's own filesystems."""
    sock = vmdir / "ga.sock"
    proc = subprocess.Popen([tool("qemu-ga"), "-m", "unix-listen", "-p", str(sock), "-t", str(vmdir),
                             "-b", "guest-fsfreeze-freeze,guest-fsfreeze-freeze-list,guest-fsfreeze-thaw"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from tests.qemu_vm import wait_for

        wait_for(sock, proc)
        yield sock
    finally:
        proc.terminate()
        proc.wait(10)


async def test_guest_agent_refusing_to_freeze_gives_a_crash_consistent_point(
        vm: tuple[VM, Expected], guest_agent: Path, tmp_path: Path) -> None:
    v, _ = vm
    repo = await _repo(tmp_path / "repo")
    async with blockferry.open_repository(repo) as r:
        p, _, _ = _disk(await r.backup([f"{v.url}?agent={guest_agent}"], name="vm"))
        meta = (await r.point(p)).disks[0].metadata
    assert meta["consistency"] == "crash"
    assert "guest freeze failed" in meta["consistency_reason"] and "disabled" in meta["consistency_reason"]
    assert meta["thawed"] is False  # the thaw was still tried (and refused: disabled too)


async def test_silent_guest_agent_times_out_and_the_backup_goes_on(vm: tuple[VM, Expected], tmp_path: Path) -> None:
    """An agent that never answers (a guest without qemu-ga behind its channel) costs the freeze
    timeout, then the point is crash-consistent; the thaw is tried with the same bound."""
    import anyio

    v, _ = vm
    d = short_dir()
    sock = d / "silent.sock"
    repo = await _repo(tmp_path / "repo")
    try:
        async with await anyio.create_unix_listener(sock) as listener, anyio.create_task_group() as tg:
            held: list[object] = []

            async def hold(stream: object) -> None:
                held.append(stream)
                await anyio.sleep_forever()

            tg.start_soon(listener.serve, hold)
            async with blockferry.open_repository(repo) as r:
                t0 = anyio.current_time()
                p, _, _ = _disk(await r.backup([f"{v.url}?agent={sock}&freeze_timeout=0.5"], name="vm"))
                took = anyio.current_time() - t0
                meta = (await r.point(p)).disks[0].metadata
            tg.cancel_scope.cancel()
        assert meta["consistency"] == "crash" and "no answer within 0.5 s" in meta["consistency_reason"]
        assert meta["thawed"] is False
        assert took < 20
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def test_no_agent_is_recorded_as_crash_consistent_and_errors_name_the_disks(vm: tuple[VM, Expected],
                                                                                 tmp_path: Path) -> None:
    v, _ = vm
    repo = await _repo(tmp_path / "repo")
    async with blockferry.open_repository(repo) as r:
        p, _, _ = _disk(await r.backup([f"{v.url}#vda"], name="vm"))
        m = await r.point(p)
    assert m.disks[0].name == "vda"
    assert m.disks[0].metadata["consistency"] == "crash"
    assert m.disks[0].metadata["consistency_reason"] == "no guest agent configured"
    with pytest.raises(blockferry.ConfigError, match="no disk 'vdz'.*vda"):  # type: ignore[attr-defined]
        await QemuSourcePlugin().open(f"{v.url}#vdz", {})


async def test_a_vm_with_two_disks_backs_up_both_at_once(tmp_path: Path, anyio_backend: str) -> None:
    """``qemu:SOCK`` stands for every disk of the VM; their reads run concurrently through one
    NBD server in QEMU, and both chains go on incrementally."""
    require_qemu()
    d = short_dir()
    a = qcow2(d / "a.qcow2", 8 * MiB, "write -P 0x11 0 1M")
    b = qcow2(d / "b.qcow2", 4 * MiB, "write -P 0x22 1M 1M")
    v = VM(d, a, b)
    try:
        v.start()
        assert v.ctl is not None
        repo = await _repo(tmp_path / "repo")
        async with blockferry.open_repository(repo) as r:
            s1 = await r.backup([v.url])
            assert s1.state == "success", s1
            (obj,) = s1.objects
            assert obj.name == "vm" and sorted(x.name for x in obj.disks) == ["vda", "vdb"]
            assert sum(x.stats.read_bytes for x in obj.disks) == 2 * MiB
            v.ctl.guest_write("vdb", "write -P 0x33 0 256k")
            s2 = await r.backup([v.url])
            assert s2.state == "success", s2
            reads = {x.name: x.stats.read_bytes for x in s2.objects[0].disks}
            assert reads == {"vda": 0, "vdb": 256 * KiB}
            res = {x.disk: x for x in await r.restore(s2.points[0], tmp_path / "out")}
            assert (tmp_path / "out" / "vda").read_bytes() == b"\x11" * MiB + bytes(7 * MiB)
            assert (tmp_path / "out" / "vdb").read_bytes() == b"\x33" * (256 * KiB) + bytes(768 * KiB) + \
                b"\x22" * MiB + bytes(2 * MiB)
            assert set(res) == {"vda", "vdb"}
        assert not v.ctl.exports() and not v.ctl.jobs()
    finally:
        v.stop()
        shutil.rmtree(d, ignore_errors=True)


async def test_a_failed_incremental_keeps_the_old_bitmap_and_leaves_nothing_behind(
        vm: tuple[VM, Expected], tmp_path: Path) -> None:
    """Through the whole engine: a backup that fails while reading leaves no overlay node, export,
    job or new bitmap in the VM; the base's bitmap stays, and the next backup is still an
    incremental that reads what changed before the failure."""
    from blockferry.errors import SourceError
    from blockferry.registry import SOURCES, register

    v, exp = vm
    assert v.ctl is not None
    repo = await _repo(tmp_path / "repo")

    class Failing(QemuSourcePlugin):
        async def open(self, url, options):  # type: ignore[no-untyped-def]
            disk = await super().open(url, options)

            async def broken(offset: int, buffers: object) -> int:
                raise SourceError(f"{url}: injected read error at offset {offset}")

            disk.read_into = broken  # type: ignore[method-assign]
            return disk

    async with blockferry.open_repository(repo) as r:
        _, _, _ = _disk(await r.backup([v.url], name="vm"))
        before = set(v.ctl.bitmaps("fmt0"))
        v.ctl.guest_write("vda", exp.write(0x77, 30 * MiB, 512 * KiB))
        register(SOURCES, "qemu", Failing())
        try:
            failed = await r.backup([v.url], name="vm", retries=0)
        finally:
            register(SOURCES, "qemu", None)
        assert failed.state == "failed", failed
        assert not v.ctl.exports() and not v.ctl.jobs()
        assert not any(n.startswith("bf-") for n in v.ctl.node_names())
        assert set(v.ctl.bitmaps("fmt0")) == before
        _, read, plan = _disk(await r.backup([v.url], name="vm"))
        assert plan.startswith("incremental") and read == 2 * BS, plan


async def test_guest_writes_during_a_backup_stay_out_of_its_point(vm: tuple[VM, Expected], tmp_path: Path) -> None:
    """Through the whole engine: the guest overwrites data after the fleece started and before
    it is read; the point has the data as it was, the next incremental picks the write up."""
    from blockferry.registry import SOURCES, register

    v, exp = vm
    assert v.ctl is not None
    ctl = v.ctl
    repo = await _repo(tmp_path / "repo")
    before = exp.copy()
    during = exp.write(0xAB, 1 * MiB + 512 * KiB, 512 * KiB)  # over data a full read reads

    class WriteDuring(QemuSourcePlugin):
        async def open(self, url, options):  # type: ignore[no-untyped-def]
            disk = await super().open(url, options)
            extents = disk.data_extents

            async def fleeced_then_written() -> object:
                out = await extents()  # the fleece started here
                ctl.guest_write("vda", during)
                return out

            disk.data_extents = fleeced_then_written  # type: ignore[method-assign]
            return disk

    async with blockferry.open_repository(repo) as r:
        register(SOURCES, "qemu", WriteDuring())
        try:
            p1, _, _ = _disk(await r.backup([v.url], name="vm"))
        finally:
            register(SOURCES, "qemu", None)
        assert await _restored(r, p1, tmp_path / "o1") == before
        p2, read2, plan2 = _disk(await r.backup([v.url], name="vm"))
        assert plan2.startswith("incremental") and read2 == 2 * BS, plan2
        assert await _restored(r, p2, tmp_path / "o2") == exp.copy()


async def test_a_job_names_the_vm_by_its_socket(vm: tuple[VM, Expected], tmp_path: Path) -> None:
    """A job (as the daemon runs it) lists the VM once; its disks are found when the job runs."""
    from blockferry.jobs.config import DiskSpec, JobSpec, ObjectSpec

    v, _ = vm
    repo = await _repo(tmp_path / "repo")
    spec = JobSpec(name="nightly", repository="repository",
                   objects=[ObjectSpec(name="vm", disks=[DiskSpec(source=v.url)])], retries=0)
    async with blockferry.open_repository(repo) as r:
        session = await r.run_job(spec)
        assert session.state == "success", session
        assert [d.name for d in session.objects[0].disks] == ["vda"]


async def test_a_deleted_point_makes_the_next_backup_a_full_read(vm: tuple[VM, Expected], tmp_path: Path) -> None:
    """The newest point goes: the base is now an older point whose bitmap was rotated away."""
    v, exp = vm
    repo = await _repo(tmp_path / "repo")
    async with blockferry.open_repository(repo) as r:
        _disk(await r.backup([v.url], name="vm"))
        p2, _, _ = _disk(await r.backup([v.url], name="vm"))
        await r.delete(p2)
        _, read, plan = _disk(await r.backup([v.url], name="vm"))
        assert plan.startswith("full read") and "is missing" in plan, plan
        assert read == exp.data_bytes(BS)


class TestQemuImageSource(SourceConformance):
    """The generic source contract, for stopped raw images read through ``qemu-nbd`` (raw: the
    suite's odd sizes; qcow2 sizes are multiples of 512, covered by the tests above)."""

    @pytest.fixture
    def source_plugin(self) -> QemuSourcePlugin:
        require_qemu()
        return QemuSourcePlugin()

    @pytest.fixture
    def make_source_url(self, tmp_path: Path):  # type: ignore[no-untyped-def]
        counter = itertools.count()

        def make(size: int, segments: Sequence[tuple[int, bytes]]) -> str:
            path = tmp_path / f"disk{next(counter)}.img"
            with open(path, "wb") as f:
                f.truncate(size)
                for off, chunk in segments:
                    f.seek(off)
                    f.write(chunk)
            return f"qemu:{path}"

        return make

    @pytest.fixture
    def missing_source_url(self, tmp_path: Path) -> tuple[str, str]:
        return f"qemu:{tmp_path / 'nope.qcow2'}", str(tmp_path / "nope.qcow2")

    @pytest.fixture
    def declared_capabilities(self) -> set[type]:
        # reads go over NBD (asynchronous: neither ReadsBlocking nor MapsBlocking)
        return {Expands, ChangeTracking}


async def test_a_raw_disk_of_a_running_vm_is_fleeced_and_read_whole_each_time(tmp_path: Path,
                                                                             anyio_backend: str) -> None:
    require_qemu()
    d = short_dir()
    raw = d / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(b"\x11" * MiB)
    v = VM(d, None, blockdev={"driver": "raw", "file": {"driver": "file", "filename": str(raw)}})
    try:
        v.start()
        repo = await _repo(tmp_path / "repo")
        async with blockferry.open_repository(repo) as r:
            _disk(await r.backup([v.url], name="vm"))
            p2, read, plan = _disk(await r.backup([v.url], name="vm"))
            assert plan == "full read: raw disks keep no persistent dirty bitmap" and read == MiB, plan
            assert (await r.point(p2)).disks[0].change_id is None
            assert await _restored(r, p2, tmp_path / "out") == raw.read_bytes()
        assert v.ctl is not None and not v.ctl.exports() and not v.ctl.jobs()
    finally:
        v.stop()
        shutil.rmtree(d, ignore_errors=True)
