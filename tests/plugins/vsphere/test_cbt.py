"""Changed block tracking of the ``vsphere`` source against the simulator, whose harness
(vcsim/main.go) answers ``QueryChangedDiskAreas`` from the areas the test records as it writes:
a full read reads only allocated areas, an incremental only the changed ones (counted), a reset of
tracking or a base without a change id gives a full read with the reason; restores are bit-exact."""

from __future__ import annotations

import random
import urllib.request
from pathlib import Path

import blockferry
import pytest
from blockferry.datapath.source import ChangeTracking
from blockferry.registry import source_plugin
from blockferry.repo.format import DiskRecord

from tests.conftest import KiB, MiB
from tests.plugins.vsphere.conftest import Simulator
from tests.plugins.vsphere.vsim import SimClient

pytestmark = pytest.mark.anyio

BS = 256 * KiB
SIZE = 4 * MiB
VM = "DC0_H0_VM0"


class TrackedDisk:
    """The one disk of VM, its contents, and the areas written to it (recorded with the harness)."""

    def __init__(self, sim: SimClient, vcsim: Simulator) -> None:
        self.sim, self.vcsim = sim, vcsim
        vm = sim.vm(VM)
        (disk,) = sim.disks(vm)
        sim.resize(vm, disk, SIZE)
        self.moref, self.key, self.file = vm._moId, disk.key, disk.backing.fileName
        sim.set_change_tracking(vm, False)  # as a test of the other event loop may have left it
        self._post("clear")
        self.data = bytearray(SIZE)
        self.sim.put_file(self.file, bytes(self.data))

    def _post(self, what: str, **params: int) -> None:
        q = "&".join(f"{k}={v}" for k, v in {"vm": self.moref, "key": self.key, **params}.items())
        req = urllib.request.Request(f"http://{self.vcsim.host}:{self.vcsim.port}/cbt/{what}?{q}", data=b"",
                                     method="POST")
        with urllib.request.urlopen(req) as r:
            assert r.status == 200

    def write(self, offset: int, length: int, seed: int) -> None:
        self.data[offset:offset + length] = random.Random(seed).randbytes(length)
        self.sim.put_file(self.file, bytes(self.data))
        self._post("write", start=offset, length=length)

    def reset(self) -> None:
        self._post("reset")


def blocks(*areas: tuple[int, int]) -> int:
    """Bytes of the blocks the areas touch."""
    touched = {b for off, n in areas for b in range(off // BS, (off + n - 1) // BS + 1)}
    return len(touched) * BS


def _disk(session: object) -> tuple[str, int, str]:
    assert session.state == "success", session  # type: ignore[attr-defined]
    (obj,) = session.objects  # type: ignore[attr-defined]
    (d,) = obj.disks
    return obj.point, d.stats.read_bytes, d.plan


async def _restored(r: object, point: str, out: Path) -> bytes:
    (res,) = await r.restore(point, out)  # type: ignore[attr-defined]
    return (out / res.disk).read_bytes()


async def test_full_then_incremental_reads_only_changed_areas_and_a_reset_reads_all(
        sim: SimClient, vcsim: Simulator, tmp_path: Path) -> None:
    disk = TrackedDisk(sim, vcsim)
    assert sim.vm(VM).config.changeTrackingEnabled is not True
    written = [(0, 300 * KiB), (MiB + 5, 100 * KiB), (3 * MiB, 64 * KiB)]
    for i, (off, n) in enumerate(written):
        disk.write(off, n, seed=i)
    url = f"{vcsim.url(VM)}&cbt=1"
    await blockferry.init_repository(str(tmp_path / "repo"), block_size=BS)
    async with blockferry.open_repository(str(tmp_path / "repo")) as r:
        # full: tracking turned on, only the allocated areas read
        p1, read1, plan1 = _disk(await r.backup([url], name="vm"))
        assert sim.vm(VM).config.changeTrackingEnabled is True
        assert plan1.startswith("full read"), plan1
        assert read1 == blocks(*written), plan1
        m1 = await r.point(p1)
        assert m1.disks[0].change_id and m1.disks[0].change_id.startswith("vmware-cbt:")
        assert m1.disks[0].metadata["cbt"] == "on"
        first = bytes(disk.data)

        # incremental: only the two changed areas (three blocks) are read
        changed = [(2 * MiB - 10, 20), (3 * MiB + 10 * KiB, 4 * KiB)]
        for i, (off, n) in enumerate(changed):
            disk.write(off, n, seed=10 + i)
        p2, read2, plan2 = _disk(await r.backup([url], name="vm"))
        assert plan2.startswith("incremental"), plan2
        assert "VMware CBT since" in plan2
        assert read2 == blocks(*changed) == 3 * BS, plan2
        second = bytes(disk.data)
        m2 = await r.point(p2)
        assert m2.disks[0].change_id != m1.disks[0].change_id

        # tracking reset (a VM restored or moved): the old change id is refused, a full read
        disk.write(MiB // 2, 10, seed=20)
        disk.reset()
        p3, read3, plan3 = _disk(await r.backup([url], name="vm"))
        assert plan3.startswith("full read") and "change tracking was reset" in plan3, plan3
        assert read3 == blocks(*written, *changed, (MiB // 2, 10)), plan3
        third = bytes(disk.data)

        # a base point of another source's tracking gives a full read too
        opened = await source_plugin(url).open(url, {})
        try:
            assert isinstance(opened, ChangeTracking)
            base = DiskRecord(name=opened.name, size=SIZE, source=url, change_id="qemu-bitmap:x")
            extents, why = await opened.changed_extents(base)
            assert extents is None and why == "the base point recorded no VMware change id"
            resized = DiskRecord(name=opened.name, size=SIZE - MiB, source=url, change_id=m2.disks[0].change_id)
            extents, why = await opened.changed_extents(resized)
            assert extents is None and "resized" in why
        finally:
            await opened.aclose()

        assert await _restored(r, p1, tmp_path / "o1") == first
        assert await _restored(r, p2, tmp_path / "o2") == second
        assert await _restored(r, p3, tmp_path / "o3") == third
    assert sim.snapshot_names(sim.vm(VM)) == []


async def test_without_tracking_every_backup_is_a_full_read(sim: SimClient, vcsim: Simulator, tmp_path: Path) -> None:
    vm = "DC0_C0_RP0_VM0"
    (d,) = sim.disks(sim.vm(vm))
    sim.put_file(d.backing.fileName, b"\x01" * 4096)
    await blockferry.init_repository(str(tmp_path / "repo"), block_size=BS)
    async with blockferry.open_repository(str(tmp_path / "repo")) as r:
        _disk(await r.backup([vcsim.url(vm)], name="vm"))
        p2, _, plan2 = _disk(await r.backup([vcsim.url(vm)], name="vm"))
        assert "changed block tracking is off for the VM (cbt=1 turns it on)" in plan2, plan2
        m = await r.point(p2)
        assert m.disks[0].change_id is None and m.disks[0].metadata["cbt"] == "off"
