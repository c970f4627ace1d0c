"""Source ``ebs``: an EBS volume or snapshot read through the EBS direct APIs
(``ebs://REGION/VOLUME_ID`` or ``ebs://REGION/SNAPSHOT_ID``). See docs/aws.md for the user's view.

A **volume** is backed up through a snapshot blockferry takes of it (CreateSnapshot, tagged
``blockferry`` with the run's id, the volume and the snapshot chain), waited for until completed.
A **snapshot** is read as it is, and never deleted.

Reading (written to AWS's documentation of the EBS direct APIs):

* ListSnapshotBlocks (paged) tells which blocks of the snapshot were ever written: only those are
  read, the rest are holes (:meth:`EbsDisk.data_extents`). Its ``BlockSize`` (512 KiB on AWS)
  maps block indexes onto the disk's offsets, whatever the repository's block size: a read of
  part of an EBS block fetches the whole block and keeps it a while for the read of its other
  part.
* GetSnapshotBlock with the block's token; the ``SHA256`` checksum AWS sends (base64) is checked
  against the data, and a mismatch is retried like a network error, then fails the read. Many
  blocks are in flight at once: all the EBS blocks of one read (a batch of the mover) are
  fetched concurrently, bounded per disk by ``max_requests``.
* Change tracking: the disk's ``change_id`` is ``ebs:SNAPSHOT_ID``. The next backup lists
  ListChangedBlocks between the previous point's snapshot and the new one; only those blocks are
  read. A base snapshot that is gone (or not completed, or that AWS refuses to compare) means a
  full read, with the reason in the session.

Snapshots blockferry took are deleted when no longer needed: once the point is committed, every
other blockferry snapshot of the same volume and chain (the previous base, and any left by a run
that died); when the point is abandoned (a failure, a cancellation), the new snapshot. The newest
one stays as the base of the next incremental.
"""

from __future__ import annotations

import base64
import hashlib
import re
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import anyio
from blockferry.datapath.source import Buffer, Extent
from blockferry.errors import SourceError, plain_errors
from blockferry.log import get_logger
from blockferry.plugins.aws.client import AwsClients, AwsNotFoundError, AwsSettings, load_settings, require_asyncio
from blockferry.units import GiB, KiB

if TYPE_CHECKING:
    from blockferry.repo.format import DiskRecord

log = get_logger(component="ebs")

#: the EBS direct APIs' block size (AWS documents 512 KiB; the API's BlockSize answer is used)
EBS_BLOCK_SIZE = 512 * KiB
TAG = "blockferry"
TAG_RUN = "blockferry:run"
TAG_VOLUME = "blockferry:volume"
TAG_CHAIN = "blockferry:chain"
CHANGE_PREFIX = "ebs:"
#: EBS blocks read only in part kept for the read of their other part
_PARTIAL_CACHE = 32
_REGION = re.compile(r"[a-z]{2}(-[a-z0-9]+)+-\d+")
_ID = re.compile(r"(snap|vol)-[0-9a-f]{8,17}")


def parse_url(url: str) -> tuple[str, str]:
    """``ebs://us-east-1/vol-0123...`` → ``("us-east-1", "vol-0123...")``."""
    p = urlparse(url)
    rid = p.path.strip("/")
    if p.scheme != "ebs" or not p.netloc or not rid or p.query or p.fragment:
        raise SourceError(f"{url}: an EBS source is named ebs://REGION/VOLUME_ID or ebs://REGION/SNAPSHOT_ID")
    if not _REGION.fullmatch(p.netloc):
        raise SourceError(f"{url}: {p.netloc!r} is not an AWS region name")
    if not _ID.fullmatch(rid):
        raise SourceError(f"{url}: {rid!r} is not an EBS volume (vol-...) or snapshot (snap-...) id")
    return p.netloc, rid


def snapshot_of(change_id: str | None) -> str | None:
    """The snapshot id an ``ebs:`` change id names, else None."""
    if change_id and change_id.startswith(CHANGE_PREFIX) and _ID.fullmatch(rest := change_id[len(CHANGE_PREFIX):]):
        return rest if rest.startswith("snap-") else None
    return None


def checksum(data: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


class EbsDisk:
    """A completed EBS snapshot read through the EBS direct APIs (offers ChangeTracking)."""

    def __init__(self, url: str, region: str, resource: str, settings: AwsSettings, clients: AwsClients) -> None:
        self.url = url
        self.region = region
        self.name = resource
        self.settings = settings
        self.clients = clients
        self.volume: str | None = resource if resource.startswith("vol-") else None
        self.snapshot = "" if self.volume else resource
        #: the snapshot was taken by this disk (and is deleted by it when not needed)
        self.created = False
        self.run = uuid.uuid4().hex[:16]
        self.size = 0
        self.block_size = EBS_BLOCK_SIZE
        self.identity = {"region": region, "volume": self.volume} if self.volume else {"region": region,
                                                                                        "snapshot": resource}
        self.metadata: dict[str, Any] = {"kind": "ebs-volume" if self.volume else "ebs-snapshot"}
        self.change_id: str | None = None
        #: block index → token, from ListSnapshotBlocks (loaded once)
        self._tokens: dict[int, str] | None = None
        self._listing = anyio.Lock()
        self._taking = anyio.Lock()
        self._partial: OrderedDict[int, bytes] = OrderedDict()
        self._closed = False
        self._finished = False

    def __repr__(self) -> str:
        return f"<EbsDisk {self.url} snapshot={self.snapshot} size={self.size}>"

    # -- opening -------------------------------------------------------------------------------

    async def _open(self) -> None:
        """Check that the volume or snapshot exists and learn its size. A volume's snapshot is
        taken later, by the first call that needs it (:meth:`_snapshot`): opening a disk only to
        check it (as a backup's preflight does) costs no snapshot."""
        ec2 = self.clients.ec2
        if self.volume:
            vol = await self.clients.call(f"{self.url}: DescribeVolumes",
                                          lambda: ec2.describe_volumes(VolumeIds=[self.volume]))
            if not vol.get("Volumes"):
                raise SourceError(f"{self.url}: volume {self.volume} not found in {self.region}")
            self.size = int(vol["Volumes"][0]["Size"]) * GiB
            return
        snap = await self._describe(self.snapshot)
        if snap is None:
            raise SourceError(f"{self.url}: snapshot {self.snapshot} not found in {self.region}")
        self._taken(snap)

    def _taken(self, snap: Mapping[str, Any]) -> None:
        if snap.get("State") != "completed":
            err = SourceError(f"{self.url}: snapshot {self.snapshot} is {snap.get('State')}, not completed")
            err.transient = snap.get("State") == "pending"  # a later attempt may find it completed
            raise err
        self.size = int(snap["VolumeSize"]) * GiB
        self.change_id = CHANGE_PREFIX + self.snapshot
        self.metadata.update(snapshot=self.snapshot, volume=snap.get("VolumeId"),
                             created_by_blockferry=self.created, started=str(snap.get("StartTime", "")))

    async def _snapshot(self) -> str:
        """The snapshot this disk reads: a volume's is taken by the first caller."""
        async with self._taking:
            if not self.snapshot:
                # the disk's size becomes the snapshot's (the volume may have been resized since
                # it was opened: the source mover takes the size after asking for the extents)
                try:
                    self._taken(await self._take_snapshot())
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await self._drop_unread()
                    raise
            return self.snapshot

    async def _drop_unread(self) -> None:
        """Delete the snapshot taken for a read that will not happen (logged if it cannot be:
        the next committed backup of the volume deletes it)."""
        if not self.created or self._finished:
            return
        self._finished = True
        try:
            await cleanup(self.clients, self.url, str(self.volume), self.settings.chain, keep=None,
                          only=self.snapshot)
        except Exception as exc:
            log.warning("ebs_snapshot_not_deleted", snapshot=self.snapshot, error=str(exc))

    async def _describe(self, snapshot: str) -> dict[str, Any] | None:
        """The snapshot's description, or None when it does not exist."""
        ec2 = self.clients.ec2
        try:
            got = await self.clients.call(f"{self.url}: DescribeSnapshots {snapshot}",
                                          lambda: ec2.describe_snapshots(SnapshotIds=[snapshot]))
        except AwsNotFoundError:
            return None
        snaps = got.get("Snapshots") or []
        return snaps[0] if snaps else None

    async def _create(self) -> str:
        """Take the volume's snapshot (CreateSnapshot, tagged); its id."""
        ec2 = self.clients.ec2
        tags = [{"Key": TAG, "Value": "1"}, {"Key": TAG_RUN, "Value": self.run},
                {"Key": TAG_VOLUME, "Value": str(self.volume)}, {"Key": TAG_CHAIN, "Value": self.settings.chain}]
        got = await self.clients.call(f"{self.url}: CreateSnapshot", lambda: ec2.create_snapshot(
            VolumeId=self.volume, Description=f"blockferry backup of {self.volume} (run {self.run})",
            TagSpecifications=[{"ResourceType": "snapshot", "Tags": tags}]))
        log.info("ebs_snapshot_created", volume=self.volume, snapshot=got["SnapshotId"], run=self.run)
        return str(got["SnapshotId"])

    async def _take_snapshot(self) -> dict[str, Any]:
        """The volume's snapshot, taken and waited for until completed."""
        self.snapshot = await self._create()
        self.created = True
        delay = self.settings.poll_interval
        with anyio.move_on_after(self.settings.snapshot_timeout):
            while True:
                snap = await self._describe(self.snapshot)
                state = (snap or {}).get("State")
                if snap is not None and state == "completed":
                    return snap
                if snap is None or state == "error":
                    raise SourceError(f"{self.url}: snapshot {self.snapshot} of {self.volume} failed "
                                      f"({(snap or {}).get('StateMessage') or state or 'it disappeared'})")
                await anyio.sleep(delay)
                delay = min(30.0, delay * 1.5)
        err = SourceError(f"{self.url}: snapshot {self.snapshot} of {self.volume} not completed after "
                          f"{self.settings.snapshot_timeout:.0f} s (snapshot_timeout)")
        err.transient = True
        raise err

    # -- what to read --------------------------------------------------------------------------

    async def _blocks(self) -> dict[int, str]:
        """Block index → token of every written block of the snapshot (ListSnapshotBlocks)."""
        async with self._listing:
            if self._tokens is not None:
                return self._tokens
            await self._snapshot()
            ebs, tokens, token = self.clients.ebs, {}, None
            while True:
                kw: dict[str, Any] = {"SnapshotId": self.snapshot, "MaxResults": 10000}
                if token:
                    kw["NextToken"] = token
                page = await self.clients.call(f"{self.url}: ListSnapshotBlocks",
                                               lambda kw=kw: ebs.list_snapshot_blocks(**kw))
                self._block_size(page)
                for b in page.get("Blocks") or []:
                    tokens[int(b["BlockIndex"])] = b["BlockToken"]
                token = page.get("NextToken")
                if not token:
                    break
            self._tokens = tokens
            self.metadata["written_blocks"] = len(tokens)
            return tokens

    def _block_size(self, page: Mapping[str, Any]) -> None:
        bs = int(page.get("BlockSize") or EBS_BLOCK_SIZE)
        if bs <= 0 or bs % 512:
            raise SourceError(f"{self.url}: the EBS direct API answered an invalid block size {bs}")
        self.block_size = bs
        self.metadata["ebs_block_size"] = bs

    def _extents(self, indexes: Sequence[int]) -> list[Extent]:
        bs, out = self.block_size, []
        for i in sorted(indexes):
            start = i * bs
            if start >= self.size:
                continue
            n = min(bs, self.size - start)
            if out and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((start, n))
        return out

    async def data_extents(self) -> list[Extent] | None:
        return self._extents(list(await self._blocks()))

    async def changed_extents(self, base: DiskRecord) -> tuple[list[Extent] | None, str]:
        """Blocks changed since ``base``'s snapshot (ListChangedBlocks), or None and why not."""
        try:
            return await self._changed(base)
        except BaseException:
            # the caller learns of finish() only from a successful return: the snapshot taken
            # for this read is dropped here
            with anyio.CancelScope(shield=True):
                await self._drop_unread()
            raise

    async def _changed(self, base: DiskRecord) -> tuple[list[Extent] | None, str]:
        await self._snapshot()
        first = snapshot_of(base.change_id)
        if first is None:
            return self._full("the base point recorded no EBS snapshot")
        if first == self.snapshot:
            return [], f"EBS snapshot {first} is the base's own: nothing changed"
        snap = await self._describe(first)
        if snap is None:
            return self._full(f"the base point's snapshot {first} is gone (deleted outside blockferry?)")
        if snap.get("State") != "completed":
            return self._full(f"the base point's snapshot {first} is {snap.get('State')}")
        ebs, changed, token = self.clients.ebs, [], None
        try:
            while True:
                kw: dict[str, Any] = {"FirstSnapshotId": first, "SecondSnapshotId": self.snapshot,
                                      "MaxResults": 10000}
                if token:
                    kw["NextToken"] = token
                page = await self.clients.call(f"{self.url}: ListChangedBlocks from {first}",
                                               lambda kw=kw: ebs.list_changed_blocks(**kw))
                self._block_size(page)
                changed += [int(b["BlockIndex"]) for b in page.get("ChangedBlocks") or []]
                token = page.get("NextToken")
                if not token:
                    break
        except SourceError as exc:
            if exc.transient:
                raise
            return self._full(f"AWS cannot compare the base point's snapshot {first} with {self.snapshot}: {exc}")
        extents = self._extents(changed)
        self.metadata["base_snapshot"] = first
        self.metadata["changed_blocks"] = len(changed)
        reason = f"EBS ListChangedBlocks from {first}: {len(changed)} blocks changed"
        log.info("ebs_changed_blocks", disk=self.name, base=first, snapshot=self.snapshot, changed=len(changed))
        return extents, reason

    def _full(self, reason: str) -> tuple[None, str]:
        self.metadata["tracking"] = reason
        log.info("ebs_full_read", disk=self.name, reason=reason)
        return None, reason

    # -- reading -------------------------------------------------------------------------------

    async def read_into(self, offset: int, buffers: Sequence[Buffer]) -> int:
        want = sum(len(b) for b in buffers)
        end = min(offset + want, self.size)
        if offset >= end:
            return 0
        tokens = await self._blocks()
        bs = self.block_size
        first, last = offset // bs, (end - 1) // bs
        blocks: dict[int, bytes | None] = {}

        async def fetch(i: int) -> None:
            blocks[i] = await self._block(i, tokens.get(i), whole=offset <= i * bs and (i + 1) * bs <= end)

        with plain_errors():  # the failing block's SourceError, not a group of it
            async with anyio.create_task_group() as tg:
                for i in range(first, last + 1):
                    tg.start_soon(fetch, i)
        pos = offset
        for buf in buffers:
            view = memoryview(buf).cast("B")
            done = 0
            while done < len(view) and pos < end:
                i, within = divmod(pos, bs)
                n = min(len(view) - done, bs - within, end - pos)
                data = blocks[i]
                if data is None:
                    view[done:done + n] = bytes(n)
                else:
                    view[done:done + n] = memoryview(data)[within:within + n]
                done += n
                pos += n
            if pos >= end:
                break
        return end - offset

    async def _block(self, index: int, token: str | None, *, whole: bool) -> bytes | None:
        """The data of block ``index`` (None: never written, zeros), its checksum checked."""
        if token is None:
            return None
        if (cached := self._partial.pop(index, None)) is not None:
            return cached
        ebs, bs, where = self.clients.ebs, self.block_size, f"{self.url}: block {index} (offset {index * self.block_size})"

        async def get() -> bytes:
            resp = await ebs.get_snapshot_block(SnapshotId=self.snapshot, BlockIndex=index, BlockToken=token)
            async with resp["BlockData"] as body:
                data = await body.read()
            algorithm, expected = resp.get("ChecksumAlgorithm"), resp.get("Checksum")
            if algorithm != "SHA256" or not expected:
                raise SourceError(f"{where}: AWS sent no SHA256 checksum (algorithm {algorithm!r})")
            if len(data) != bs or int(resp.get("DataLength") or len(data)) != len(data):
                err = SourceError(f"{where}: {len(data)} bytes received, the block is {bs}")
                err.transient = True
                raise err
            if checksum(data) != expected:
                err = SourceError(f"{where}: the data does not match its SHA256 checksum")
                err.transient = True  # damaged in transit: fetched again
                raise err
            return data

        data = await self.clients.call(f"{where}: GetSnapshotBlock", get)
        if not whole:
            self._partial[index] = data
            while len(self._partial) > _PARTIAL_CACHE:
                self._partial.popitem(last=False)
        return data

    # -- the end -------------------------------------------------------------------------------

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._partial.clear()
            await self.clients.__aexit__(None, None, None)

    async def finish(self, committed: bool) -> None:
        """Committed: delete every other blockferry snapshot of the volume and chain (the previous
        base, strays of dead runs). Abandoned: delete the new snapshot. Snapshots blockferry did not
        take are never deleted."""
        if self._finished or not self.created:
            return
        self._finished = True
        async with AwsClients(self.region, self.settings) as clients:
            await cleanup(clients, self.url, str(self.volume), self.settings.chain,
                          keep=self.snapshot if committed else None, only=None if committed else self.snapshot)


async def cleanup(clients: AwsClients, url: str, volume: str, chain: str, *, keep: str | None,
                  only: str | None) -> list[str]:
    """Delete blockferry's snapshots of ``volume`` in ``chain``: ``only`` that one, or all but ``keep``."""
    ec2 = clients.ec2
    if only is not None:
        doomed = [only]
    else:
        filters = [{"Name": "volume-id", "Values": [volume]}, {"Name": f"tag:{TAG_CHAIN}", "Values": [chain]},
                   {"Name": f"tag:{TAG}", "Values": ["1"]}]
        got = await clients.call(f"{url}: DescribeSnapshots of blockferry's", lambda: ec2.describe_snapshots(
            OwnerIds=["self"], Filters=filters))
        doomed = [s["SnapshotId"] for s in got.get("Snapshots") or [] if s["SnapshotId"] != keep]
    for snap in doomed:
        try:
            await clients.call(f"{url}: DeleteSnapshot {snap}", lambda snap=snap: ec2.delete_snapshot(SnapshotId=snap))
        except AwsNotFoundError:
            pass  # gone already
        log.info("ebs_snapshot_deleted", volume=volume, snapshot=snap)
    return doomed


class EbsSourcePlugin:
    scheme = "ebs"

    def disk_name(self, url: str) -> str:
        return parse_url(url)[1]

    async def open(self, url: str, options: Mapping[str, Any]) -> EbsDisk:
        require_asyncio("ebs source")
        region, resource = parse_url(url)
        settings = load_settings(options)
        clients = await AwsClients(region, settings).__aenter__()
        disk = EbsDisk(url, region, resource, settings, clients)
        try:
            await disk._open()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await disk.aclose()
            raise
        return disk
