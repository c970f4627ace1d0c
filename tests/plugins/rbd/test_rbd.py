"""The storage system ``rbd`` and the source ``rbd`` against a real Ceph cluster (the session's
one-node cluster on loopback, tests/plugins/conftest.py): backups of RBD images through
temporary storage snapshots, full and incremental (only ``rbd diff``'s extents read), bit-exact
restores, and the temporary snapshots removed after success, failure and cancellation, and left
over by a killed run removed by the next one."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import anyio
import blockferry
import pytest
from blockferry.datapath.source import Buffer, ChangeTracking
from blockferry.datapath.storage import (
    GroupSnapshots,
    StoragePlugin,
    StorageSystem,
    hold,
    is_retained,
    is_temporary,
    leftover,
    temporary_name,
)
from blockferry.errors import ConfigError, SourceError
from blockferry.nbd.client import NBDClient
from blockferry.plugins.rbd.source import RbdDisk
from blockferry.registry import source_plugin, storage_plugin

from tests.conftest import MiB
from tests.plugins.rgw import RbdPool

pytestmark = pytest.mark.anyio

SIZE = 32 * MiB
BS = MiB  # the repositories' block size (the default)


@pytest.fixture
def image(ceph_rbd: RbdPool, tmp_path: Path) -> Iterator[tuple[str, bytearray]]:
    """A fresh 32 MiB image with random data in two places (the rest a hole), 1 MiB objects;
    returns its name and its expected content. Removed afterwards with its snapshots."""
    name = f"vol-{uuid.uuid4().hex[:8]}"
    content = bytearray(SIZE)
    content[0:6 * MiB] = os.urandom(6 * MiB)
    content[20 * MiB:22 * MiB + 4096] = os.urandom(2 * MiB + 4096)
    src = tmp_path / "initial.img"
    src.write_bytes(content)
    ceph_rbd.run("import", "--no-progress", "--object-size", "1M", str(src), f"{ceph_rbd.name}/{name}")
    src.unlink()
    yield name, content
    ceph_rbd.run("snap", "purge", "--no-progress", f"{ceph_rbd.name}/{name}")
    ceph_rbd.run("rm", "--no-progress", f"{ceph_rbd.name}/{name}")


def _write(pool: RbdPool, name: str, content: bytearray, offset: int, length: int, scratch: Path) -> None:
    data = os.urandom(length)
    pool.write(name, offset, data, scratch)
    content[offset:offset + length] = data


async def _backup(repo_url: str, url: str, **kw: object) -> blockferry.SessionResult:
    async with blockferry.open_repository(repo_url) as repo:
        return await repo.backup([url], name="vol", retries=0, **kw)  # type: ignore[arg-type]


async def _restored(repo_url: str, point: str, to: Path) -> bytes:
    async with blockferry.open_repository(repo_url) as repo:
        (res,) = await repo.restore(point, to, overwrite=True)
    return Path(res.path).read_bytes()


def _blocks(extents: Sequence[dict[str, int]]) -> int:
    """How many repository blocks the extents touch."""
    blocks: set[int] = set()
    for e in extents:
        blocks.update(range(e["offset"] // BS, (e["offset"] + e["length"] - 1) // BS + 1))
    return len(blocks)


async def test_full_then_incremental_reads_only_rbd_diff(ceph_rbd: RbdPool, image: tuple[str, bytearray],
                                                         tmp_path: Path) -> None:
    name, content = image
    repo_url = str(tmp_path / "repo")
    await blockferry.init_repository(repo_url)
    url = ceph_rbd.url(name)
    assert isinstance(await source_plugin(url).open(url, {}), ChangeTracking)

    full = await _backup(repo_url, url)
    assert full.state == "success", full
    (disk,) = full.objects[0].disks
    assert disk.plan.startswith("full"), disk.plan
    assert full.stats.read_bytes == 9 * MiB  # the holes are never read: 6 + 3 blocks hold data
    assert await _restored(repo_url, full.points[0], tmp_path / "r1") == bytes(content)
    # the temporary snapshot became the retained one; nothing else is left
    (kept,) = ceph_rbd.snapshots(name)
    assert is_retained(kept), kept

    # the point records the flow's steps, in order, with their times
    async with blockferry.open_repository(repo_url) as repo:
        record = (await repo.point(full.points[0])).disks[0]
    storage = record.metadata["storage"]
    assert [s["step"] for s in storage["steps"]] == ["analyse", "snapshot", "expose", "read"]
    times = [dt.datetime.fromisoformat(s["at"]) for s in storage["steps"]]
    assert times == sorted(times)
    assert storage["snapshot"] == kept and storage["volume"] == f"{ceph_rbd.name}/{name}"

    _write(ceph_rbd, name, content, 3 * MiB + 4096, 64 * 1024, tmp_path)
    _write(ceph_rbd, name, content, 12 * MiB, MiB + 100, tmp_path)  # into a hole, across two blocks
    _write(ceph_rbd, name, content, 31 * MiB, MiB, tmp_path)
    changed = ceph_rbd.diff(name, kept)
    assert changed, "rbd diff sees the writes"

    incr = await _backup(repo_url, url)
    assert incr.state == "success", incr
    (disk,) = incr.objects[0].disks
    assert disk.plan.startswith("incremental") and "rbd diff since snapshot" in disk.plan, disk.plan
    # exactly the blocks rbd diff names are read, nothing else
    assert incr.stats.read_bytes == _blocks(changed) * BS == 4 * MiB
    assert await _restored(repo_url, incr.points[0], tmp_path / "r2") == bytes(content) == ceph_rbd.export(name)
    # the older retained snapshot is gone, the new one kept
    (kept2,) = ceph_rbd.snapshots(name)
    assert is_retained(kept2) and kept2 != kept
    # and the first point still restores as it was
    assert await _restored(repo_url, full.points[0], tmp_path / "r3") != bytes(content)


async def test_a_job_backs_up_several_rbd_volumes_through_their_snapshots(ceph_rbd: RbdPool, tmp_path: Path) -> None:
    """A job of two objects (one with two RBD volumes), run twice: every volume goes through its
    own storage snapshot, the second run reads only what changed, each volume keeps one snapshot."""
    names = [f"job-{uuid.uuid4().hex[:6]}-{i}" for i in range(3)]
    contents: list[bytearray] = []
    for n in names:
        data = bytearray(os.urandom(3 * MiB))
        (tmp_path / n).write_bytes(data)
        ceph_rbd.run("import", "--no-progress", "--object-size", "1M", str(tmp_path / n), f"{ceph_rbd.name}/{n}")
        contents.append(data)
    repo_url = str(tmp_path / "repo")
    await blockferry.init_repository(repo_url)
    spec = blockferry.JobSpec(name="volumes", repository="repo", retries=0, objects=[
        blockferry.ObjectSpec(name="db", disks=[blockferry.DiskSpec(source=ceph_rbd.url(n)) for n in names[:2]]),
        blockferry.ObjectSpec(name="web", disks=[blockferry.DiskSpec(source=ceph_rbd.url(names[2]))]),
    ])
    try:
        async with blockferry.open_repository(repo_url) as repo:
            first = await repo.run_job(spec)
            assert first.state == "success", first
            assert first.stats.read_bytes == 9 * MiB
            _write(ceph_rbd, names[1], contents[1], MiB + 10, 10, tmp_path)
            second = await repo.run_job(spec)
            assert second.state == "success", second
            assert all(d.plan.startswith("incremental") for o in second.objects for d in o.disks), second.objects
            assert second.stats.read_bytes == BS
            db = next(o for o in second.objects if o.name == "db")
            out = await repo.restore(db.point or "", tmp_path / "out")
        assert sorted(Path(r.path).read_bytes() for r in out) == sorted(bytes(c) for c in contents[:2])
        for n in names:
            (kept,) = ceph_rbd.snapshots(n)
            assert is_retained(kept)
    finally:
        for n in names:
            ceph_rbd.run("snap", "purge", "--no-progress", f"{ceph_rbd.name}/{n}")
            ceph_rbd.run("rm", "--no-progress", f"{ceph_rbd.name}/{n}")


async def test_previous_snapshot_gone_reads_everything_and_says_why(ceph_rbd: RbdPool, image: tuple[str, bytearray],
                                                                   tmp_path: Path) -> None:
    name, content = image
    repo_url = str(tmp_path / "repo")
    await blockferry.init_repository(repo_url)
    url = ceph_rbd.url(name)
    assert (await _backup(repo_url, url)).state == "success"
    (kept,) = ceph_rbd.snapshots(name)
    ceph_rbd.run("snap", "rm", "--no-progress", f"{ceph_rbd.name}/{name}@{kept}")
    _write(ceph_rbd, name, content, 5 * MiB, 4096, tmp_path)

    incr = await _backup(repo_url, url)
    assert incr.state == "success", incr
    (disk,) = incr.objects[0].disks
    assert disk.plan.startswith("full read") and f"{kept} is gone" in disk.plan, disk.plan
    assert incr.stats.read_bytes == 9 * MiB  # every block with data read again (and deduplicated)
    assert incr.stats.new_bytes <= BS
    assert await _restored(repo_url, incr.points[0], tmp_path / "r") == bytes(content)


async def test_failed_backup_removes_its_snapshot_and_keeps_the_retained_one(
        ceph_rbd: RbdPool, image: tuple[str, bytearray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name, content = image
    repo_url = str(tmp_path / "repo")
    await blockferry.init_repository(repo_url)
    url = ceph_rbd.url(name)
    assert (await _backup(repo_url, url)).state == "success"
    (kept,) = ceph_rbd.snapshots(name)
    seen: list[list[str]] = []

    async def failing(self: RbdDisk, offset: int, buffers: Sequence[Buffer]) -> int:
        await self._start()
        seen.append(ceph_rbd.snapshots(name))  # the temporary snapshot exists while reading
        raise SourceError("injected read failure")

    monkeypatch.setattr(RbdDisk, "read_into", failing)
    _write(ceph_rbd, name, content, 0, 4096, tmp_path)
    failed = await _backup(repo_url, url)
    assert failed.state == "failed" and "injected read failure" in (failed.objects[0].error or "")
    assert any(is_temporary(s) for s in seen[0]), seen
    assert ceph_rbd.snapshots(name) == [kept]  # the temporary one removed, the retained one kept
    monkeypatch.undo()
    # and the next incremental still diffs from the retained snapshot
    incr = await _backup(repo_url, url)
    assert incr.objects[0].disks[0].plan.startswith("incremental"), incr.objects[0].disks[0].plan
    assert incr.stats.read_bytes == BS
    assert await _restored(repo_url, incr.points[0], tmp_path / "r") == bytes(content)


async def test_cancelled_backup_removes_its_snapshot(ceph_rbd: RbdPool, image: tuple[str, bytearray],
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name, _ = image
    repo_url = str(tmp_path / "repo")
    await blockferry.init_repository(repo_url)
    reading = anyio.Event()

    async def stuck(self: RbdDisk, offset: int, buffers: Sequence[Buffer]) -> int:
        await self._start()
        reading.set()
        await anyio.sleep_forever()
        raise AssertionError

    monkeypatch.setattr(RbdDisk, "read_into", stuck)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_backup, repo_url, ceph_rbd.url(name))
        await reading.wait()
        assert any(is_temporary(s) for s in ceph_rbd.snapshots(name))
        tg.cancel_scope.cancel()
        wound_down = anyio.current_time()
    # promptly: the movers report their cancellation (the job once waited 60 s for them)
    assert anyio.current_time() - wound_down < 30
    assert ceph_rbd.snapshots(name) == []


async def test_leftovers_of_a_killed_run_are_removed_by_the_next(ceph_rbd: RbdPool, image: tuple[str, bytearray],
                                                                 tmp_path: Path) -> None:
    name, content = image
    repo_url = str(tmp_path / "repo")
    await blockferry.init_repository(repo_url)
    dead = subprocess.Popen(["true"])
    dead.wait()
    mine = temporary_name().split(".")
    mine[3] = str(dead.pid)  # what a run killed with SIGKILL leaves: its process is gone
    gone = ".".join(mine)
    assert leftover(gone)
    ours = temporary_name()  # this process's: a leftover only once no backup holds it
    hold(ours)
    assert not leftover(ours)
    hold(ours, False)
    assert leftover(ours)
    old = temporary_name(dt.datetime.now(dt.UTC) - dt.timedelta(days=2))  # another host's, long dead
    for snap in (gone, old, "users-own"):
        ceph_rbd.run("snap", "create", "--no-progress", f"{ceph_rbd.name}/{name}@{snap}")

    result = await _backup(repo_url, ceph_rbd.url(name))
    assert result.state == "success", result
    left = ceph_rbd.snapshots(name)
    assert "users-own" in left and gone not in left and old not in left
    assert [s for s in left if s != "users-own" and not is_retained(s)] == []
    async with blockferry.open_repository(repo_url) as repo:
        record = (await repo.point(result.points[0])).disks[0]
    assert sorted(record.metadata["storage"]["leftovers_removed"]) == sorted([gone, old])
    assert await _restored(repo_url, result.points[0], tmp_path / "r") == bytes(content)


async def test_storage_system_contract(ceph_rbd: RbdPool, tmp_path: Path) -> None:
    """The seam itself: found by URL scheme through the entry point; several volumes snapshotted
    at once, changed extents, exposure read over NBD, withdrawal, removal, rescan lists."""
    plugin = storage_plugin(ceph_rbd.system_url)
    assert isinstance(plugin, StoragePlugin)
    system = await plugin.open(ceph_rbd.system_url, {})
    assert isinstance(system, StorageSystem) and not isinstance(system, GroupSnapshots)
    names = [f"multi-{uuid.uuid4().hex[:6]}-{i}" for i in range(2)]
    datas = []
    for n in names:
        data = os.urandom(2 * MiB)
        (tmp_path / n).write_bytes(data)
        ceph_rbd.run("import", "--no-progress", str(tmp_path / n), f"{ceph_rbd.name}/{n}")
        datas.append(data)
    volumes = [f"{ceph_rbd.name}/{n}" for n in names]
    try:
        assert await system.volumes_of([ceph_rbd.url(names[0]), "/srv/vm.img", ceph_rbd.url("missing")]) == \
            [volumes[0], None, None]
        assert set(volumes) <= {v.id for v in await system.volumes()}
        with pytest.raises(ConfigError):
            await system.snapshot(volumes, "not-ours")
        first = temporary_name()
        snaps = await system.snapshot(volumes, first)
        assert [s.volume for s in snaps] == volumes
        for v in volumes:
            assert [s.name for s in await system.snapshots(v)] == [first]
        # a write after the snapshot: the snapshot still reads as before, the diff names it
        ceph_rbd.write(names[0], MiB, b"\x01" * 4096, tmp_path)
        second = temporary_name()
        (later,) = await system.snapshot(volumes[:1], second)
        assert await system.changed_extents(later, first) == [(MiB, 4096)]
        assert await system.changed_extents(later, "no-such-snapshot") is None
        assert await system.changed_extents(snaps[1], None) == [(0, 2 * MiB)]
        exposure = await system.expose(snaps[0])
        client = await NBDClient.connect(exposure.url)
        try:
            assert await client.pread(0, 2 * MiB) == datas[0]
        finally:
            await client.aclose()
        await system.withdraw(exposure)
        await system.withdraw(exposure)  # idempotent
        with pytest.raises(SourceError):
            await NBDClient.connect(exposure.url, timeout=5)
        with pytest.raises(ConfigError):
            ceph_rbd.run("snap", "create", "--no-progress", f"{volumes[1]}@users-own")
            await system.remove([snaps[1].__class__(volume=volumes[1], name="users-own")])
        await system.remove([*snaps, later])
        await system.remove(snaps)  # already gone: skipped
        assert [s.name for s in await system.snapshots(volumes[0])] == []
        assert [s.name for s in await system.snapshots(volumes[1])] == ["users-own"]
    finally:
        await system.aclose()
        for v in volumes:
            ceph_rbd.run("snap", "purge", "--no-progress", v)
            ceph_rbd.run("rm", "--no-progress", v)



async def test_an_unreachable_cluster_fails_clearly_before_anything_is_written(tmp_path: Path) -> None:
    port = subprocess.run(["python3", "-c", "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); "
                           "print(s.getsockname()[1])"], capture_output=True, text=True, check=True).stdout.strip()
    conf = tmp_path / "gone.conf"
    conf.write_text(f"[global]\nmon host = 127.0.0.1:{port}\nauth client required = none\nkeyring = /dev/null\n")
    repo_url = str(tmp_path / "repo")
    await blockferry.init_repository(repo_url)
    url = f"rbd://pool/image?conf={conf}"
    with pytest.raises(SourceError, match="rbd pool pool"):
        async with blockferry.open_repository(repo_url) as repo:
            await repo.backup([blockferry.DiskSpec(source=url, options={"timeout": 2})])
    async with blockferry.open_repository(repo_url) as repo:
        assert await repo.points() == []
    with pytest.raises(ConfigError, match="timeout"):
        await storage_plugin(url).open(f"rbd://pool?conf={conf}", {"timeout": "soon"})


_KILLED_RUN = """
import sys, anyio, blockferry
from blockferry.plugins.rbd.source import RbdDisk

async def stuck(self, offset, buffers):
    await self._start()
    print("reading", self.exposure.handle, flush=True)
    await anyio.sleep_forever()

RbdDisk.read_into = stuck

async def main():
    async with blockferry.open_repository(sys.argv[1]) as repo:
        await repo.backup([sys.argv[2]], name="vol", retries=0)

anyio.run(main)
"""


async def test_a_run_killed_with_sigkill_is_cleaned_by_the_next(ceph_rbd: RbdPool, image: tuple[str, bytearray],
                                                                tmp_path: Path) -> None:
    name, content = image
    repo_url = str(tmp_path / "repo")
    await blockferry.init_repository(repo_url)
    script = tmp_path / "killed.py"
    script.write_text(_KILLED_RUN)
    proc = subprocess.Popen([sys.executable, str(script), repo_url, ceph_rbd.url(name)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[:1] == ["reading"], line
        nbd_pid = int(line[1])
    finally:
        proc.kill()
        proc.wait()
    (left,) = ceph_rbd.snapshots(name)
    assert is_temporary(left) and leftover(left)
    try:
        async with blockferry.open_repository(repo_url) as repo:
            await repo.break_lock()  # the killed run held the writer lock
        result = await _backup(repo_url, ceph_rbd.url(name))
        assert result.state == "success", result
        (kept,) = ceph_rbd.snapshots(name)
        assert is_retained(kept)
        async with blockferry.open_repository(repo_url) as repo:
            assert (await repo.point(result.points[0])).disks[0].metadata["storage"]["leftovers_removed"] == [left]
        assert await _restored(repo_url, result.points[0], tmp_path / "r") == bytes(content)
    finally:
        try:
            os.kill(nbd_pid, 0)
            orphan = True
        except ProcessLookupError:
            orphan = False
        if orphan:  # the killed run's qemu-nbd, by its pid (the test's own child's child)
            os.kill(nbd_pid, 9)
    assert not orphan, "the killed run's qemu-nbd outlived it"


async def test_no_proxy_connected_to_the_storage_system_fails_clearly(ceph_rbd: RbdPool, image: tuple[str, bytearray],
                                                                      tmp_path: Path) -> None:
    """A proxy reaches RBD only when it declares the ``rbd`` transport (optionally limited to some
    pools by ``reach``): a job with none fails clearly and leaves no snapshot."""
    name, _ = image
    repo_url = str(tmp_path / "repo")
    await blockferry.init_repository(repo_url)
    spec = blockferry.JobSpec(name="j", repository="repo", retries=0, objects=[
        blockferry.ObjectSpec(name="vol", disks=[blockferry.DiskSpec(source=ceph_rbd.url(name))])])
    for proxy in (blockferry.ProxyConfig(name="files", transports=["file"]),
                  blockferry.ProxyConfig(name="other-pool", transports=["rbd"], reach=["rbd://elsewhere"])):
        async with blockferry.open_repository(repo_url, proxies=[proxy]) as repo:
            result = await repo.run_job(spec)
        assert result.state == "failed" and "no proxy can reach" in (result.objects[0].error or ""), result
    assert ceph_rbd.snapshots(name) == []
    connected = blockferry.ProxyConfig(name="ceph", transports=["rbd"], reach=[f"rbd://{ceph_rbd.name}"])
    async with blockferry.open_repository(repo_url, proxies=[connected]) as repo:
        assert (await repo.run_job(spec)).state == "success"
