"""Source ``rbd``: one Ceph RBD image (``rbd://POOL/IMAGE[?conf=PATH&id=NAME]``), read from a
temporary storage snapshot, never from the live image.

The steps of a backup from a storage snapshot (docs/storage-systems.md), as they apply to a
plain volume (no hypervisor to freeze), each timed in the point's disk metadata
(``metadata["storage"]["steps"]``):

1. *analyse*: the image exists on the storage system (at :meth:`RbdSourcePlugin.open`);
2. *snapshot*: a temporary snapshot ``blockferry-tmp.…`` of the image (leftovers of killed runs
   are removed first);
3. *expose*: the snapshot is exported read-only over NBD to this proxy (``qemu-nbd``);
4. *read*: the blocks are read from the export; for an incremental only the extents
   ``rbd diff --from-snap`` reports between the previous point's snapshot and this one;
5. *remove*: once the point is committed the temporary snapshot becomes the retained one
   (``blockferry-keep.…``, renamed) and older retained snapshots are removed; when the point is
   abandoned (failure, cancellation) the temporary snapshot is removed. The export is withdrawn
   when the read ends. This step runs after the point is written, so it is logged
   (``snapshot_removed``, ``snapshot_retained``), not recorded in the point.

Nothing is created before the first read (opening to check a source changes nothing), and
everything created is undone in a shielded scope.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
from blockferry.datapath.source import Buffer, Extent
from blockferry.datapath.storage import (
    Exposure,
    Snapshot,
    hold,
    is_retained,
    leftover,
    retained_name,
    temporary_name,
)
from blockferry.errors import NotFoundError, SourceError
from blockferry.log import get_logger
from blockferry.nbd.client import NBDClient
from blockferry.plugins.rbd.storage import RbdStorage, RbdStoragePlugin, parse_url

if TYPE_CHECKING:
    from blockferry.repo.format import DiskRecord

log = get_logger(component="rbd")

#: ``change_id`` of a point read from a storage snapshot: this, then the retained snapshot's name
CHANGE_PREFIX = "rbd-snapshot:"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


class RbdDisk:
    """One RBD image between :meth:`RbdSourcePlugin.open` and :meth:`finish` (offers
    ChangeTracking; reads over NBD, asynchronously)."""

    def __init__(self, url: str, storage: RbdStorage, volume: str, size: int, object_size: int | None) -> None:
        self.url = url
        self.storage = storage
        self.volume = volume
        self.name = volume.partition("/")[2]
        self.size = size
        self.identity = {"pool": storage.pool, "image": self.name, "conf": storage.conf}
        self.temporary = temporary_name()
        self.retained = retained_name(self.temporary)
        self.change_id: str | None = CHANGE_PREFIX + self.retained
        self.steps: list[dict[str, str]] = [{"step": "analyse", "at": _now()}]
        self.metadata: dict[str, Any] = {
            "kind": "rbd-image",
            "consistency": "crash",
            "storage": {"system": storage.url, "volume": volume, "snapshot": self.retained,
                        "object_size": object_size, "steps": self.steps},
        }
        self.client: NBDClient | None = None
        self.snapshot: Snapshot | None = None
        self.exposure: Exposure | None = None
        self._lock = anyio.Lock()
        self._finished = False

    def __repr__(self) -> str:
        return f"<RbdDisk {self.volume} snapshot={self.snapshot.name if self.snapshot else None}>"

    async def _start(self) -> NBDClient:
        async with self._lock:
            if self.client is not None:
                return self.client
            if self._finished:
                raise SourceError(f"{self.url}: read after the backup finished")
            try:
                await self._remove_leftovers()
                hold(self.temporary)
                self.snapshot = (await self.storage.snapshot([self.volume], self.temporary))[0]
                self.steps.append({"step": "snapshot", "at": _now()})
                log.info("snapshot_created", volume=self.volume, snapshot=self.temporary)
                self.exposure = await self.storage.expose(self.snapshot)
                self.steps.append({"step": "expose", "at": _now()})
                self.client = await NBDClient.connect(self.exposure.url)
                self.steps.append({"step": "read", "at": _now()})
            except BaseException:
                # nothing may outlive a failed start: finish() may never be called for it
                await self._undo(committed=False)
                raise
            return self.client

    async def _remove_leftovers(self) -> None:
        gone = [s for s in await self.storage.snapshots(self.volume) if leftover(s.name)]
        if gone:
            await self.storage.remove(gone)
            self.metadata["storage"]["leftovers_removed"] = [s.name for s in gone]
            log.info("leftovers_removed", volume=self.volume, snapshots=[s.name for s in gone])

    # -- ChangeTracking ---------------------------------------------------------------------------

    async def changed_extents(self, base: DiskRecord) -> tuple[list[Extent] | None, str]:
        prev = base.change_id or ""
        if not prev.startswith(CHANGE_PREFIX):
            return None, "the previous point was not read from an RBD snapshot"
        name = prev.removeprefix(CHANGE_PREFIX)
        await self._start()
        assert self.snapshot is not None
        try:
            extents = await self.storage.changed_extents(self.snapshot, name)
        except BaseException:
            await self._undo(committed=False)
            raise
        if extents is None:
            self.metadata["storage"]["full_read"] = f"snapshot {name} of the previous point is gone"
            return None, f"the previous point's snapshot {self.volume}@{name} is gone"
        self.metadata["storage"]["base_snapshot"] = name
        return extents, f"rbd diff since snapshot {name}: {len(extents)} extents, {sum(n for _, n in extents)} bytes"

    async def finish(self, committed: bool) -> None:
        await self._undo(committed=committed)

    async def _undo(self, *, committed: bool) -> None:
        """Withdraw the export; keep the snapshot as the retained one (committed) or remove it;
        remove older retained snapshots. Shielded: runs to the end under cancellation."""
        with anyio.CancelScope(shield=True):
            self._finished = True
            await self._withdraw()
            hold(self.temporary, False)
            snap, self.snapshot = self.snapshot, None
            if snap is None:
                return
            if not committed:
                await self.storage.remove([snap])
                return
            kept = await self.storage.rename(snap, self.retained)
            log.info("snapshot_retained", volume=self.volume, snapshot=kept.name)
            older = [s for s in await self.storage.snapshots(self.volume) if is_retained(s.name) and s.name != kept.name]
            await self.storage.remove(older)

    async def _withdraw(self) -> None:
        with anyio.CancelScope(shield=True):
            client, self.client = self.client, None
            if client is not None:
                await client.aclose()
            exposure, self.exposure = self.exposure, None
            if exposure is not None:
                await self.storage.withdraw(exposure)

    # -- SourceDisk -------------------------------------------------------------------------------

    async def data_extents(self) -> list[Extent] | None:
        await self._start()
        assert self.snapshot is not None
        return await self.storage.changed_extents(self.snapshot, None)

    async def read_into(self, offset: int, buffers: Sequence[Buffer]) -> int:
        client = self.client or await self._start()
        return await client.read_into(offset, buffers)

    async def aclose(self) -> None:
        """The read is over: withdraw the export. The snapshot waits for :meth:`finish` (a disk
        never finished, as a plain reader's, leaves it to the next run's leftover removal)."""
        await self._withdraw()


class RbdSourcePlugin:
    scheme = "rbd"

    def disk_name(self, url: str) -> str:
        _, image, _, _ = parse_url(url, {})
        return image or url

    async def open(self, url: str, options: Mapping[str, Any]) -> RbdDisk:
        pool, image, conf, user = parse_url(url, options)
        if image is None:
            raise SourceError(f"{url}: name the image (rbd://POOL/IMAGE)")
        query = f"?conf={conf}" + (f"&id={user}" if user else "")
        storage = await RbdStoragePlugin().open(f"rbd://{pool}{query}", options)
        volume = f"{pool}/{image}"
        try:
            info = await storage.volume(volume)
        except NotFoundError:
            raise SourceError(f"{url}: no RBD image {image} in pool {pool}") from None
        return RbdDisk(url, storage, volume, info.size, info.metadata.get("object_size"))
