"""Damage suite: every kind of file in a repository, damaged in several ways.

For each case: ``verify`` reports the damage (exit 3) or it is harmless (exit 0); every point
that does not need the damaged bytes restores bit-exact, and a point that does restores with
``allow_damaged`` with every block whose chunk is intact bit-exact; ``repair`` then ``gc`` never
lose a chunk whose bytes are intact; the next backup works.

What is intact is decided by an oracle that does not use the code under test: a chunk is intact
when some copy of it, at the place the pristine repository's index put it, still decodes to its
id in the damaged repository.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.to_thread
import blockferry
import pytest
from blockferry.cli.core import main as cli_main
from blockferry.errors import CorruptionError
from blockferry.repo.chunks import decode_chunk
from blockferry.repo.format import (
    DIGEST_SIZE,
    HOLE,
    INDEX_RECORD,
    PACK_FOOTER,
    PACK_RECORD,
    decode_index,
    decode_manifest,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import KiB, write_disk

pytestmark = pytest.mark.anyio

BS = 256 * KiB
DISK = 1024 * KiB


class Pristine:
    """A small repository (packs of two or three chunks, three points of two objects, three
    index files), the images of its points, and what its index and manifests say."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.repo = root / "repo"
        self.images: dict[str, Path] = {}  # point → the image it holds
        self.entries: list[tuple[bytes, str, int, int, int, int]] = []  # digest, pack, off, len, raw, flags
        self.refs: dict[str, list[bytes]] = {}  # point → its block map
        self.order: list[str] = []  # points, oldest first

    async def build(self) -> None:
        await blockferry.init_repository(str(self.repo), block_size=BS, pack_size=2 * BS + 4 * KiB)
        a = write_disk(self.root / "a.img", DISK, [(0, "random", 512 * KiB), (512 * KiB, "text", 256 * KiB)], seed=1)
        b = write_disk(self.root / "b.img", DISK, [(0, "text", 256 * KiB), (256 * KiB, "random", 768 * KiB)], seed=2)
        async with blockferry.open_repository(str(self.repo)) as r:
            for img, name in ((a, "a"), (b, "b")):
                (pid,) = (await r.backup([str(img)], name=name)).points
                self._keep(pid, img)
            with open(a, "r+b") as f:  # an incremental of a: one block changed
                f.seek(768 * KiB)
                f.write(os.urandom(BS))
            (pid,) = (await r.backup([str(a)], name="a")).points
            self._keep(pid, a)
        for f in sorted((self.repo / "index").iterdir()):
            idx = decode_index(f.read_bytes(), f.name)
            for digest, pno, off, n, raw_len, flags in INDEX_RECORD.iter_unpack(idx.records):
                self.entries.append((digest, idx.packs[pno], off, n, raw_len, flags))
        for pid in self.order:
            m = decode_manifest((self.repo / "points" / pid).read_bytes(), pid)
            b = m.disks[0].blocks
            self.refs[pid] = [b[i:i + DIGEST_SIZE] for i in range(0, len(b), DIGEST_SIZE)]

    def _keep(self, pid: str, img: Path) -> None:
        copy = self.root / f"{pid}.img"
        shutil.copyfile(img, copy)
        self.images[pid] = copy
        self.order.append(pid)

    def intact(self, repo: Path) -> set[bytes]:
        """Chunks with a copy that still decodes to its id, where the pristine index put it."""
        out = set()
        for digest, pack, off, n, raw_len, flags in self.entries:
            path = repo / "packs" / pack[:2] / pack
            try:
                with open(path, "rb") as f:
                    f.seek(off)
                    stored = f.read(n)
                decode_chunk(stored, raw_len, flags, digest)
            except (OSError, CorruptionError):
                continue
            out.add(digest)
        return out


_pristine: dict[str, Pristine] = {}


@pytest.fixture
async def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    """Built once for the module (both event loops share it: the files are the same)."""
    if "p" not in _pristine:
        p = Pristine(tmp_path_factory.mktemp("pristine"))
        await p.build()
        _pristine["p"] = p
    return _pristine["p"]


# -- ways to damage a file ---------------------------------------------------------------------


def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at % len(data)] ^= 0x41
    path.write_bytes(bytes(data))


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(max(0, size))


def junk(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"junk\n")


def packs(repo: Path) -> list[Path]:
    return sorted(p for p in (repo / "packs").rglob("*") if p.is_file())


def busiest_pack(p: Pristine, repo: Path) -> Path:
    """The pack with the most chunks that points use (damage there costs the most)."""
    count: dict[str, int] = {}
    for digest, pack, *_ in p.entries:
        count[pack] = count.get(pack, 0) + 1
    pack = max(sorted(count), key=lambda k: count[k])
    return repo / "packs" / pack[:2] / pack


def pack_layout(p: Pristine, path: Path) -> tuple[int, int, int]:
    """(first chunk's offset, its length, where the records start) of a pack."""
    mine = sorted((off, n) for _, pack, off, n, *_ in p.entries if pack == path.name)
    size = path.stat().st_size
    records = size - PACK_FOOTER.size - len(mine) * PACK_RECORD.size
    return mine[0][0], mine[0][1], records


def first_index(repo: Path) -> Path:
    return sorted((repo / "index").iterdir())[0]


def base_point(p: Pristine, repo: Path) -> Path:
    return repo / "points" / p.order[0]  # the base of the incremental


def only_point_of_b(p: Pristine, repo: Path) -> Path:
    return repo / "points" / p.order[1]  # its chunks are used by no other point


Damage = Callable[[Pristine, Path], None]


def _pack_at(region: str) -> Damage:
    def damage(p: Pristine, repo: Path) -> None:
        path = busiest_pack(p, repo)
        first, n, records = pack_layout(p, path)
        size = path.stat().st_size
        at = {"header": 3, "payload": first + n // 2, "records": records + 5, "record-offset": records + 33,
              "footer-count": size - 16, "footer-crc": size - 11, "footer-magic": size - 3}[region]
        flip(path, at)
    return damage


def _pack_truncate(where: str) -> Damage:
    def damage(p: Pristine, repo: Path) -> None:
        path = busiest_pack(p, repo)
        first, n, records = pack_layout(p, path)
        truncate(path, {"footer": path.stat().st_size - 10, "payload": records - 100}[where])
    return damage


def _pack_other(how: str) -> Damage:
    def damage(p: Pristine, repo: Path) -> None:
        path = busiest_pack(p, repo)
        if how == "deleted":
            path.unlink()
        elif how == "zeroed":
            path.write_bytes(bytes(path.stat().st_size))
        elif how == "appended":
            with open(path, "ab") as f:
                f.write(b"trailing garbage")
    return damage


def _file(pick: Callable[[Pristine, Path], Path], how: str) -> Damage:
    def damage(p: Pristine, repo: Path) -> None:
        path = pick(p, repo)
        if how == "junk":
            junk(path)
        elif how == "flip":
            flip(path, path.stat().st_size // 2)
        elif how == "truncate":
            truncate(path, path.stat().st_size // 2)
        elif how == "deleted":
            path.unlink()
        elif how == "empty":
            path.write_bytes(b"")
    return damage


def _at(key: str) -> Callable[[Pristine, Path], Path]:
    return lambda p, repo: repo / key


def _health_wrong_types(p: Pristine, repo: Path) -> None:
    (repo / "health").mkdir(exist_ok=True)
    (repo / "health" / "damaged").write_text('{"version": 1, "checked": 5, "damaged": [{"chunk": "zz"}]}')


#: (case, damage, exit code of verify: 3 damage reported, 0 harmless)
CASES: list[tuple[str, Damage, int]] = [
    *[(f"pack-{r}", _pack_at(r), 3) for r in
      ("header", "payload", "records", "record-offset", "footer-count", "footer-crc", "footer-magic")],
    ("pack-truncated-footer", _pack_truncate("footer"), 3),
    ("pack-truncated-payload", _pack_truncate("payload"), 3),
    ("pack-deleted", _pack_other("deleted"), 3),
    ("pack-zeroed", _pack_other("zeroed"), 3),
    ("pack-appended", _pack_other("appended"), 3),
    *[(f"index-{h}", _file(lambda p, repo: first_index(repo), h), 3) for h in ("junk", "flip", "truncate", "deleted")],
    *[(f"manifest-{h}", _file(base_point, h), 3) for h in ("junk", "flip", "truncate", "empty")],
    ("manifest-deleted", _file(only_point_of_b, "deleted"), 0),
    ("lock-writer-junk", _file(_at("locks/writer"), "junk"), 0),
    ("lock-gc-junk", _file(_at("locks/gc"), "junk"), 0),
    ("lock-reader-junk", _file(_at("locks/read-0123456789abcdef"), "junk"), 0),
    ("gc-plan-junk", _file(_at("gc/plan"), "junk"), 0),
    ("health-junk", _file(_at("health/damaged"), "junk"), 0),
    ("health-wrong-types", _health_wrong_types, 0),
    ("stray-in-points", _file(_at("points/hello.txt"), "junk"), 0),
    ("stray-in-packs", _file(_at("packs/zz/notapack"), "junk"), 0),
    ("stray-in-index", _file(_at("index/README"), "junk"), 0),
    ("junk-named-as-a-pack", _file(_at("packs/ab/ab" + "0" * 30), "junk"), 3),
    ("junk-named-as-an-index", _file(_at("index/" + "0" * 32), "junk"), 3),
    ("stray-at-top", _file(_at("hello.txt"), "junk"), 0),
]


async def cli(*args: str) -> int:
    return await anyio.to_thread.run_sync(cli_main, list(args))


async def check_points(p: Pristine, repo: Path, out: Path, intact: set[bytes], *, alive: set[str]) -> None:
    """Every point in ``alive`` whose manifest is whole restores: bit-exact where it needs only
    intact chunks; with allow_damaged otherwise, every block of an intact chunk bit-exact."""
    async with blockferry.open_repository(str(repo)) as r:
        listed = {pt.id: pt for pt in await r.points()}
        for pid in p.order:
            if pid not in alive:
                continue
            manifest = repo / "points" / pid
            whole = manifest.exists() and manifest.read_bytes() == (p.repo / "points" / pid).read_bytes()
            if not whole:
                if manifest.exists():  # listed, as damaged
                    assert listed[pid].damaged and listed[pid].error
                continue
            refs = p.refs[pid]
            want = p.images[pid].read_bytes()
            dest = out / pid
            if all(d == HOLE or d in intact for d in refs):
                (res,) = await r.restore(pid, dest)
                assert Path(res.path).read_bytes() == want, pid
                continue
            (res,) = await r.restore(pid, dest, allow_damaged=True)
            got = Path(res.path).read_bytes()
            for i, d in enumerate(refs):
                if d == HOLE or d in intact:
                    assert got[i * BS:(i + 1) * BS] == want[i * BS:(i + 1) * BS], (pid, i)


@pytest.mark.parametrize("case,damage,code", CASES, ids=[c[0] for c in CASES])
async def test_damage(tmp_path: Path, pristine: Pristine, case: str, damage: Damage, code: int) -> None:
    p = pristine
    repo = tmp_path / "repo"
    shutil.copytree(p.repo, repo)
    damage(p, repo)
    intact = p.intact(repo)
    alive = set(p.order)

    strays = [f for f in repo.rglob("*") if f.is_file() and f.name in ("hello.txt", "notapack", "README")]

    # verify: the damage is reported (3), or it is harmless (0)
    assert await cli("verify", str(repo)) == code, case
    if case == "manifest-deleted":  # nothing to see but data no point uses: verify says so
        async with blockferry.open_repository(str(repo)) as r:
            report = await r.verify()
        assert report.unreferenced_packs and any("manifests may be lost" in n for n in report.notes)
    # every point that does not need the damaged bytes comes back bit-exact
    await check_points(p, repo, tmp_path / "before", intact, alive=alive)
    # backups go on, before any repair (a damaged base is skipped)
    img = write_disk(tmp_path / "a0.img", DISK, [(0, "random", DISK)], seed=8)
    async with blockferry.open_repository(str(repo)) as r:
        s = await r.backup([str(img)], name="a")
        assert s.state == "success", s
        (res,) = await r.restore(s.points[0], tmp_path / "early")
        assert Path(res.path).read_bytes() == img.read_bytes()

    # repair, then gc (which refuses while a manifest is damaged: such a point is deleted first,
    # as docs/lifecycle.md says), never lose an intact chunk
    assert await cli("repair", str(repo)) in (0, 3)
    async with blockferry.open_repository(str(repo)) as r:
        for pt in await r.points():
            if pt.error:
                await r.delete(pt.id)
                alive.discard(pt.id)
    assert await cli("gc", str(repo), "--rewrite-threshold", "0.01") == 0
    await check_points(p, repo, tmp_path / "after", intact, alive=alive)
    async with blockferry.open_repository(str(repo)) as r:
        report = await r.verify()
        # what is left damaged is only what lost its bytes
        lost = {bytes.fromhex(d.chunk) for d in report.damaged}
        assert not (lost & intact), case
        assert not report.unreadable

        # the next backup works, and its point is whole
        img = write_disk(tmp_path / "a.img", DISK, [(0, "random", DISK)], seed=9)
        s = await r.backup([str(img)], name="a")
        assert s.state == "success", s
        (res,) = await r.restore(s.points[0], tmp_path / "next")
        assert Path(res.path).read_bytes() == img.read_bytes()
    # stray files are ignored, never deleted
    assert all(f.exists() for f in strays)


async def test_config_damage_is_reported(tmp_path: Path, pristine: Pristine) -> None:
    """Without its config nothing can be read: every way of damaging it says so (exit 3)."""
    for how in ("junk", "flip", "truncate"):
        repo = tmp_path / how
        shutil.copytree(pristine.repo, repo)
        if how == "flip":  # its first byte: no longer JSON
            flip(repo / "config", 0)
        else:
            _file(_at("config"), how)(pristine, repo)
        assert await cli("verify", str(repo)) == 3, how
        assert await cli("points", str(repo)) == 3, how


async def test_unreadable_is_not_damaged(tmp_path: Path, pristine: Pristine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pack that cannot be read for a while (permissions, I/O, a timeout) is reported as
    unreadable; the health record is left alone; once readable, all is well, and a mark left
    by an older check is cleared when the copy reads back correctly."""
    from blockferry.errors import RepositoryError
    from blockferry.plugins.local import LocalBackend

    repo = tmp_path / "repo"
    shutil.copytree(pristine.repo, repo)
    victim = busiest_pack(pristine, repo).name
    real_get = LocalBackend.get

    async def failing_get(self: LocalBackend, key: str, offset: int = 0, length: int | None = None) -> bytes:
        if key.endswith(victim):
            raise RepositoryError(f"reading {key}: Input/output error")
        return await real_get(self, key, offset, length)

    with monkeypatch.context() as m:
        m.setattr(LocalBackend, "get", failing_get)
        assert await cli("verify", str(repo)) == 1  # incomplete, not damaged
    assert not (repo / "health" / "damaged").exists()
    assert await cli("verify", str(repo)) == 0

    # a mark an older blockferry left for a good copy (a read error it took for damage)
    digest = next(d for d, pack, *_ in pristine.entries if pack == victim)
    (repo / "health").mkdir(exist_ok=True)
    (repo / "health" / "damaged").write_text(
        f'{{"version": 1, "checked": "2026-01-01T00:00:00+00:00", "damaged": [{{"chunk": "{digest.hex()}", '
        f'"pack": "{victim}", "reason": "cannot read: timeout", "found": "2026-01-01T00:00:00+00:00"}}], '
        f'"points": {list(pristine.order)!r}}}'.replace("'", '"'))
    async with blockferry.open_repository(str(repo)) as r:
        pid = next(pid for pid in pristine.order if digest in pristine.refs[pid])
        # allow_damaged never zeroes a chunk that reads back correctly
        (res,) = await r.restore(pid, tmp_path / "out", allow_damaged=True)
        assert res.damaged_ranges == [] and Path(res.path).read_bytes() == pristine.images[pid].read_bytes()
        report = await r.verify()
        assert report.healthy and report.cleared == 1
        assert not any(pt.damaged for pt in await r.points())
    assert not (repo / "health" / "damaged").exists()


async def test_footer_crc_flip_then_repair_then_gc_loses_nothing(tmp_path: Path, pristine: Pristine) -> None:
    """The reported chain: verify said healthy, repair dropped the pack from the index, gc
    deleted it as an orphan with every intact chunk in it."""
    repo = tmp_path / "repo"
    shutil.copytree(pristine.repo, repo)
    path = busiest_pack(pristine, repo)
    _pack_at("footer-crc")(pristine, repo)
    chunks = {d for d, pack, *_ in pristine.entries if pack == path.name}
    assert await cli("verify", str(repo)) == 3
    assert await cli("repair", str(repo)) == 0  # every chunk salvaged
    assert await cli("gc", str(repo)) == 0
    assert not path.exists()  # salvaged into a new pack, then removed
    assert chunks <= {d for d, *_ in pristine.entries}
    async with blockferry.open_repository(str(repo)) as r:
        assert (await r.verify()).healthy
        for pid in pristine.order:
            (res,) = await r.restore(pid, tmp_path / pid)
            assert Path(res.path).read_bytes() == pristine.images[pid].read_bytes()


async def test_gc_keeps_an_unindexed_pack_that_points_need(tmp_path: Path, pristine: Pristine) -> None:
    """Whatever the index says: an index file deleted by hand leaves packs no index lists; gc
    must not take them for orphans."""
    repo = tmp_path / "repo"
    shutil.copytree(pristine.repo, repo)
    before = {p.name for p in packs(repo)}
    for f in (repo / "index").iterdir():
        f.unlink()
    async with blockferry.open_repository(str(repo)) as r:
        report = await r.gc()
        assert report.orphan_packs_kept == len(before) and report.orphan_packs_deleted == 0
    assert {p.name for p in packs(repo)} == before
    async with blockferry.open_repository(str(repo)) as r:  # restores find them by their records
        for pid in pristine.order:
            (res,) = await r.restore(pid, tmp_path / pid)
            assert Path(res.path).read_bytes() == pristine.images[pid].read_bytes()


async def test_records_that_disable_nothing(tmp_path: Path, pristine: Pristine) -> None:
    """A damaged health record is written again by repair; a damaged gc plan is discarded by the
    next gc; a damaged manifest makes gc refuse (it cannot know what is live) until the point is
    deleted, and the rest of the repository goes on meanwhile."""
    repo = tmp_path / "repo"
    shutil.copytree(pristine.repo, repo)
    junk(repo / "health" / "damaged")
    junk(repo / "gc" / "plan")
    assert await cli("repair", str(repo)) == 0
    assert not (repo / "health" / "damaged").exists()  # a healthy repository needs no record
    assert await cli("gc", str(repo)) == 0
    assert not (repo / "gc" / "plan").exists()
    junk(base_point(pristine, repo))
    assert await cli("gc", str(repo)) == 3
    assert await cli("points", str(repo)) == 0
    async with blockferry.open_repository(str(repo)) as r:
        report = await r.repair()
        assert not report.missing_chunks and not report.unreadable
        await r.delete(pristine.order[0])
        assert (await r.gc()).state in ("done", "nothing to do")
        for pid in pristine.order[1:]:
            (res,) = await r.restore(pid, tmp_path / pid)
            assert Path(res.path).read_bytes() == pristine.images[pid].read_bytes()


@pytest.mark.parametrize("how", ["trailer-zeroed", "record-id-flipped"])
async def test_repair_finds_chunks_whose_records_and_index_are_gone(tmp_path: Path, pristine: Pristine,
                                                                     how: str) -> None:
    """Every index file lost and a pack's chunk list damaged: repair still finds every whole
    chunk (by walking the data, or by what a chunk decodes to), and a pack whose bytes it cannot
    all account for is kept, by repair and by gc."""
    repo = tmp_path / "repo"
    shutil.copytree(pristine.repo, repo)
    for f in (repo / "index").iterdir():
        f.unlink()
    path = busiest_pack(pristine, repo)
    first, n, records = pack_layout(pristine, path)
    data = bytearray(path.read_bytes())
    if how == "trailer-zeroed":
        data[records:] = bytes(len(data) - records)
    else:
        data[records + 7] ^= 0x41  # the first record's id
    path.write_bytes(bytes(data))
    assert await cli("repair", str(repo)) == 0
    assert path.exists() == (how == "trailer-zeroed")  # kept when its bytes are not all accounted for
    assert await cli("gc", str(repo)) == 0
    assert path.exists() == (how == "trailer-zeroed")
    async with blockferry.open_repository(str(repo)) as r:
        for pid in pristine.order:
            (res,) = await r.restore(pid, tmp_path / pid)
            assert Path(res.path).read_bytes() == pristine.images[pid].read_bytes()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(min_value=0), at=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_any_bit_of_any_pack_is_found_and_repair_then_gc_lose_no_intact_chunk(
        tmp_path_factory: pytest.TempPathFactory, which: int, at: int, bit: int) -> None:
    """Property: whichever bit of whichever pack flips, a full verify reports damage (exit 3), and
    repair then gc keep every chunk whose bytes are intact (points of intact chunks restore
    bit-exact). Runs on asyncio only: hypothesis drives the examples, one event loop each."""

    async def example() -> None:
        if "p" not in _pristine:
            p = Pristine(tmp_path_factory.mktemp("pristine"))
            await p.build()
            _pristine["p"] = p
        p = _pristine["p"]
        root = tmp_path_factory.mktemp("bitflip")
        repo = root / "repo"
        shutil.copytree(p.repo, repo)
        all_packs = packs(repo)
        path = all_packs[which % len(all_packs)]
        data = bytearray(path.read_bytes())
        data[at % len(data)] ^= 1 << bit
        path.write_bytes(bytes(data))
        intact = p.intact(repo)
        assert await cli("verify", str(repo)) == 3, (path.name, at % len(data), bit)
        assert await cli("repair", str(repo)) in (0, 3)
        assert await cli("gc", str(repo), "--rewrite-threshold", "0.01") == 0
        await check_points(p, repo, root / "out", intact, alive=set(p.order))
        async with blockferry.open_repository(str(repo)) as r:
            report = await r.verify()
        assert not ({bytes.fromhex(d.chunk) for d in report.damaged} & intact)

    anyio.run(example)
