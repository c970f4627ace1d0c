"""The ``vsphere`` source against govmomi's vSphere simulator: expansion of a VM into its disks, a
full backup through the embedded API restored bit-exact from disk contents the test put on the
datastore, the VM snapshot's lifecycle (there while reading, gone after success, failure and
cancellation; orphans of dead runs removed, live ones kept), and bad input.

The simulator serves datastore files over HTTP, which the plugin's ``http`` transport reads: a
stand-in for VDDK transports against a real ESXi (docs/vsphere.md)."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import blockferry
import pytest
from blockferry.datapath.source import Buffer, Expands, SourceDisk
from blockferry.errors import ConfigError, SourceError
from blockferry.jobs.config import DiskSpec, JobSpec, ObjectSpec
from blockferry.plugins.vsphere import VSphereSourcePlugin
from blockferry.plugins.vsphere.source import PASSWORD_ENV
from blockferry.plugins.vsphere.transport import DiskLocation, DiskReader, HttpDatastoreReader, register_transport
from blockferry.plugins.vsphere.vcenter import VCenter
from blockferry.registry import source_plugin

from tests.conftest import KiB, MiB
from tests.plugins.vsphere.conftest import Simulator
from tests.plugins.vsphere.vsim import SimClient

pytestmark = pytest.mark.anyio

BS = 256 * KiB  #: the repositories' block size (the smallest allowed)
GRAIN = 64 * KiB  #: the disk contents: runs of random data and of zeros


def contents(size: int, seed: int) -> bytes:
    """Random data with holes: what the test puts behind a virtual disk (shorter than the disk by
    a tail, which must read as zeros)."""
    rng = random.Random(seed)
    data = bytearray(size - 3 * BS - 123)
    for off in range(0, len(data), GRAIN):
        if rng.random() < 0.6:
            n = min(GRAIN, len(data) - off)
            data[off:off + n] = rng.randbytes(n)
    return bytes(data)


@dataclass
class SimVM:
    name: str
    url: str
    #: per disk key: the bytes the disk reads as (its whole capacity)
    disks: dict[int, bytes] = field(default_factory=dict)
    #: what the test put on the datastore: file → contents
    files: dict[str, bytes] = field(default_factory=dict)

    def put_files(self, sim: SimClient) -> None:
        for path, data in self.files.items():
            sim.put_file(path, data)


def _prepare(sim: SimClient, vcsim: Simulator, name: str, sizes: Sequence[int], seed: int) -> SimVM:
    vm = sim.vm(name)
    first = sim.disks(vm)[0]
    sim.resize(vm, first, sizes[0])
    for size in sizes[1:]:
        sim.add_disk(vm, size)
    out = SimVM(name=name, url=vcsim.url(name))
    for i, d in enumerate(sim.disks(vm)):
        data = contents(d.capacityInBytes, seed + i)
        out.files[d.backing.fileName] = data
        out.disks[d.key] = data + bytes(d.capacityInBytes - len(data))
    out.put_files(sim)
    return out


@pytest.fixture(scope="session")
def two_disk_vm(sim: SimClient, vcsim: Simulator) -> SimVM:
    """DC0_H0_VM1 with two disks (3 MiB and 2 MiB) whose contents the test wrote."""
    return _prepare(sim, vcsim, "DC0_H0_VM1", [3 * MiB, 2 * MiB], seed=1)


@pytest.fixture(scope="session")
def one_disk_vm(sim: SimClient, vcsim: Simulator) -> SimVM:
    return _prepare(sim, vcsim, "DC0_C0_RP0_VM1", [2 * MiB], seed=7)


async def _repo(path: Path) -> str:
    await blockferry.init_repository(str(path), block_size=BS)
    return str(path)


class Spy:
    """A transport that reads through ``http`` and, at the first read of each disk, records the
    VM's snapshots as the simulator lists them; optionally fails or hangs there."""

    def __init__(self, sim: SimClient, vm: str, *, fail: bool = False, hang: bool = False) -> None:
        self.sim, self.vm, self.fail, self.hang = sim, vm, fail, hang
        self.seen: list[list[str]] = []
        self.reading = anyio.Event()

    async def open(self, loc: DiskLocation) -> DiskReader:
        inner = await HttpDatastoreReader.open(loc)
        spy = self

        class Reader:
            mode = "spy"
            first = True

            async def data_extents(self) -> Any:
                return await inner.data_extents()

            async def read_into(self, offset: int, buffers: Sequence[Buffer]) -> int:
                if self.first:
                    self.first = False
                    vm = await anyio.to_thread.run_sync(spy.sim.vm, spy.vm)
                    spy.seen.append(await anyio.to_thread.run_sync(spy.sim.snapshot_names, vm))
                    spy.reading.set()
                    if spy.fail:
                        raise SourceError(f"{loc.label}: injected read failure at offset {offset}")
                    if spy.hang:
                        await anyio.sleep_forever()
                return await inner.read_into(offset, buffers)

            async def aclose(self) -> None:
                await inner.aclose()

        return Reader()


@pytest.fixture
def spy_transport() -> Iterator[list[Spy]]:
    spies: list[Spy] = []

    async def open_(loc: DiskLocation) -> DiskReader:
        return await spies[-1].open(loc)

    register_transport("spy", open_)
    yield spies
    register_transport("spy", None)


# -- inventory ---------------------------------------------------------------------------------------


async def test_a_vm_expands_into_one_url_per_disk(two_disk_vm: SimVM, sim: SimClient, vcsim: Simulator) -> None:
    plugin = source_plugin(two_disk_vm.url)
    assert isinstance(plugin, VSphereSourcePlugin) and isinstance(plugin, Expands)
    keys = list(two_disk_vm.disks)
    urls = await plugin.expand(two_disk_vm.url)
    assert urls == [f"{two_disk_vm.url}#{k}" for k in keys]
    assert await plugin.expand(urls[1]) == [urls[1]]  # a disk expands to itself
    assert [plugin.disk_name(u) for u in urls] == [f"DC0_H0_VM1-{k}" for k in keys]
    # by managed-object id too
    moref = sim.vm("DC0_H0_VM1")._moId
    assert await plugin.expand(vcsim.url(moref)) == [f"{vcsim.url(moref)}#{k}" for k in keys]

    disk = await plugin.open(urls[1], {})
    try:
        assert isinstance(disk, SourceDisk)
        assert disk.size == 2 * MiB and disk.name == f"DC0_H0_VM1-{keys[1]}"
        assert disk.identity["disk"] == str(keys[1]) and disk.identity["vcenter"] == vcsim.host
        config = disk.metadata["vm"]
        assert config["name"] == "DC0_H0_VM1" and config["moref"] == moref
        assert [d["key"] for d in config["disks"]] == keys
        assert [d["capacity"] for d in config["disks"]] == [3 * MiB, 2 * MiB]
        assert config["networks"] and all(n["mac"] for n in config["networks"])
        assert config["cpus"] >= 1 and config["memory_mb"] > 0
        # opening takes no snapshot (a job's pre-flight check changes nothing on the VM)
        assert sim.snapshot_names(sim.vm("DC0_H0_VM1")) == []
    finally:
        await disk.aclose()
    # a VM of two disks cannot be opened as one
    with pytest.raises(SourceError, match="has 2 disks"):
        await plugin.open(two_disk_vm.url, {})


# -- backup and restore ------------------------------------------------------------------------------


async def test_full_backup_of_a_vm_restores_bit_exact(two_disk_vm: SimVM, sim: SimClient, tmp_path: Path,
                                                     spy_transport: list[Spy]) -> None:
    spy = Spy(sim, two_disk_vm.name)
    spy_transport.append(spy)
    repo = await _repo(tmp_path / "repo")
    async with blockferry.open_repository(repo) as r:
        session = await r.backup([f"{two_disk_vm.url}&transport=spy"], name="vm1")
        assert session.state == "success", session
        (obj,) = session.objects
        assert len(obj.disks) == 2
        assert obj.point
        m = await r.point(obj.point)
        # both disks were read from one snapshot, which existed while they were read
        assert len(spy.seen) == 2 and all(len(s) == 1 and s[0].startswith("blockferry-") for s in spy.seen), spy.seen
        assert spy.seen[0] == spy.seen[1]
        for rec in m.disks:
            assert rec.metadata["snapshot"] == spy.seen[0][0]
            assert rec.metadata["transport"] == "spy"
            assert rec.metadata["vm"]["name"] == two_disk_vm.name
            assert rec.metadata["file"].startswith("[LocalDS_0] ")
        restored = await r.restore(obj.point, tmp_path / "out")
        got = {int(res.disk.rpartition("-")[2]): (tmp_path / "out" / res.disk).read_bytes() for res in restored}
    assert got.keys() == two_disk_vm.disks.keys()
    for key, data in two_disk_vm.disks.items():
        assert got[key] == data, key
    # and the snapshot is gone
    assert sim.snapshot_names(sim.vm(two_disk_vm.name)) == []


async def test_backup_through_the_http_transport(one_disk_vm: SimVM, sim: SimClient, tmp_path: Path) -> None:
    repo = await _repo(tmp_path / "repo")
    async with blockferry.open_repository(repo) as r:
        session = await r.backup([one_disk_vm.url])
        assert session.state == "success", session
        (disk,) = session.objects[0].disks
        # the tail past the file the test wrote is a hole: never read
        (data,) = one_disk_vm.disks.values()
        assert disk.stats.read_bytes < len(data)
        (res,) = await r.restore(session.points[0], tmp_path / "out")
        assert (tmp_path / "out" / res.disk).read_bytes() == data
        m = await r.point(session.points[0])
        assert m.disks[0].metadata["transport"] == "http"
    assert sim.snapshot_names(sim.vm(one_disk_vm.name)) == []


async def test_a_descriptor_is_followed_to_its_flat_extent(one_disk_vm: SimVM, sim: SimClient,
                                                           vcsim: Simulator) -> None:
    """As a real ESXi lays a disk out: ``disk.vmdk`` a text descriptor, the data in ``-flat.vmdk``."""
    vm = sim.vm("DC0_H0_VM2")
    (d,) = sim.disks(vm)
    size = d.capacityInKB * 1024
    data = contents(size, 11) + bytes(size - len(contents(size, 11)))
    folder, _, file = d.backing.fileName.rpartition("/")
    flat = file.replace(".vmdk", "-flat.vmdk")
    sim.put_file(f"{folder}/{flat}", data)
    sim.put_file(d.backing.fileName, (
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\n"
        f"# Extent description\nRW {size // 512} VMFS \"{flat}\"\n\n# The Disk Data Base\n#DDB\n"
    ).encode())
    disk = await source_plugin(vcsim.url("DC0_H0_VM2")).open(vcsim.url("DC0_H0_VM2"), {})
    try:
        buf = bytearray(size)
        assert await disk.read_into(0, [buf]) == size
        assert buf == data
        assert disk.metadata["snapshot"].startswith("blockferry-")
    finally:
        await disk.aclose()
    assert sim.snapshot_names(vm) == []


# -- the snapshot is always removed ------------------------------------------------------------------


async def test_snapshot_removed_when_the_read_fails(one_disk_vm: SimVM, sim: SimClient, tmp_path: Path,
                                                   spy_transport: list[Spy]) -> None:
    spy = Spy(sim, one_disk_vm.name, fail=True)
    spy_transport.append(spy)
    repo = await _repo(tmp_path / "repo")
    async with blockferry.open_repository(repo) as r:
        session = await r.backup([f"{one_disk_vm.url}&transport=spy"], retries=0)
    assert session.state == "failed", session
    assert "injected read failure" in (session.objects[0].error or ""), session.objects[0]
    assert len(spy.seen) == 1 and len(spy.seen[0]) == 1 and spy.seen[0][0].startswith("blockferry-")
    assert sim.snapshot_names(sim.vm(one_disk_vm.name)) == []


async def test_snapshot_removed_when_cancelled(one_disk_vm: SimVM, sim: SimClient, tmp_path: Path,
                                               spy_transport: list[Spy]) -> None:
    spy = Spy(sim, one_disk_vm.name, hang=True)
    spy_transport.append(spy)
    repo = await _repo(tmp_path / "repo")
    # the cancelled run ends promptly (its movers report that they stopped, instead of the job
    # waiting out its 60 s grace for them)
    with anyio.fail_after(30):
        await _backup_then_cancel(repo, f"{one_disk_vm.url}&transport=spy", spy)
    assert sim.snapshot_names(sim.vm(one_disk_vm.name)) == []


async def _backup_then_cancel(repo: str, url: str, spy: Spy) -> None:
    async with blockferry.open_repository(repo) as r:
        async with anyio.create_task_group() as tg:
            async def backup() -> None:
                await r.backup([url], retries=0)
                pytest.fail("the backup was to be cancelled")

            tg.start_soon(backup)
            await spy.reading.wait()
            assert len(spy.seen[0]) == 1  # the snapshot is there while the disk is read
            tg.cancel_scope.cancel()


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


async def test_orphan_snapshots_of_dead_runs_are_removed_by_the_next_run(one_disk_vm: SimVM, sim: SimClient,
                                                                          tmp_path: Path) -> None:
    import time

    here = socket.gethostname()
    vm = sim.vm(one_disk_vm.name)
    assert sim.snapshot_names(vm) == []
    sim.create_snapshot(vm, "nightly", None)  # a user's own: never touched
    sim.create_snapshot(vm, "blockferry-dead", {"host": here, "pid": _dead_pid(), "run": "dead",
                                                "created": time.time()})
    sim.create_snapshot(vm, "blockferry-live", {"host": here, "pid": 1, "run": "live", "created": time.time()})
    sim.create_snapshot(vm, "blockferry-far-recent", {"host": "proxy-2", "pid": 4242, "run": "far",
                                                      "created": time.time() - 3600})
    sim.create_snapshot(vm, "blockferry-far-old", {"host": "proxy-2", "pid": 4242, "run": "old",
                                                   "created": time.time() - 30 * 3600})
    try:
        repo = await _repo(tmp_path / "repo")
        async with blockferry.open_repository(repo) as r:
            session = await r.backup([one_disk_vm.url])
            assert session.state == "success", session
            m = await r.point(session.points[0])
        assert sorted(m.disks[0].metadata["orphan_snapshots_removed"]) == ["blockferry-dead", "blockferry-far-old"]
        assert sim.snapshot_names(sim.vm(one_disk_vm.name)) == ["blockferry-far-recent", "blockferry-live", "nightly"]
    finally:
        sim.remove_all_snapshots(sim.vm(one_disk_vm.name))
        # this simulator's RemoveAllSnapshots of three or more snapshots deletes the VM's disk
        # file too (seen with version 0.24; blockferry never calls it): put it back for the next tests
        one_disk_vm.put_files(sim)


# -- bad input ----------------------------------------------------------------------------------------


async def test_a_vm_whose_disk_file_is_gone_fails_alone(one_disk_vm: SimVM, sim: SimClient, vcsim: Simulator,
                                                        tmp_path: Path) -> None:
    """One job, two VMs: the one whose disk file is gone from its datastore fails with a message
    saying so; the other gets its point; neither keeps a snapshot."""
    lost = "DC0_C0_RP0_VM0"
    (d,) = sim.disks(sim.vm(lost))
    sim.put_file(d.backing.fileName, b"x")  # present, whatever earlier tests did
    sim.delete_file(d.backing.fileName)
    spec = JobSpec(name="two vms", repository="repository", retries=0, objects=[
        ObjectSpec(name="ok", disks=[DiskSpec(source=one_disk_vm.url)]),
        ObjectSpec(name="lost", disks=[DiskSpec(source=vcsim.url(lost))]),
    ])
    repo = await _repo(tmp_path / "repo")
    try:
        async with blockferry.open_repository(repo) as r:
            session = await r.run_job(spec)
            ok, gone = session.objects
            assert ok.name == "ok" and ok.state == "done" and ok.point, ok
            assert gone.name == "lost" and gone.state == "failed" and gone.point is None, gone
            assert f"{d.backing.fileName} not found on datastore LocalDS_0" in (gone.error or ""), gone.error
            (res,) = await r.restore(ok.point, tmp_path / "out")
            assert (tmp_path / "out" / res.disk).read_bytes() == next(iter(one_disk_vm.disks.values()))
        for vm in (one_disk_vm.name, lost):
            assert sim.snapshot_names(sim.vm(vm)) == [], vm
    finally:
        sim.put_file(d.backing.fileName, b"x")


async def test_bad_input_gives_clear_errors(one_disk_vm: SimVM, vcsim: Simulator, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = source_plugin(one_disk_vm.url)
    with pytest.raises(SourceError, match="'no-such-vm': no such VM"):
        await plugin.open(vcsim.url("no-such-vm"), {})
    with pytest.raises(SourceError, match="the VM has no disk '99'"):
        await plugin.open(f"{one_disk_vm.url}#99", {})
    with pytest.raises(ConfigError, match="never goes into the URL"):
        await plugin.open(f"vsphere://backup:s3cret@{vcsim.host}:{vcsim.port}/DC0_H0_VM0", {})
    with pytest.raises(ConfigError, match="never goes into the URL"):
        await plugin.open(f"{one_disk_vm.url}&password=s3cret", {})
    with pytest.raises(ConfigError, match="no user"):
        await plugin.open(vcsim.url("DC0_H0_VM0", user=False), {})
    # the password from a file named by an option
    pw = tmp_path / "pw"
    pw.write_text("wrong\n")
    with pytest.raises(SourceError, match="login refused"):
        await plugin.open(one_disk_vm.url, {"password_file": str(pw)})
    pw.write_text(f"{vcsim.password}\n")
    monkeypatch.delenv(PASSWORD_ENV)
    disk = await plugin.open(one_disk_vm.url, {"password_file": str(pw)})
    await disk.aclose()
    with pytest.raises(ConfigError, match="no password"):
        await plugin.open(one_disk_vm.url, {})
    monkeypatch.setenv(PASSWORD_ENV, vcsim.password)
    # nothing listens there
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SourceError, match="vCenter unreachable"):
        await plugin.open(f"vsphere://backup@127.0.0.1:{port}/DC0_H0_VM0?protocol=http", {})
    # through the API, an unknown VM fails before anything is written
    repo = await _repo(tmp_path / "repo")
    async with blockferry.open_repository(repo) as r:
        with pytest.raises(SourceError, match="no such VM"):
            await r.backup([DiskSpec(source=vcsim.url("no-such-vm"))])
        assert await r.points() == []
    assert not os.environ.get("BLOCKFERRY_VSPHERE_USER")


# -- quiescing ----------------------------------------------------------------------------------------


async def test_a_quiesced_snapshot_when_asked(one_disk_vm: SimVM, sim: SimClient) -> None:
    plugin = source_plugin(one_disk_vm.url)
    disk = await plugin.open(f"{one_disk_vm.url}&quiesce=require", {})
    try:
        (data,) = one_disk_vm.disks.values()
        buf = bytearray(4096)
        assert await disk.read_into(0, [buf]) == 4096 and buf == data[:4096]
        (node,) = sim.snapshots(sim.vm(one_disk_vm.name))
        assert node.quiesced is True
        assert disk.metadata["consistency"] == "application"
    finally:
        await disk.aclose()
    assert sim.snapshot_names(sim.vm(one_disk_vm.name)) == []
    with pytest.raises(ConfigError, match="quiesce must be off, try or require"):
        await plugin.open(f"{one_disk_vm.url}&quiesce=maybe", {})


@pytest.fixture
def tools_not_running(monkeypatch: pytest.MonkeyPatch) -> None:
    """Quiescing fails as on a VM whose VMware Tools do not run (the simulator quiesces nothing,
    so the failure is injected where vCenter's fault would arrive)."""
    create = VCenter.create_snapshot

    def failing(self: VCenter, vm: Any, name: str, owner: dict[str, Any], *, quiesce: bool = False) -> Any:
        if quiesce:
            raise SourceError(f"{self.endpoint}: quiesced snapshot of VM {vm._moId}: vCenter refused: "
                              "VMware Tools is not running")
        return create(self, vm, name, owner, quiesce=quiesce)

    monkeypatch.setattr(VCenter, "create_snapshot", failing)


async def test_quiesce_try_falls_back_to_crash_consistent(one_disk_vm: SimVM, sim: SimClient, tmp_path: Path,
                                                          tools_not_running: None) -> None:
    repo = await _repo(tmp_path / "repo")
    async with blockferry.open_repository(repo) as r:
        session = await r.backup([f"{one_disk_vm.url}&quiesce=try"])
        assert session.state == "success", session
        m = await r.point(session.points[0])
    meta = m.disks[0].metadata
    assert meta["consistency"] == "crash"
    assert "VMware Tools is not running" in meta["quiesce_error"]
    assert sim.snapshot_names(sim.vm(one_disk_vm.name)) == []


async def test_quiesce_require_fails_the_vm(one_disk_vm: SimVM, sim: SimClient, tmp_path: Path,
                                            tools_not_running: None) -> None:
    repo = await _repo(tmp_path / "repo")
    async with blockferry.open_repository(repo) as r:
        session = await r.backup([f"{one_disk_vm.url}&quiesce=require"], retries=0)
        assert session.state == "failed", session
        assert await r.points() == []
    error = session.objects[0].error or ""
    assert "quiescing the guest failed (quiesce=require)" in error and "VMware Tools is not running" in error
    assert sim.snapshot_names(sim.vm(one_disk_vm.name)) == []
