"""Vectored file I/O that finishes what it starts.

``writev``, ``pwritev`` and ``preadv`` take at most ``IOV_MAX`` buffers and may move fewer bytes
than asked (a signal, a device's or a file system's limit, a pipe's room); ``pwrite`` too.
:func:`write_all` and :func:`read_into` go on until every byte is moved (or, reading, the end of
the file), retry a call interrupted by a signal (EINTR: Python retries on its own unless a signal
handler raised InterruptedError, which is retried here too) and split the buffers into batches of
at most ``IOV_MAX``. Used by the restore, the NBD overlay and the file plugins.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence

Bytes = bytes | bytearray | memoryview

#: the most buffers one vectored call takes (1024 on Linux)
IOV_MAX: int = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024


def _views(buffers: Sequence[Bytes]) -> list[memoryview]:
    views = []
    for b in buffers:
        v = memoryview(b)
        if v.ndim != 1 or v.itemsize != 1:
            v = v.cast("B")
        if len(v):
            views.append(v)
    return views


def _move(call: Callable[[list[memoryview], int], int], views: list[memoryview]) -> int:
    """Call ``call(batch, done)`` until ``views`` are all moved or it returns 0; bytes moved."""
    done = i = 0
    while i < len(views):
        try:
            n = call(views[i:i + IOV_MAX], done)
        except InterruptedError:
            continue
        if n == 0:
            break
        done += n
        while i < len(views) and n >= len(views[i]):
            n -= len(views[i])
            i += 1
        if n:
            views[i] = views[i][n:]
    return done


def write_all(fd: int, buffers: Sequence[Bytes], offset: int | None = None) -> int:
    """Write every byte of ``buffers`` to ``fd``: at ``offset`` (``pwritev``; the file position
    does not move), or at the file position (``writev``). Returns the bytes written; raises
    OSError (ENOSPC if the file takes no more bytes without saying why)."""
    views = _views(buffers)
    want = sum(len(v) for v in views)
    if offset is None:
        done = _move(lambda batch, _: os.writev(fd, batch), views)
    else:
        done = _move(lambda batch, done: os.pwritev(fd, batch, offset + done), views)
    if done < want:
        raise OSError(errno.ENOSPC, f"wrote {done} of {want} bytes: the file takes no more")
    return done


def read_into(fd: int, buffers: Sequence[Bytes], offset: int) -> int:
    """Fill ``buffers`` from ``fd`` at ``offset`` (``preadv``), up to the end of the file.
    Returns the bytes read: fewer than the buffers hold only at the end of the file."""
    return _move(lambda batch, done: os.preadv(fd, batch, offset + done), _views(buffers))


__all__ = ["IOV_MAX", "Bytes", "read_into", "write_all"]
