"""Backup, incremental backup, restore and verify through the embedded API, end to end, on real
image files in a real local repository."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import anyio
import blockferry
import msgspec
import pytest
from blockferry.errors import (
    ConfigError,
    CorruptionError,
    HintError,
    NotARepositoryError,
    NotFoundError,
    RepositoryLockedError,
    SourceError,
    UnsupportedFormatError,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import KiB, MiB, allocated_bytes, mixed_disk, same_file, write_disk

pytestmark = pytest.mark.anyio

BS = 256 * KiB  # the smallest block size keeps test disks small


def repo_state(repo: Path) -> dict[str, int]:
    """Every file a repository holds, with its size (temporary files and the lock excluded)."""
    out = {}
    for p in sorted(repo.rglob("*")):
        rel = p.relative_to(repo).as_posix()
        if p.is_file() and not rel.startswith(("tmp/", "locks/")):
            out[rel] = p.stat().st_size
    return out


async def new_repo(path: Path, block_size: int = BS, compression: str = "default") -> Path:
    await blockferry.init_repository(str(path), block_size=block_size, compression=compression)
    return path


async def test_full_backup_restores_bit_exact_with_holes(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path / "repo")
    a = mixed_disk(tmp_path / "a.img", 8 * MiB, seed=1)
    b = mixed_disk(tmp_path / "b.img", 8 * MiB + 12345, seed=2)  # odd size: a partial last block
    async with blockferry.open_repository(str(repo)) as r:
        session = await r.backup([str(a), str(b)], name="vm1")
        assert session.state == "success", session
        (point,) = session.points
        results = await r.restore(point, tmp_path / "out")
    assert {x.disk for x in results} == {"a.img", "b.img"}
    for img in (a, b):
        out = tmp_path / "out" / img.name
        assert same_file(out, img)
        assert out.stat().st_size == img.stat().st_size
        # holes stay holes: the restored image allocates about what the original does, far less
        # than its size
        assert allocated_bytes(out) <= allocated_bytes(img) + 2 * BS
    stats = session.objects[0].disks[0].stats
    assert stats.zero_bytes > 0 and stats.read_bytes < stats.disk_size


@st.composite
def layouts(draw: st.DrawFn) -> tuple[int, list[tuple[int, str, int]]]:
    size = draw(st.integers(min_value=1, max_value=3 * MiB + 4097))
    segs = draw(st.lists(
        st.tuples(st.integers(0, size - 1), st.sampled_from(["random", "text", "ones", "zeros"]),
                  st.integers(1, 2 * BS)),
        max_size=6,
    ))
    return size, segs


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=layouts(), dup=st.booleans())
async def test_roundtrip_any_layout(layout: tuple[int, list[tuple[int, str, int]]], dup: bool) -> None:
    """Whatever the mix of zeros, duplicates, random data and odd sizes, a restore is exact."""
    size, segs = layout
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        img = write_disk(tmp / "d.img", size, segs, seed=size)
        disks = [img]
        if dup:  # a second disk with the same content: deduplicated against the first
            disks.append(tmp / "copy.img")
            shutil.copyfile(img, disks[1])
        repo = await new_repo(tmp / "repo")
        async with blockferry.open_repository(str(repo)) as r:
            session = await r.backup([str(x) for x in disks], name="vm")
            assert session.state == "success"
            await r.restore(session.points[0], tmp / "out")
            report = await r.verify()
        assert report.healthy
        for x in disks:
            assert same_file(tmp / "out" / x.name, x)
        # each distinct non-zero block is stored once, whatever the number of copies
        stored = sum(d.stats.new_bytes for d in session.objects[0].disks)
        assert stored == distinct_data_bytes(img)


def distinct_data_bytes(img: Path, bs: int = BS) -> int:
    seen: dict[bytes, int] = {}
    data = img.read_bytes()
    for off in range(0, len(data), bs):
        block = data[off:off + bs]
        if block.count(0) != len(block):
            seen[block] = len(block)
    return sum(seen.values())


def change(img: Path, offset: int, data: bytes) -> tuple[int, int]:
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return offset, len(data)


async def test_incremental_with_hints_reads_only_changed_blocks(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path / "repo")
    img = mixed_disk(tmp_path / "d.img", 8 * MiB, seed=3)
    keep = tmp_path / "gen0.img"
    shutil.copyfile(img, keep)
    async with blockferry.open_repository(str(repo)) as r:
        s0 = await r.backup([str(img)], name="vm")
        ext = [change(img, 3 * BS + 100, os.urandom(1000)), change(img, 7 * MiB, os.urandom(BS))]
        hints = tmp_path / "hints"
        hints.write_text("".join(f"{o} {n}\n" for o, n in ext))
        before = repo_state(repo)
        s1 = await r.backup([str(img)], name="vm", hints={str(img): str(hints)})
        assert s1.state == "success" and not s1.warnings
        d = s1.objects[0].disks[0]
        assert d.plan.startswith("incremental")
        assert d.stats.read_bytes == 2 * BS  # one block for each changed extent, nothing else
        assert d.stats.unchanged_bytes == 8 * MiB - 2 * BS - d.stats.zero_bytes
        grown = sum(repo_state(repo).values()) - sum(before.values())
        assert grown < 3 * BS  # the two new blocks (one compressible), index and manifest
        m = await r.point(s1.points[0])
        assert m.disks[0].base == s0.points[0] and m.disks[0].hinted
        await r.restore(s0.points[0], tmp_path / "p0")
        await r.restore(s1.points[0], tmp_path / "p1")
    assert same_file(tmp_path / "p0" / "d.img", keep)
    assert same_file(tmp_path / "p1" / "d.img", img)


async def test_incremental_accepts_rbd_diff_json(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path / "repo")
    img = mixed_disk(tmp_path / "d.img", 4 * MiB, seed=4)
    async with blockferry.open_repository(str(repo)) as r:
        await r.backup([str(img)], name="vm")
        change(img, BS, os.urandom(10))
        change(img, 3 * MiB, bytes(BS))  # a block zeroed: rbd reports it as not existing
        hints = tmp_path / "diff.json"
        hints.write_text(f'[{{"offset": {BS}, "length": 10, "exists": "true"}},'
                         f' {{"offset": {3 * MiB}, "length": {BS}, "exists": "false"}}]')
        s1 = await r.backup([str(img)], name="vm", hints={str(img): str(hints)})
        assert s1.objects[0].disks[0].stats.read_bytes <= 2 * BS
        await r.restore("latest", tmp_path / "out")
    assert same_file(tmp_path / "out" / "d.img", img)


async def test_incremental_without_hints_stores_only_changes(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path / "repo")
    img = mixed_disk(tmp_path / "d.img", 8 * MiB, seed=5)
    async with blockferry.open_repository(str(repo)) as r:
        await r.backup([str(img)], name="vm")
        change(img, 5 * BS + 7, os.urandom(50))
        s1 = await r.backup([str(img)], name="vm")
        d = s1.objects[0].disks[0].stats
        assert d.read_bytes > 4 * BS  # the whole disk's data was read again...
        assert d.new_bytes == BS  # ...but only the changed block is stored
        assert d.dedup_bytes >= 4 * BS
        await r.restore("latest", tmp_path / "out")
    assert same_file(tmp_path / "out" / "d.img", img)


async def test_deduplication_across_disks_and_points(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path / "repo")
    a = write_disk(tmp_path / "a.img", 4 * MiB, [(0, "random", 4 * MiB)], seed=6)
    b = tmp_path / "b.img"
    shutil.copyfile(a, b)
    async with blockferry.open_repository(str(repo)) as r:
        s = await r.backup([str(a)], name="vm-a")
        one_disk = sum(repo_state(repo).values())
        s2 = await r.backup([str(b)], name="vm-b")  # another VM with the same data
        s3 = await r.backup([str(a)], name="vm-a")  # the same VM again
    for sess in (s2, s3):
        st_ = sess.objects[0].disks[0].stats
        assert st_.new_bytes == 0 and st_.dedup_bytes == 4 * MiB
    packs = [k for k in repo_state(repo) if k.startswith("packs/")]
    pack_bytes = sum(v for k, v in repo_state(repo).items() if k.startswith("packs/"))
    assert pack_bytes < 4 * MiB + 64 * KiB  # one copy, whatever the number of points
    assert sum(repo_state(repo).values()) < one_disk + 64 * KiB
    assert len(packs) == 1 and s.points


@pytest.mark.parametrize("new_size", [6 * MiB + 1000, 11 * MiB + 3])
async def test_disk_that_changed_size(tmp_path: Path, new_size: int) -> None:
    repo = await new_repo(tmp_path / "repo")
    img = mixed_disk(tmp_path / "d.img", 8 * MiB + 500, seed=7)
    async with blockferry.open_repository(str(repo)) as r:
        await r.backup([str(img)], name="vm")
        old = img.stat().st_size
        with open(img, "r+b") as f:
            f.truncate(new_size)
            if new_size > old:
                f.seek(old)
                f.write(os.urandom(new_size - old))
        change(img, 2 * BS, b"changed")
        hints = tmp_path / "h"
        hints.write_text(f"{2 * BS} 7\n")
        s = await r.backup([str(img)], name="vm", hints={str(img): str(hints)})
        assert s.state == "success"
        m = await r.point("latest")
        assert m.disks[0].size == new_size
        await r.restore("latest", tmp_path / "out")
    assert same_file(tmp_path / "out" / "d.img", img)


async def test_hints_without_a_base_fall_back_to_a_full_read(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path / "repo")
    img = mixed_disk(tmp_path / "d.img", 4 * MiB, seed=8)
    hints = tmp_path / "h"
    hints.write_text("0 10\n")
    async with blockferry.open_repository(str(repo)) as r:
        s = await r.backup([str(img)], name="vm", hints={str(img): str(hints)})
        assert s.state == "warning"
        assert any("hints not used" in w for w in s.warnings)
        assert s.objects[0].disks[0].plan.startswith("full read")
        await r.restore("latest", tmp_path / "out")
    assert same_file(tmp_path / "out" / "d.img", img)


async def test_restore_one_disk_onto_an_existing_file(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path / "repo")
    a = mixed_disk(tmp_path / "a.img", 4 * MiB, seed=9)
    b = mixed_disk(tmp_path / "b.img", 4 * MiB, seed=10)
    target = write_disk(tmp_path / "target.img", 9 * MiB, [(0, "random", 9 * MiB)], seed=11)
    async with blockferry.open_repository(str(repo)) as r:
        s = await r.backup([str(a), str(b)], name="vm")
        with pytest.raises(ConfigError, match="2 disks"):
            await r.restore_onto(s.points[0], target)
        res = await r.restore_onto(s.points[0], target, disk="b.img")
        assert res.disk == "b.img"
        with pytest.raises(NotFoundError):
            await r.restore_onto(s.points[0], tmp_path / "missing.img", disk="b.img")
    assert same_file(target, b)  # every stale byte of the old, larger content is gone


async def test_restore_refuses_to_overwrite_without_asking(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path / "repo")
    img = mixed_disk(tmp_path / "d.img", 2 * MiB, seed=12)
    out = tmp_path / "out"
    out.mkdir()
    (out / "d.img").write_bytes(b"precious")
    async with blockferry.open_repository(str(repo)) as r:
        await r.backup([str(img)], name="vm")
        with pytest.raises(ConfigError, match="exists"):
            await r.restore("latest", out)
        assert (out / "d.img").read_bytes() == b"precious"
        await r.restore("latest", out, overwrite=True)
    assert same_file(out / "d.img", img)


def flip_first_pack_byte(repo: Path, at: int = 64) -> Path:
    pack = next(p for p in (repo / "packs").rglob("*") if p.is_file())
    data = bytearray(pack.read_bytes())
    data[at] ^= 0xFF
    pack.write_bytes(bytes(data))
    return pack


async def test_damaged_chunk_is_never_restored_silently(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path / "repo")
    img = write_disk(tmp_path / "d.img", 2 * MiB, [(0, "random", 2 * MiB)], seed=13)
    async with blockferry.open_repository(str(repo)) as r:
        s = await r.backup([str(img)], name="vm")
        point = s.points[0]
    flip_first_pack_byte(repo)
    async with blockferry.open_repository(str(repo)) as r:
        with pytest.raises(CorruptionError) as err:
            await r.restore(point, tmp_path / "out")
        msg = str(err.value)
        assert point in msg and "d.img" in msg and "offset 0" in msg
        # no file that looks complete was left behind
        assert not (tmp_path / "out" / "d.img").exists()
        assert not list((tmp_path / "out").glob(".*partial"))
        report = await r.verify()
    assert not report.healthy
    assert len(report.damaged) == 1
    assert [(a.point, a.disk, a.offsets) for a in report.affected] == [(point, "d.img", [0])]


async def test_verify_reports_a_missing_pack(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path / "repo")
    img = write_disk(tmp_path / "d.img", 2 * MiB, [(0, "random", 2 * MiB)], seed=14)
    async with blockferry.open_repository(str(repo)) as r:
        await r.backup([str(img)], name="vm")
        assert (await r.verify()).healthy
    for p in (repo / "packs").rglob("*"):
        if p.is_file():
            p.unlink()
    async with blockferry.open_repository(str(repo)) as r:
        report = await r.verify()
    assert not report.healthy and report.affected[0].damaged_blocks == 8


# -- bad input: a clear error, and nothing changed -------------------------------------------------


async def test_missing_source_changes_nothing(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path / "repo")
    img = mixed_disk(tmp_path / "d.img", 2 * MiB)
    before = repo_state(repo)
    async with blockferry.open_repository(str(repo)) as r:
        with pytest.raises(SourceError, match="nope.img"):
            await r.backup([str(img), str(tmp_path / "nope.img")], name="vm")
    assert repo_state(repo) == before
    assert not (repo / "locks" / "writer").exists()


async def test_bad_hint_file_changes_nothing(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path / "repo")
    img = mixed_disk(tmp_path / "d.img", 2 * MiB)
    bad = tmp_path / "hints"
    bad.write_text("0 100\nthis is not a hint\n")
    beyond = tmp_path / "beyond"
    beyond.write_text(f"{2 * MiB - 10} 100\n")
    before = repo_state(repo)
    async with blockferry.open_repository(str(repo)) as r:
        with pytest.raises(HintError, match="line 2"):
            await r.backup([str(img)], hints={str(img): str(bad)})
        with pytest.raises(HintError, match="beyond the disk"):
            await r.backup([str(img)], hints={str(img): str(beyond)})
        with pytest.raises(HintError, match="does not exist"):
            await r.backup([str(img)], hints={str(img): str(tmp_path / "missing")})
        with pytest.raises(ConfigError, match="not among the sources"):
            await r.backup([str(img)], hints={"other.img": str(bad)})
    assert repo_state(repo) == before


async def test_not_a_repository(tmp_path: Path) -> None:
    with pytest.raises(NotARepositoryError):
        async with blockferry.open_repository(str(tmp_path)):
            pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        await blockferry.init_repository(str(tmp_path))


async def test_break_lock_removes_a_dead_writers_lock(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path / "repo")
    img = mixed_disk(tmp_path / "a.img", MiB)
    (repo / "locks").mkdir(exist_ok=True)
    # a lock of a process on another host: never judged stale, only an operator removes it
    (repo / "locks" / "writer").write_bytes(msgspec.json.encode(
        {"host": "elsewhere", "pid": 7, "pid_start": "", "created": "2026-01-01", "purpose": "backup"}))
    async with blockferry.open_repository(str(repo)) as r:
        with pytest.raises(RepositoryLockedError):
            await r.backup([str(img)])
        holder = await r.break_lock()
        assert holder is not None and (holder.host, holder.pid, holder.purpose) == ("elsewhere", 7, "backup")
        assert not (repo / "locks" / "writer").exists()
        assert await r.break_lock() is None  # nothing left to remove
        session = await r.backup([str(img)])
    assert session.state == "success"


async def test_unknown_format_version_is_refused(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path / "repo")
    cfg = (repo / "config").read_text().replace('"version": 1', '"version": 99')
    (repo / "config").write_text(cfg)
    with pytest.raises(UnsupportedFormatError, match="99"):
        async with blockferry.open_repository(str(repo)):
            pass


async def test_corrupted_manifest_is_named(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path / "repo")
    img = mixed_disk(tmp_path / "d.img", 2 * MiB)
    async with blockferry.open_repository(str(repo)) as r:
        s = await r.backup([str(img)], name="vm")
    (repo / "points" / s.points[0]).write_bytes(b"garbage")
    async with blockferry.open_repository(str(repo)) as r:
        (pt,) = await r.points()  # listed, as damaged, with the reason
        assert pt.id == s.points[0] and pt.damaged and "damaged" in (pt.error or "")
        with pytest.raises(CorruptionError, match=s.points[0]):
            await r.restore(s.points[0], tmp_path / "out")


@pytest.mark.parametrize("block_size", [0, 128 * KiB, 3 * MiB, 16 * MiB])
async def test_block_size_out_of_range(tmp_path: Path, block_size: int) -> None:
    with pytest.raises(ConfigError, match="256 KiB to 8 MiB"):
        await blockferry.init_repository(str(tmp_path / "repo"), block_size=block_size)
    assert not (tmp_path / "repo" / "config").exists()


async def test_point_references(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path / "repo")
    img = mixed_disk(tmp_path / "d.img", 2 * MiB)
    async with blockferry.open_repository(str(repo)) as r:
        with pytest.raises(NotFoundError, match="no restore points"):
            await r.point("latest")
        s1 = await r.backup([str(img)], name="vm")
        s2 = await r.backup([str(img)], name="other")
        assert (await r.point("latest")).id == s2.points[0]
        assert (await r.point("latest", object="vm")).id == s1.points[0]
        assert (await r.point(s1.points[0][:6])).id == s1.points[0]
        with pytest.raises(NotFoundError):
            await r.point("zzzzzz")
        assert [p.id for p in await r.points()] == [s1.points[0], s2.points[0]]
        assert [p.id for p in await r.points(object="other")] == [s2.points[0]]


@pytest.mark.parametrize("compression", ["none", "fast", "default", "high"])
async def test_every_compression_level_roundtrips(tmp_path: Path, compression: str) -> None:
    repo = await new_repo(tmp_path / "repo", compression=compression)
    img = mixed_disk(tmp_path / "d.img", 2 * MiB)
    async with blockferry.open_repository(str(repo)) as r:
        s = await r.backup([str(img)], name="vm")
        st_ = s.objects[0].disks[0].stats
        if compression == "none":
            assert st_.compressed_bytes == st_.new_bytes
        else:
            assert st_.compressed_bytes < st_.new_bytes  # the text part compresses
        await r.restore("latest", tmp_path / "out")
    assert same_file(tmp_path / "out" / "d.img", img)


async def test_block_sizes(tmp_path: Path) -> None:
    for bs in (256 * KiB, 1 * MiB, 8 * MiB):
        repo = await new_repo(tmp_path / f"repo{bs}", block_size=bs)
        img = mixed_disk(tmp_path / f"d{bs}.img", 9 * MiB + 17, seed=bs)
        async with blockferry.open_repository(str(repo)) as r:
            s = await r.backup([str(img)], name="vm")
            m = await r.point(s.points[0])
            assert m.block_size == bs and len(m.disks[0].blocks) == -(-img.stat().st_size // bs) * 32
            await r.restore("latest", tmp_path / f"out{bs}")
        assert same_file(tmp_path / f"out{bs}" / img.name, img)


async def test_progress_is_reported(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path / "repo")
    img = mixed_disk(tmp_path / "d.img", 4 * MiB)
    seen = []
    async with blockferry.open_repository(str(repo)) as r:
        await r.backup([str(img)], name="vm", progress=seen.append, progress_interval=0.001)
    assert seen and seen[-1].tasks[0].state == "done"
    assert seen[-1].tasks[0].done_bytes == seen[-1].tasks[0].total_bytes == 4 * MiB
    await anyio.sleep(0)


async def test_numbers_that_could_hang_or_overflow_are_refused_before_anything_starts(tmp_path: Path) -> None:
    """A task limit of 0 used to wait forever for a slot, holding the writer lock."""
    repo = await new_repo(tmp_path / "repo")
    img = mixed_disk(tmp_path / "d.img", MiB)
    before = repo_state(repo)
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="max_tasks"):
            async with blockferry.open_repository(str(repo), max_tasks=bad):
                pass
    async with blockferry.open_repository(str(repo)) as r:
        for kwargs, field in (({"retries": -1}, "retries"), ({"retry_delay": float("nan")}, "retry_delay"),
                              ({"immutable_days": 0}, "immutable_days"), ({"immutable_days": 10**9}, "immutable_days"),
                              ({"name": "two\nlines"}, "name")):
            with pytest.raises(ConfigError, match=field):
                await r.backup([str(img)], **kwargs)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="more than once"):
            await r.backup([str(img), str(img)])
        for sample in (0, 500, float("nan"), -1):
            with pytest.raises(ConfigError, match="sample"):
                await r.verify(sample=sample)
        for kwargs in ({"rewrite_threshold": 5}, {"rewrite_threshold": float("nan")}, {"rewrite_threshold": -0.1},
                       {"wait": -1}, {"wait": float("inf")}):
            with pytest.raises(ConfigError):
                await r.gc(**kwargs)
        with pytest.raises(ConfigError, match="older_than_days"):
            await r.archive(older_than_days=-5)
    assert repo_state(repo) == before and not (repo / "locks" / "writer").exists()
    for days in (-5, 0, 10**6):
        with pytest.raises(ConfigError, match="immutable"):
            await blockferry.init_repository(str(tmp_path / f"r{days}"), immutable_days=days)
    with pytest.raises(ConfigError, match="already holds a repository"):
        await blockferry.init_repository(str(repo))


async def test_the_free_space_refusal_names_the_repository(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path / "store")
    img = mixed_disk(tmp_path / "d.img", MiB)
    async with blockferry.open_repository(str(repo)) as r:
        async def nearly_full() -> int:
            return 1000

        r.store.backend.free_space = nearly_full  # type: ignore[method-assign]
        session = await r.backup([str(img)], retries=0)
    error = session.objects[0].error or ""
    assert session.state == "failed" and f"repository store at {repo}" in error, error
    assert "repository repository" not in error and "1000 B free" in error
