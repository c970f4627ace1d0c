"""The contract of source plugins: what a proxy reads a disk through.

A source plugin (entry point group ``blockferry.sources``, named by URL scheme) opens a
:class:`SourceDisk`. The source mover asks it for the extents that hold data (so holes are never
read), then reads blocks. Reads may happen from several tasks at once and, when the disk offers
:class:`ReadsBlocking`, from worker threads, which lets the mover read, hash and compress a batch in
one hop.

Plugins raise only engine errors (:class:`~blockferry.errors.SourceError` and kin), with the
source and offset in the message.

Optional capabilities are small protocols below, offered by having their methods: a disk may
read or map from worker threads (:class:`ReadsBlocking`, :class:`MapsBlocking`) or track changes
(:class:`ChangeTracking`); a plugin may expand one URL into several disks (:class:`Expands`).
Callers resolve them with ``isinstance`` once per open disk, never per block (a runtime-checkable
``isinstance`` looks every member up). The conformance suite (``tests/conformance.py``) tests each
capability a plugin offers against the contract written here.
"""

from __future__ import annotations

import mmap
from collections.abc import Mapping, Sequence
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


@runtime_checkable
class ReadsBlocking(Protocol):
    """A :class:`SourceDisk` that can be read from worker threads: the mover then reads, hashes
    and compresses a batch in one hop."""

    def read_blocking(self, offset: int, buffers: Sequence[Buffer]) -> int:
        """Blocking, thread-safe :meth:`SourceDisk.read_into`: the same bytes, the same count
        (short only at the end of the disk), the same errors. Idempotent."""
        ...


@runtime_checkable
class MapsBlocking(Protocol):
    """A :class:`SourceDisk` that can map ranges of itself (an image file): the mover hashes and
    compresses straight from the page cache."""

    def map_blocking(self, offset: int, length: int) -> mmap.mmap:
        """Blocking, thread-safe: a private mapping of ``length`` bytes at ``offset`` (both within
        the disk; ``offset`` a multiple of ``mmap.ALLOCATIONGRANULARITY``), writable so that a C
        pointer to it can be taken, never written through to the disk. The caller closes it.
        SourceChangedError if the disk shrank below the range (a mapping past the end of a file
        would kill the process with SIGBUS on access)."""
        ...


@runtime_checkable
class ChangeTracking(Protocol):
    """A :class:`SourceDisk` whose source tracks changes (QEMU dirty bitmaps, VMware CBT). The
    source mover uses it when no hint file is given."""

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



@runtime_checkable
class Expands(Protocol):
    """A :class:`SourcePlugin` where one URL may stand for several disks (a VM by its QMP
    socket). A job expands such sources into one task per disk when it starts
    (:func:`blockferry.jobs.config.expand_disks`)."""

    async def expand(self, url: str) -> list[str]:
        """One URL per disk ``url`` stands for, each naming one disk (and expanding to itself),
        options kept; ``[url]`` when it names one disk already. SourceError (or another engine
        error) when that cannot be known now (a VM not running): the caller then keeps ``url``,
        and opening it fails in its task, where retries apply. Idempotent, no side effects."""
        ...


#: every optional capability a source disk may declare
DISK_CAPABILITIES: tuple[type, ...] = (ReadsBlocking, MapsBlocking, ChangeTracking)
#: every optional capability a source plugin may declare
PLUGIN_CAPABILITIES: tuple[type, ...] = (Expands,)


