"""Immutability, backup copy, and the lifecycle settings of jobs."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import blockferry
import pytest
from blockferry.actors.server import running_server
from blockferry.errors import ConfigError, ImmutableError
from blockferry.jobs.config import CopyTarget, DiskSpec, JobSpec, ObjectSpec, RepositorySettings
from blockferry.plugins.local import _set_immutable
from blockferry.repo.retention import RetentionPolicy

from tests.conftest import KiB, MiB, mixed_disk, same_file, write_disk

pytestmark = pytest.mark.anyio

BS = 256 * KiB


@pytest.fixture
def unlock_after(tmp_path: Path) -> Iterator[Path]:
    """Immutable files cannot be removed, not even by the test's cleanup: clear the attribute."""
    yield tmp_path
    for p in tmp_path.rglob("*"):
        if p.is_file():
            _set_immutable(p, False)


def protected(path: Path) -> bool:
    out = subprocess.run(["lsattr", str(path)], capture_output=True, text=True)
    return out.returncode == 0 and "i" in out.stdout.split()[0]


async def test_immutable_points_survive_every_deletion_path(unlock_after: Path) -> None:
    tmp = unlock_after
    repo = tmp / "repo"
    await blockferry.init_repository(str(repo), block_size=BS)
    a = write_disk(tmp / "a.img", 2 * MiB, [(0, "random", 2 * MiB)], seed=1)
    b = write_disk(tmp / "b.img", 2 * MiB, [(0, "random", 2 * MiB)], seed=2)
    async with blockferry.open_repository(str(repo)) as r:
        frozen = (await r.backup([str(a)], name="vm", immutable_days=7)).points[0]
        plain = (await r.backup([str(b)], name="vm")).points[0]
        m = await r.point(frozen)
        until = dt.datetime.fromisoformat(m.immutable_until or "")
        assert dt.timedelta(days=6, hours=23) < until - dt.datetime.fromisoformat(m.created) <= dt.timedelta(days=7)
        # delete: refused
        with pytest.raises(ImmutableError, match="immutable until"):
            await r.delete(frozen)
        # retention: kept, with the reason, whatever the rule
        report = await r.prune(RetentionPolicy(keep_last=1))
        assert report.removed == [] and plain not in report.removed
        d = {x.point: x for x in report.decisions}
        assert d[frozen].keep and any("immutable until" in why for why in d[frozen].reasons)
        # garbage collection: the point's chunks stay, even in packs with dead chunks
        await r.delete(plain)
        g = await r.gc(rewrite_threshold=0.0)
        assert g.state in ("done", "nothing to do")
        await r.restore(frozen, tmp / "out")
        assert (await r.verify()).healthy
    assert same_file(tmp / "out" / "a.img", a)
    # the filesystem enforces it too: the manifest and its packs carry the immutable attribute
    manifest = repo / "points" / frozen
    assert protected(manifest)
    with pytest.raises(PermissionError):
        os.unlink(manifest)
    packs = [p for p in (repo / "packs").rglob("*") if p.is_file()]
    assert packs and all(protected(p) for p in packs)
    # once the date has passed, the point can go
    async with blockferry.open_repository(str(repo)) as r:
        later = (until + dt.timedelta(seconds=1)).isoformat()
        await r.store.delete_point(frozen, now=later)
        assert await r.points() == []
        assert not manifest.exists()
        # and garbage collection frees its packs, clearing their attribute first
        g = await r.gc()
        assert g.state == "done" and g.packs_deleted == len(packs)
    assert not any(p.exists() for p in packs)
    # the CLI says why it refused, with its own exit code
    async with blockferry.open_repository(str(repo)) as r:
        again = (await r.backup([str(a)], name="vm", immutable_days=1)).points[0]
    p = subprocess.run([sys.executable, "-m", "blockferry", "delete", str(repo), again], capture_output=True, text=True)
    assert p.returncode == 5 and "immutable until" in p.stderr


async def test_repository_setting_makes_every_point_immutable(unlock_after: Path) -> None:
    repo = unlock_after / "repo"
    await blockferry.init_repository(str(repo), block_size=BS, immutable_days=3)
    img = mixed_disk(unlock_after / "d.img", MiB)
    async with blockferry.open_repository(str(repo)) as r:
        s = await r.backup([str(img)], name="vm", immutable_days=1)  # the longer setting wins
        m = await r.point(s.points[0])
        assert dt.datetime.fromisoformat(m.immutable_until or "") - dt.datetime.fromisoformat(m.created) > dt.timedelta(days=2)
        with pytest.raises(ImmutableError):
            await r.delete(s.points[0])


async def test_copy_sends_only_missing_chunks_and_restores_bit_exact(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    await blockferry.init_repository(str(src), block_size=BS)
    await blockferry.init_repository(str(dst), block_size=BS, compression="high")
    img = mixed_disk(tmp_path / "d.img", 4 * MiB, seed=3)
    async with blockferry.open_repository(str(src)) as r:
        p1 = (await r.backup([str(img)], name="vm")).points[0]
        first = await r.copy_to(str(dst))
        assert first.points == [p1] and first.chunks_copied > 0 and first.chunks_present == 0
        with open(img, "r+b") as f:
            f.seek(MiB)
            f.write(os.urandom(BS))
        p2 = (await r.backup([str(img)], name="vm")).points[0]
        second = await r.copy_to(str(dst))
        assert second.skipped == [p1] and second.points == [p2]
        assert second.chunks_copied == 1 and second.chunks_present > 0  # only the changed block travelled
    async with blockferry.open_repository(str(dst)) as r:
        assert [p.id for p in await r.points()] == [p1, p2]
        await r.restore(p2, tmp_path / "out")
        assert (await r.verify()).healthy
    assert same_file(tmp_path / "out" / "d.img", img)


async def test_copy_refuses_another_block_size_and_stops_at_damage(tmp_path: Path) -> None:
    src, other = tmp_path / "src", tmp_path / "other"
    await blockferry.init_repository(str(src), block_size=BS)
    await blockferry.init_repository(str(other), block_size=MiB)
    img = write_disk(tmp_path / "d.img", MiB, [(0, "random", MiB)], seed=4)
    async with blockferry.open_repository(str(src)) as r:
        await r.backup([str(img)], name="vm")
        with pytest.raises(ConfigError, match="block sizes differ"):
            await r.copy_to(str(other))
    pack = next(p for p in (src / "packs").rglob("*") if p.is_file())
    data = bytearray(pack.read_bytes())
    data[100] ^= 1
    pack.write_bytes(bytes(data))
    third = tmp_path / "third"
    await blockferry.init_repository(str(third), block_size=BS)
    async with blockferry.open_repository(str(src)) as r:
        with pytest.raises(blockferry.CorruptionError, match="spread damage"):
            await r.copy_to(str(third))
    async with blockferry.open_repository(str(third)) as r:
        assert await r.points() == []  # nothing half copied


async def test_job_retention_and_immediate_copy(tmp_path: Path) -> None:
    repo, copy = tmp_path / "repo", tmp_path / "copy"
    await blockferry.init_repository(str(repo), block_size=BS)
    await blockferry.init_repository(str(copy), block_size=BS)
    img = mixed_disk(tmp_path / "d.img", 2 * MiB, seed=5)
    spec = JobSpec(name="nightly", repository="main", objects=[ObjectSpec(name="vm", disks=[DiskSpec(source=str(img))])],
                   retention=RetentionPolicy(keep_last=2),
                   copy_to=[CopyTarget(url=str(copy), retention=RetentionPolicy(keep_last=1))])
    sessions = []
    async with running_server() as server:
        await server.add_repository(RepositorySettings(name="main", url=str(repo)))
        for i in range(3):
            with open(img, "r+b") as f:
                f.seek(i * BS)
                f.write(os.urandom(100))
            sessions.append(await (await server.run_job(spec)).result())
    assert all(s.state == "success" for s in sessions)
    assert sessions[2].pruned == [sessions[0].points[0]]  # the third run removed the first point
    assert sessions[2].copied == {str(copy): sessions[2].points}
    async with blockferry.open_repository(str(repo)) as r:
        assert [p.id for p in await r.points()] == sessions[1].points + sessions[2].points
    async with blockferry.open_repository(str(copy)) as r:
        assert [p.id for p in await r.points()] == sessions[2].points  # the copy's own retention
        await r.restore("latest", tmp_path / "out")
    assert same_file(tmp_path / "out" / "d.img", img)


async def src_and_dst(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two empty repositories of the same block size, and a small disk image."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    await blockferry.init_repository(str(src), block_size=BS)
    await blockferry.init_repository(str(dst), block_size=BS)
    return src, dst, mixed_disk(tmp_path / "d.img", MiB)


async def test_copy_from_the_cli(tmp_path: Path) -> None:
    src, dst, img = await src_and_dst(tmp_path)
    async with blockferry.open_repository(str(src)) as r:
        s1 = await r.backup([str(img)], name="vm")
        await r.backup([str(img)], name="vm2")
    p = subprocess.run([sys.executable, "-m", "blockferry", "copy", str(src), str(dst), "--point", s1.points[0][:8],
                        "--json"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    import json

    out = json.loads(p.stdout)
    assert out["points"] == s1.points and out["chunks_copied"] > 0


async def test_periodic_copy_sends_the_latest_points_and_keeps_its_own_retention(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    await blockferry.init_repository(str(src), block_size=BS)
    await blockferry.init_repository(str(dst), block_size=BS, compression="high")
    img = mixed_disk(tmp_path / "d.img", MiB)
    async with blockferry.open_repository(str(src)) as r:
        runs = [await r.backup([str(img)], name=name) for name in ("vm", "vm2", "vm")]
        first = await r.copy_to(str(dst), latest=True)
        # the latest of each object: vm's second point and vm2's only one
        assert sorted(first.points) == sorted([runs[1].points[0], runs[2].points[0]])
        with img.open("r+b") as f:
            f.write(b"x" * 4096)
        newer = await r.backup([str(img)], name="vm")
        again = await r.copy_to(str(dst), latest=True, retention=RetentionPolicy(keep_last=1))
    assert again.points == newer.points and again.skipped == [runs[1].points[0]]
    assert again.pruned == [runs[2].points[0]]  # the target keeps one point per object
    async with blockferry.open_repository(str(dst)) as r:
        assert sorted(p.id for p in await r.points()) == sorted([runs[1].points[0], newer.points[0]])
        await r.restore(newer.points[0], tmp_path / "out")
    assert same_file(tmp_path / "out" / "d.img", img)


async def test_copy_latest_with_retention_from_the_cli(tmp_path: Path) -> None:
    src, dst, img = await src_and_dst(tmp_path)
    async with blockferry.open_repository(str(src)) as r:
        a = await r.backup([str(img)], name="vm")
        await r.copy_to(str(dst))
        b = await r.backup([str(img)], name="vm")
    p = subprocess.run([sys.executable, "-m", "blockferry", "copy", str(src), str(dst), "--latest", "--keep-last", "1"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert f"removed 1 point(s): {a.points[0]}" in p.stdout
    async with blockferry.open_repository(str(dst)) as r:
        assert [x.id for x in await r.points()] == b.points


async def test_a_cancelled_copy_leaves_no_lock_behind(tmp_path: Path) -> None:
    src, dst, img = await src_and_dst(tmp_path)
    other = write_disk(tmp_path / "e.img", MiB, [(0, "random", MiB)], seed=5)
    async with blockferry.open_repository(str(src)) as r:
        a = await r.backup([str(img)], name="vm")
        await r.backup([str(other)], name="vm2")
        with anyio.CancelScope() as scope:
            await r.copy_to(str(dst), progress=lambda n, total: scope.cancel())  # after the first point
        assert scope.cancelled_caught
    assert not (dst / "locks" / "writer").exists()
    async with blockferry.open_repository(str(dst)) as r:
        assert [p.id for p in await r.points()] == a.points  # the first point was copied whole
