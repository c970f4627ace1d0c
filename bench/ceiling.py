"""The machine ceiling: hash every non-zero block and zstd-compress the unique ones, on every
core, with no pipeline around it.

Blocks are read into memory first (untimed); then one thread per core hashes its share of the
non-zero blocks and compresses the unique ones (a shared set decides which copy is "the" unique
one). The wall time of that timed part is the ceiling: no backup engine using the same hash and
compression level can do the work faster on this machine.

Usage: ``python -m bench.ceiling IMAGE... [--block-size 1MiB] [--level 3]`` prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import blake3
import zstandard

MiB = 1 << 20


def data_blocks(path: str, bs: int) -> list[bytes]:
    """The image's blocks that hold any non-zero byte (holes skipped with SEEK_DATA)."""
    out: list[bytes] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        off = 0
        seen: set[int] = set()
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            for b in range(start // bs, -(-end // bs)):
                if b not in seen:
                    seen.add(b)
                    block = os.pread(fd, bs, b * bs)
                    if block.count(0) != len(block):
                        out.append(block)
            off = end
    finally:
        os.close(fd)
    return out


def ceiling(images: list[str], bs: int, level: int, threads: int) -> dict[str, float]:
    blocks = [b for img in images for b in data_blocks(img, bs)]
    seen: set[bytes] = set()
    lock = threading.Lock()
    compressed = [0] * threads

    def work(i: int) -> None:
        c = zstandard.ZstdCompressor(level=level)
        n = 0
        for block in blocks[i::threads]:
            d = blake3.blake3(block).digest()
            with lock:
                new = d not in seen
                seen.add(d)
            if new:
                n += min(len(block), len(c.compress(block)))
        compressed[i] = n

    t0 = time.perf_counter()
    cpu0 = time.process_time()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(work, range(threads)))
    wall = time.perf_counter() - t0
    return {
        "seconds": wall,
        "cpu_seconds": time.process_time() - cpu0,
        "threads": threads,
        "data_blocks": len(blocks),
        "unique_blocks": len(seen),
        "stored_bytes": sum(compressed),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ceiling")
    ap.add_argument("images", nargs="+")
    ap.add_argument("--block-size", type=int, default=MiB)
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args(argv)
    json.dump(ceiling(a.images, a.block_size, a.level, a.threads), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
