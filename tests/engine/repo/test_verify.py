"""Health checks mark damage, restores work around it, the next backup heals it; repair
rebuilds a lost index."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import blockferry
import pytest
from blockferry.repo.format import INDEX_RECORD, decode_index

from tests.conftest import KiB, MiB, same_file, write_disk

pytestmark = pytest.mark.anyio

BS = 256 * KiB


def flip(repo: Path, digest_index: int = 0) -> tuple[str, int]:
    """Flip a byte inside the ``digest_index``-th chunk of the first index entry's pack."""
    f = next((repo / "index").iterdir())
    idx = decode_index(f.read_bytes(), f.name)
    recs = list(INDEX_RECORD.iter_unpack(idx.records))
    digest, pno, off, length, *_ = recs[digest_index]
    pack = repo / "packs" / idx.packs[pno][:2] / idx.packs[pno]
    data = bytearray(pack.read_bytes())
    data[off + length // 2] ^= 0x55
    pack.write_bytes(bytes(data))
    return digest.hex(), off


def block_of(img: Path, digest_hex: str) -> int:
    import blake3

    data = img.read_bytes()
    for i in range(0, len(data), BS):
        if blake3.blake3(data[i:i + BS]).hexdigest() == digest_hex:
            return i // BS
    raise AssertionError("no such block")


async def test_flipped_byte_is_found_marked_worked_around_and_healed(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    await blockferry.init_repository(str(repo), block_size=BS)
    img = write_disk(tmp_path / "d.img", 4 * MiB, [(0, "random", 4 * MiB)], seed=1)
    original = tmp_path / "orig.img"
    shutil.copyfile(img, original)
    async with blockferry.open_repository(str(repo)) as r:
        p0 = (await r.backup([str(img)], name="vm")).points[0]
    bad, _ = flip(repo)
    block = block_of(img, bad)
    async with blockferry.open_repository(str(repo)) as r:
        report = await r.verify()
        assert not report.healthy and [d.chunk for d in report.damaged] == [bad]
        assert [(a.point, a.disk, a.offsets) for a in report.affected] == [(p0, "d.img", [block * BS])]
        (pt,) = await r.points()
        assert pt.damaged  # listed, and marked
        # restore: refused as is; with allow_damaged, everything else comes back and the range is named
        with pytest.raises(blockferry.CorruptionError, match="no good copy"):
            await r.restore(p0, tmp_path / "strict")
        (res,) = await r.restore(p0, tmp_path / "lenient", allow_damaged=True)
        assert res.damaged_ranges == [(block * BS, BS)]
        got = (tmp_path / "lenient" / "d.img").read_bytes()
        want = original.read_bytes()
        assert got[:block * BS] == want[:block * BS] and got[(block + 1) * BS:] == want[(block + 1) * BS:]
        assert got[block * BS:(block + 1) * BS] == bytes(BS)
        # an incremental whose hints do not mention the damaged block reads it anyway, and heals
        with open(img, "r+b") as f:
            f.seek(0 if block else BS)
            f.write(os.urandom(100))
        hints = tmp_path / "h"
        hints.write_text(f"{0 if block else BS} 100\n")
        s1 = await r.backup([str(img)], name="vm", hints={str(img): str(hints)})
        d = s1.objects[0].disks[0]
        assert d.stats.read_bytes == 2 * BS and "heal" in d.plan
        assert not (await r.points())[0].damaged  # the old point is whole again
        after = await r.verify()
        assert after.healthy
        await r.restore(p0, tmp_path / "old")  # same chunk ids: the old point restores exactly
        await r.restore(s1.points[0], tmp_path / "new")
    assert same_file(tmp_path / "old" / "d.img", original)
    assert same_file(tmp_path / "new" / "d.img", img)


async def test_sampled_check(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    await blockferry.init_repository(str(repo), block_size=BS)
    img = write_disk(tmp_path / "d.img", 8 * MiB, [(0, "random", 8 * MiB)], seed=2)
    async with blockferry.open_repository(str(repo)) as r:
        await r.backup([str(img)], name="vm")
        half = await r.verify(sample=50)
        full = await r.verify(sample=100)
        assert half.chunks_checked == 16 and half.sample == 50 and full.chunks_checked == 32
        with pytest.raises(blockferry.BlockferryError, match="percentage"):
            await r.verify(sample=0)
    p = subprocess.run([sys.executable, "-m", "blockferry", "verify", str(repo), "--sample", "25", "--json"],
                       capture_output=True, text=True)
    assert p.returncode == 0 and json.loads(p.stdout)["chunks_checked"] == 8


async def test_repair_rebuilds_a_lost_index(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    await blockferry.init_repository(str(repo), block_size=BS, pack_size=4 * BS)
    a = write_disk(tmp_path / "a.img", 3 * MiB, [(0, "random", 3 * MiB)], seed=3)
    b = write_disk(tmp_path / "b.img", 2 * MiB + 17, [(0, "text", 2 * MiB)], seed=4)
    engine = blockferry.EngineSettings(batch_bytes=BS)
    async with blockferry.open_repository(str(repo), engine=engine) as r:
        pa = (await r.backup([str(a)], name="a")).points[0]
        pb = (await r.backup([str(b)], name="b")).points[0]
    shutil.rmtree(repo / "index")
    async with blockferry.open_repository(str(repo)) as r:
        assert not (await r.verify()).healthy  # nothing is indexed
        rep = await r.repair()
        assert rep.unreadable == [] and rep.missing_chunks == 0 and rep.packs >= 3
        assert (await r.verify()).healthy
        await r.restore(pa, tmp_path / "a")
        await r.restore(pb, tmp_path / "b")
    assert same_file(tmp_path / "a" / "a.img", a) and same_file(tmp_path / "b" / "b.img", b)
    # a pack whose trailer is damaged is salvaged: every chunk still matching its id is kept
    pack = sorted(p for p in (repo / "packs").rglob("*") if p.is_file())[0]
    data = bytearray(pack.read_bytes())
    data[-20] ^= 0xFF  # inside the chunk list: the crc catches it
    pack.write_bytes(bytes(data))
    p = subprocess.run([sys.executable, "-m", "blockferry", "repair", str(repo), "--json"], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    out = json.loads(p.stdout)
    assert [s["pack"] for s in out["salvaged"]] == [pack.name] and "checksum" in out["salvaged"][0]["reason"]
    assert out["salvaged"][0]["lost"] == 0 and out["missing_chunks"] == 0 and not pack.exists()
    async with blockferry.open_repository(str(repo)) as r:
        assert (await r.verify()).healthy
        await r.restore(pa, tmp_path / "a2")
        await r.restore(pb, tmp_path / "b2")
    assert same_file(tmp_path / "a2" / "a.img", a) and same_file(tmp_path / "b2" / "b.img", b)
