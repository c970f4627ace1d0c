"""Scale figures: many small disks through two proxies of four tasks each.

``python -m bench.scale many DIR [--count 200] [--size 16MiB]`` makes (once) ``count`` sparse
disks, each with a little unique data and a little data shared by all (a template), then backs
them all up as one job of ``count`` objects into a fresh repository, through two proxies of four
tasks, and prints JSON: the session's duration and the time per task. The runner measures the
process's peak RSS from outside.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import anyio

MiB = 1 << 20


def make_small_disks(d: Path, count: int, size: int) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    marker = d / f".made-{count}-{size}"
    paths = [d / f"small{i:04d}.img" for i in range(count)]
    if marker.exists():
        return paths
    template = random.Random(0).randbytes(MiB)
    for i, p in enumerate(paths):
        rng = random.Random(i + 1)
        with open(p, "wb") as f:
            f.truncate(size)
            f.write(template)  # shared by every disk, as a cloned system would be
            f.seek(size // 2)
            f.write(rng.randbytes(MiB))  # unique
            f.seek(size - MiB)
            f.write(b"".join(b"log line %d of disk %d\n" % (k, i) for k in range(20000))[:MiB])
    marker.touch()
    return paths


async def many(d: Path, count: int, size: int) -> dict[str, float | int | str]:
    import blockferry
    from blockferry.jobs.config import DiskSpec, JobSpec, ObjectSpec, ProxyConfig

    paths = make_small_disks(d / "disks", count, size)
    repo = d / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    await blockferry.init_repository(str(repo))
    proxies = [ProxyConfig(name="p1", max_tasks=4), ProxyConfig(name="p2", max_tasks=4)]
    async with blockferry.open_repository(str(repo), proxies=proxies, max_tasks=8) as r:
        spec = JobSpec(name="many", repository="repository", retries=0,
                       objects=[ObjectSpec(name=p.stem, disks=[DiskSpec(source=str(p))]) for p in paths])
        t0 = time.perf_counter()
        session = await r.run_job(spec)
        wall = time.perf_counter() - t0
    return {"state": session.state, "disks": count, "disk_size": size, "seconds": wall,
            "ms_per_task": 1000 * wall / count, "points": len(session.points)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale")
    ap.add_argument("what", choices=["many"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--size", type=int, default=16 * MiB)
    a = ap.parse_args(argv)
    out = anyio.run(many, a.dir, a.count, a.size)
    json.dump(out, sys.stdout)
    print()
    return 0 if out["state"] == "success" else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
