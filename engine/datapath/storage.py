"""The contract of storage-system plugins: backups from the storage system's own snapshots.

A storage system (Ceph RBD, a SAN, a NAS) holds the volumes that back objects' disks and can
snapshot them. Backing up from a storage snapshot keeps the load off the production host: the
hypervisor's snapshot or freeze lasts only while the storage snapshot is taken, and a proxy
connected to the storage system reads the data from the snapshot exposed to it (docs/storage-systems.md
describes the flow). A storage plugin (entry point group ``blockferry.storage``, named by URL
scheme, found through :func:`blockferry.registry.storage_plugin`) opens a :class:`StorageSystem`
by URL.

Contracts common to every method:

* Volumes are named by their **volume id**, a string the system chooses (``POOL/IMAGE`` for
  RBD), stable across runs; snapshots by ``(volume id, snapshot name)``.
* Methods raise only engine errors: :class:`~blockferry.errors.SourceError` when the system
  refuses or cannot be reached (with the system's own message), :class:`~blockferry.errors.ConfigError`
  for a bad URL or option, :class:`~blockferry.errors.NotFoundError` for a volume that does not exist.
* blockferry's own snapshots are named by :func:`temporary_name` and :func:`retained_name`;
  a system never removes snapshots whose names it did not make, and :func:`is_temporary` /
  :func:`is_retained` tell them apart from others' (users', the platform's).
* Everything a method creates is removed by its counterpart (:meth:`StorageSystem.snapshot` by
  :meth:`StorageSystem.remove`, :meth:`StorageSystem.expose` by :meth:`StorageSystem.withdraw`);
  callers run the counterpart in a ``finally`` with a shielded cancel scope, and a process killed
  in between leaves temporary snapshots that the next run finds by name and removes
  (:func:`leftover`).

Optional capabilities are small protocols below (checked with ``isinstance``, as the source and
backend contracts do): a system with a native consistency group offers :class:`GroupSnapshots`.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import socket
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import msgspec
from blockferry.datapath.extents import Extent
from blockferry.processes import pid_alive

#: every snapshot blockferry makes starts with this
PREFIX = "blockferry"
#: a snapshot that lives only while one backup reads it
TEMPORARY = f"{PREFIX}-tmp"
#: the newest snapshot a backup was read from, kept for the next incremental's changed extents
RETAINED = f"{PREFIX}-keep"
#: a temporary snapshot older than this is a leftover whatever host made it (a host that died)
LEFTOVER_AGE = dt.timedelta(hours=24)


class Volume(msgspec.Struct, frozen=True, kw_only=True):
    id: str  #: the volume id (``POOL/IMAGE``)
    size: int  #: bytes
    #: anything the system says about it (format, features, object size)
    metadata: dict[str, Any] = {}


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    volume: str  #: the volume id
    name: str
    size: int = 0
    #: when the system says it was taken (UTC, ISO 8601), if it says
    created: str | None = None


class Exposure(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot made readable for a proxy: the seeds' "mounted as a new device or share"."""

    snapshot: Snapshot
    #: what the proxy reads: an NBD URL (``nbd+unix:///EXPORT?socket=PATH``) or a device path
    url: str
    #: the system's handle for :meth:`StorageSystem.withdraw` (a process id, a mapping)
    handle: str = ""


@runtime_checkable
class StorageSystem(Protocol):
    #: the system's URL, as configured (``rbd://POOL?conf=/etc/ceph/ceph.conf``)
    url: str

    async def volumes_of(self, urls: Sequence[str]) -> list[str | None]:
        """For each disk URL (a source URL: ``rbd://POOL/IMAGE``, a QEMU disk's file name...)
        the id of the volume on this system that holds it, or None when it is not on this system
        (step 1 of the flow: which objects have all their disks here). Reads only."""
        ...

    async def snapshot(self, volumes: Sequence[str], name: str) -> list[Snapshot]:
        """One crash-consistent snapshot named ``name`` of each volume, taken as close together
        as the system allows (all at once in a consistency group when it has one). All or
        nothing: when one fails, those already taken are removed before the error is raised."""
        ...

    async def changed_extents(self, snapshot: Snapshot, base: str | None) -> list[Extent] | None:
        """The byte extents of ``snapshot``'s volume that differ between the snapshot ``base``
        of the same volume and ``snapshot`` (every allocated extent when ``base`` is None), as an
        extent list; extents that became holes are included (they read back as zeros). None
        when ``base`` no longer exists: the caller then reads the whole volume."""
        ...

    async def expose(self, snapshot: Snapshot) -> Exposure:
        """Make ``snapshot`` readable, read-only, for the proxy this runs on."""
        ...

    async def withdraw(self, exposure: Exposure) -> None:
        """Undo :meth:`expose` (idempotent; never raises for an exposure already gone)."""
        ...

    async def remove(self, snapshots: Sequence[Snapshot]) -> None:
        """Remove snapshots (those already gone are skipped). Only blockferry's own."""
        ...

    async def rename(self, snapshot: Snapshot, name: str) -> Snapshot:
        """Give ``snapshot`` a new name (a temporary snapshot kept as the retained one)."""
        ...

    async def volumes(self) -> list[Volume]:
        """Every volume of the system (within the URL's scope: a pool for RBD): the rescan."""
        ...

    async def snapshots(self, volume: str) -> list[Snapshot]:
        """Every snapshot of ``volume``, oldest first, blockferry's and others'."""
        ...

    async def aclose(self) -> None:
        ...


@runtime_checkable
class GroupSnapshots(Protocol):
    """A :class:`StorageSystem` with a native consistency group: one atomic snapshot of several
    volumes, addressable afterwards like the per-volume snapshots of :meth:`StorageSystem.snapshot`."""

    async def group_snapshot(self, volumes: Sequence[str], name: str) -> list[Snapshot]:
        ...


@runtime_checkable
class StoragePlugin(Protocol):
    scheme: str

    async def open(self, url: str, options: Mapping[str, Any]) -> StorageSystem:
        """The storage system at ``url``; ConfigError for a bad URL, SourceError when the
        system cannot be reached."""
        ...


#: every optional capability a storage system may declare
SYSTEM_CAPABILITIES: tuple[type, ...] = (GroupSnapshots,)


#: the temporary snapshots this process's backups hold now (see :func:`hold`)
_live: set[str] = set()


def hold(name: str, held: bool = True) -> None:
    """Say that this process's backup holds the temporary snapshot ``name`` (or, ``held=False``,
    that it has let it go): :func:`leftover` leaves held ones alone and counts this process's
    others as leftovers (one a cancelled clean-up could not remove)."""
    if held:
        _live.add(name)
    else:
        _live.discard(name)


def _stamp(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%SZ")


def temporary_name(now: dt.datetime | None = None) -> str:
    """``blockferry-tmp.STAMP.HOST.PID.RANDOM``: who made it, so that the next run can tell a
    leftover (its process gone) from a snapshot another backup is reading right now."""
    host = "".join(c for c in socket.gethostname() if c.isalnum() or c == "-")[:40] or "host"
    return f"{TEMPORARY}.{_stamp(now)}.{host}.{os.getpid()}.{secrets.token_hex(4)}"


def retained_name(temporary: str) -> str:
    """The name a temporary snapshot gets when its backup is committed and it is kept."""
    return RETAINED + temporary.removeprefix(TEMPORARY)


def is_temporary(name: str) -> bool:
    return name.startswith(TEMPORARY + ".")


def is_retained(name: str) -> bool:
    return name.startswith(RETAINED + ".")


def leftover(name: str, *, now: dt.datetime | None = None) -> bool:
    """A temporary snapshot whose backup is over: made on this host by a process that is gone,
    or older than :data:`LEFTOVER_AGE` (made by a host that may never come back)."""
    if not is_temporary(name):
        return False
    parts = name.split(".")
    if len(parts) != 5:
        return True  # ours by prefix, not by the current format: from an older version
    _, stamp, host, pid, _ = parts
    try:
        made = dt.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return True
    if (now or dt.datetime.now(dt.UTC)) - made > LEFTOVER_AGE:
        return True
    me = "".join(c for c in socket.gethostname() if c.isalnum() or c == "-")[:40] or "host"
    if host != me or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return name not in _live  # this process's: a leftover unless a backup still reads it
    return not pid_alive(int(pid))
