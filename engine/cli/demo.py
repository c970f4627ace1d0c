"""``blockferry demo``: the whole cycle on generated disk images, checked bit for bit.

Makes two disk images of one VM (text, incompressible data, repeated blocks and holes), backs
them up, changes one disk and takes an incremental with changed-extent hints, then restores both
points and compares every byte with the images as they were.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

from blockferry.api import init_repository, open_repository
from blockferry.cli.core import Number
from blockferry.errors import ConfigError
from blockferry.units import MiB


def register(command: Callable[..., argparse.ArgumentParser]) -> None:
    sp = command("demo", cmd_demo, "back up and restore two generated disk images, end to end")
    sp.add_argument("dir", nargs="?", default="blockferry-demo", help="work directory (default ./blockferry-demo)")
    sp.add_argument("--size", type=Number(int, 1 << 20, 64 << 30, size=True), default=64 << 20,
                    help="size of each demo disk (default 64MiB)")


async def cmd_demo(a: argparse.Namespace) -> int:
    return await run_demo(Path(a.dir), size=a.size)

LINES = [b"Nov 21 10:00:%02d vm sshd[%d]: Accepted publickey for admin from 10.0.0.%d\n",
         b"Nov 21 10:00:%02d vm kernel: [%d.%d] eth0: link up\n"]


def make_disk(path: Path, size: int, seed: int) -> None:
    """A sparse image: logs, random data, a block repeated, and holes."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        text = b"".join(rng.choice(LINES) % (rng.randrange(60), rng.randrange(99999), rng.randrange(255))
                        for _ in range(size // 8 // 40))
        f.seek(0)
        f.write(text[: size // 8])
        f.seek(size // 4)
        f.write(rng.randbytes(size // 8))
        block = rng.randbytes(MiB)
        for k in range(3):  # the same data three times: stored once
            f.seek(size // 2 + k * MiB)
            f.write(block)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


async def run_demo(work: Path, *, size: int = 64 * MiB) -> int:
    disks = [work / "disks" / "system.img", work / "disks" / "data.img"]
    try:
        if work.exists():
            shutil.rmtree(work)
        (work / "disks").mkdir(parents=True)
        for i, d in enumerate(disks):
            make_disk(d, size, seed=i)
    except OSError as exc:  # not a directory, no space, read-only...
        raise ConfigError(f"cannot make the demo in {work}: {exc.strerror or exc}") from exc
    repo_dir = work / "repo"
    await init_repository(str(repo_dir))
    print(f"1. created two disk images of {size >> 20} MiB and a repository in {repo_dir}")
    expected = {}
    async with open_repository(str(repo_dir)) as repo:
        s1 = await repo.backup([str(d) for d in disks], name="demo-vm")
        expected[s1.points[0]] = {d.name: sha256(d) for d in disks}
        print(f"2. full backup: point {s1.points[0]}, {s1.stats.written_bytes >> 10} KiB written "
              f"for {2 * size >> 20} MiB of disks in {s1.duration:.2f} s")

        # change 1 MiB of data.img and say so in a hint file
        with open(disks[1], "r+b") as f:
            f.seek(size // 4)
            f.write(os.urandom(MiB))
        hints = work / "data.img.changed"
        hints.write_text(f"{size // 4} {MiB}\n")
        s2 = await repo.backup([str(d) for d in disks], name="demo-vm", hints={str(disks[1]): str(hints)})
        expected[s2.points[0]] = {d.name: sha256(d) for d in disks}
        read = sum(d.stats.read_bytes for o in s2.objects for d in o.disks)
        print(f"3. incremental: point {s2.points[0]}, {read >> 20} MiB read, "
              f"{s2.stats.written_bytes >> 10} KiB written in {s2.duration:.2f} s")

        ok = True
        for n, (point, sums) in enumerate(expected.items(), 4):
            out = work / f"restore-{point}"
            for r in await repo.restore(point, out):
                same = sha256(Path(r.path)) == sums[r.disk]
                ok &= same
                print(f"{n}. restored {r.disk} of point {point}: {'bit-exact' if same else 'DIFFERENT'}")
        report = await repo.verify()
        print(f"{n + 1}. verify: {report.chunks_checked} chunks, {'healthy' if report.healthy else 'DAMAGED'}")
    print("demo passed" if ok and report.healthy else "demo FAILED")
    return 0 if ok and report.healthy else 1
