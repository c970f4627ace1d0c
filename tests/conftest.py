"""Shared fixtures. Every async test runs on asyncio and on trio (the ``anyio_backend`` fixture)."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
from blockferry import registry

P = TypeVar("P")

MiB = 1 << 20
KiB = 1 << 10


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@contextmanager
def registered(group: str, scheme: str, plugin: P) -> Iterator[P]:
    """``plugin`` serves ``scheme`` in ``group`` (registry.SOURCES or BACKENDS) inside the block."""
    registry.register(group, scheme, plugin)
    try:
        yield plugin
    finally:
        registry.register(group, scheme, None)


def write_disk(path: Path, size: int, segments: Sequence[tuple[int, str, int]] = (), *, seed: int = 0) -> Path:
    """A sparse image of ``size`` bytes with ``(offset, kind, length)`` segments written into it:
    kind ``random`` (incompressible), ``text`` (compressible), ``ones`` (a repeated pattern),
    ``zeros`` (explicit zero bytes, not a hole)."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, kind, length in segments:
            length = min(length, size - offset)
            if length <= 0:
                continue
            if kind == "random":
                data = rng.randbytes(length)
            elif kind == "text":
                line = b"Nov 21 10:00:00 host app[123]: request served in %d ms\n"
                data = b"".join(line % rng.randrange(1000) for _ in range(length // 40 + 1))[:length]
            elif kind == "ones":
                data = bytes([0x5A]) * length
            elif kind == "zeros":
                data = bytes(length)
            else:
                raise ValueError(kind)
            f.seek(offset)
            f.write(data)
    return path


def mixed_disk(path: Path, size: int = 8 * MiB, seed: int = 0) -> Path:
    """A typical small test disk: text, random data, a repeated pattern, holes, explicit zeros."""
    return write_disk(path, size, [
        (0, "text", size // 8),
        (size // 4, "random", size // 8),
        (size // 2, "ones", size // 16),
        (size // 2 + size // 8, "zeros", size // 16),
        (size - size // 16, "random", size // 16),
    ], seed=seed)


def same_file(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(MiB), fb.read(MiB)
            if x != y:
                return False
            if not x:
                return True


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture
def repo_path(tmp_path: Path) -> Path:
    return tmp_path / "repo"
