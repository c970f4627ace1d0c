"""engine/fileio.py: vectored writes and reads that finish (short transfers, EINTR, IOV_MAX)."""

from __future__ import annotations

import array
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from blockferry import fileio
from blockferry.fileio import IOV_MAX, read_into, write_all
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.fixture
def fd(tmp_path: Path) -> Iterator[int]:
    f = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    yield f
    os.close(f)


def content(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size + 1, 0)


def limited(real: Callable[..., int], limit: int, calls: list[int]) -> Callable[..., int]:
    """``real`` (os.writev, os.pwritev, os.preadv) moving at most ``limit`` bytes a call."""

    def call(fd: int, buffers: list[memoryview], *offset: int) -> int:
        calls.append(len(buffers))
        assert len(buffers) <= IOV_MAX
        out, room = [], limit
        for b in buffers:
            if room <= 0:
                break
            out.append(b[:room])
            room -= len(out[-1])
        return real(fd, out, *offset)

    return call


def test_pwritev_in_batches_of_iov_max(fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(os, "pwritev", limited(os.pwritev, 1 << 30, calls))
    parts = [bytes([i % 251]) * 3 for i in range(2 * IOV_MAX + 5)]
    assert write_all(fd, parts, 10) == 3 * len(parts)
    assert content(fd) == bytes(10) + b"".join(parts)
    assert calls == [IOV_MAX, IOV_MAX, 5]


def test_short_writes_are_continued(fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(os, "writev", limited(os.writev, 7, calls))
    parts = [b"abcde", b"", bytearray(b"fghijklmnop"), memoryview(b"qrstuvwxyz")]
    os.write(fd, b">")
    assert write_all(fd, parts) == 26
    assert content(fd) == b">abcdefghijklmnopqrstuvwxyz"
    assert len(calls) == 4  # 26 bytes, 7 a call


def test_interrupted_calls_are_retried(fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    real, failures = os.pwritev, [2]

    def interrupted(fd: int, buffers: Any, offset: int) -> int:
        if failures[0]:
            failures[0] -= 1
            raise InterruptedError(errno.EINTR, "interrupted")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", interrupted)
    assert write_all(fd, [b"data"], 0) == 4
    assert content(fd) == b"data" and failures == [0]


def test_a_file_that_takes_nothing_is_an_error(fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "pwritev", lambda fd, buffers, offset: 0)
    with pytest.raises(OSError) as ei:
        write_all(fd, [b"data"], 0)
    assert ei.value.errno == errno.ENOSPC


def test_wide_items_are_counted_in_bytes(fd: int) -> None:
    words = array.array("I", [1, 2, 3])
    assert write_all(fd, [memoryview(words)], 0) == 12
    assert content(fd) == words.tobytes()


def test_read_into_fills_across_buffers_and_stops_at_the_end(fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    os.pwrite(fd, bytes(range(100)), 0)
    calls: list[int] = []
    monkeypatch.setattr(os, "preadv", limited(os.preadv, 9, calls))
    bufs = [bytearray(30), bytearray(50), bytearray(40)]
    assert read_into(fd, bufs, 5) == 95  # the file ends 25 bytes before the buffers do
    assert bytes(bufs[0] + bufs[1] + bufs[2][:15]) == bytes(range(5, 100))
    assert bufs[2][15:] == bytearray(25)
    assert len(calls) == 12  # 95 bytes, 9 a call, and the call that finds the end


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), max_size=40), limit=st.integers(1, 700),
       offset=st.integers(0, 5000), iov=st.integers(1, 8))
def test_property_everything_lands_in_order(tmp_path_factory: pytest.TempPathFactory, sizes: list[int], limit: int,
                                            offset: int, iov: int) -> None:
    parts = [bytes([(i * 7 + j) % 256 for j in range(n)]) for i, n in enumerate(sizes)]
    path = tmp_path_factory.mktemp("p") / "f"
    f = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    calls: list[int] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fileio, "IOV_MAX", iov)
        mp.setattr(os, "pwritev", limited(os.pwritev, limit, calls))
        mp.setattr(os, "preadv", limited(os.preadv, limit, calls))
        try:
            want = b"".join(parts)
            assert write_all(f, parts, offset) == len(want)
            assert all(n <= iov for n in calls)
            back = [bytearray(n) for n in sizes]
            assert read_into(f, back, offset) == len(want)
            assert b"".join(back) == want
        finally:
            os.close(f)
