"""The contract of source plugins: what a proxy reads a disk through.

A source plugin (entry point group ``blockferry.sources``, named by URL scheme) opens a
:class:`SourceDisk`. The source mover asks it for the extents that hold data (so holes are never
read), then reads blocks. Reads may happen from several tasks at once and, when the disk offers
``read_blocking``, from worker threads, which lets the mover read, hash and compress a batch in
one hop.

Plugins raise only engine errors (:class:`~blockferry.errors.SourceError` and kin), with the
source and offset in the message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from blockferry.datapath.extents import Extent

if TYPE_CHECKING:
    from blockferry.repo.format import DiskRecord

Buffer = bytearray | memoryview


@runtime_checkable
class SourceDisk(Protocol):
    url: str
    #: the disk's default name in a restore point (e.g. the image's file name)
    name: str
    #: bytes
    size: int
    #: what identifies the disk across runs (path, device and inode, VM and disk id...)
    identity: dict[str, str]
    #: anything worth keeping in the point (format, snapshot name, ...)
    metadata: dict[str, Any]
    #: identity of the change-tracking state this read starts (None: the source has none)
    change_id: str | None
    #: blocking ``(offset, buffers) -> bytes read`` usable from worker threads, or None
    read_blocking: Callable[[int, Sequence[Buffer]], int] | None
    #: blocking ``(offset, length) -> mmap`` (a writable, never written, private mapping) for
    #: zero-copy reads from worker threads, or None
    map_blocking: Callable[[int, int], Any] | None

    async def data_extents(self) -> list[Extent] | None:
        """Sorted extents that may hold non-zero data; None when the source cannot tell (then
        every block is read). Reading outside them must return zeros."""
        ...

    async def read_into(self, offset: int, buffers: Sequence[Buffer]) -> int:
        """Fill ``buffers`` one after the other from ``offset``; returns the bytes read, short only
        at the end of the disk."""
        ...

    async def aclose(self) -> None:
        ...


class ChangeTracking(Protocol):
    """Optional methods of a :class:`SourceDisk` whose source tracks changes (QEMU dirty
    bitmaps, VMware CBT). The source mover uses them when no hint file is given."""

    async def changed_extents(self, base: DiskRecord) -> tuple[list[Extent] | None, str]:
        """Extents changed since ``base`` (the disk's record in the previous point, whose
        ``change_id`` this source wrote), or None when that cannot be known (the tracking state
        was lost, is inconsistent, or does not match the base): then the whole disk is read. The
        string says why, for the session."""
        ...

    async def finish(self, committed: bool) -> None:
        """Called once the point this read went into is committed (True) or abandoned (False),
        after :meth:`SourceDisk.aclose`: rotate the tracking state only when committed."""
        ...


@runtime_checkable
class SourcePlugin(Protocol):
    scheme: str

    async def open(self, url: str, options: Mapping[str, Any]) -> SourceDisk:
        """Open the disk at ``url`` for reading; SourceError if it cannot be."""
        ...

    def disk_name(self, url: str) -> str:
        """The disk's default name without opening it (used to plan a job)."""
        ...

    # Optional: ``async def expand(self, url) -> list[str]`` when one URL may stand for several
    # disks (a VM by its QMP socket): one URL per disk, or ``[url]``. See :func:`expand_disks`.


