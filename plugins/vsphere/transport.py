"""How the ``vsphere`` source reads a disk from a VM snapshot: the transport seam.

A transport is a factory ``async (DiskLocation) -> DiskReader`` registered under a name
(:func:`register_transport`); the source picks one by the ``transport`` option. One is built in:

``http`` — the datastore's HTTP file access (``/folder/<path>?dcPath=...&dsName=...``, the
session cookie of the vSphere login), ranged GETs over keep-alive connections (httpx, which runs on
anyio, so the source works on asyncio and trio alike). It reads the snapshot's base disk file: a
flat or thick extent (a descriptor file is followed to its one flat extent). It cannot read sparse
delta disks (a VM that already had snapshots of its own) and does not know which areas are
allocated (every byte of the file is read). It is what the tests run against govmomi's simulator,
which serves datastore files this way.

**It stands in for VMware's own transports.** Against a real ESXi the usual ones are VDDK's
``nbd``/``nbdssl``, ``hotadd`` and ``san``: they need VMware's proprietary VDDK library (or a
proxy VM on the ESXi host), which cannot be installed or tested here. They fit behind the same
:class:`DiskReader`: e.g. nbdkit's VDDK plugin exports the snapshot's disk over NBD, and a reader
on :mod:`blockferry.nbd.client` reads it (with its allocation map as ``data_extents``).
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote

import httpx
from blockferry.datapath.source import Buffer, Extent
from blockferry.errors import ConfigError, SourceError


@dataclass(frozen=True)
class DiskLocation:
    """One disk of one VM snapshot, as a transport needs it."""

    #: ``https://vcenter:443``: where the API (and the datastore's HTTP access) answers
    base_url: str
    #: ``[datastore] folder/disk.vmdk`` from the snapshot's configuration
    file: str
    datastore: str
    #: the path inside the datastore
    path: str
    #: the datacenter's inventory path
    dc_path: str
    #: the virtual disk's size in bytes
    capacity: int
    vm: str
    snapshot: str
    disk_key: int
    #: ``vmware_soap_session=...``: the API session's cookie
    cookie: str
    ssl_context: ssl.SSLContext | None
    #: what the message of an error names
    label: str


class DiskReader(Protocol):
    """Reads one disk of a snapshot. Reads may run concurrently."""

    #: the transport's name, recorded in the point's metadata
    mode: str

    async def data_extents(self) -> list[Extent] | None:
        """Extents that may hold data (None: every byte may); reads elsewhere give zeros."""
        ...

    async def read_into(self, offset: int, buffers: Sequence[Buffer]) -> int:
        """Fill ``buffers`` from ``offset`` (within the disk's capacity: the caller clips);
        returns the bytes filled (the whole request)."""
        ...

    async def aclose(self) -> None:
        ...


Transport = Callable[[DiskLocation], Awaitable[DiskReader]]

_TRANSPORTS: dict[str, Transport] = {}


def register_transport(name: str, factory: Transport | None) -> None:
    """Make ``factory`` the transport ``name`` (None removes it)."""
    if factory is None:
        _TRANSPORTS.pop(name, None)
    else:
        _TRANSPORTS[name] = factory


def transport(name: str) -> Transport:
    try:
        return _TRANSPORTS[name]
    except KeyError:
        raise ConfigError(f"unknown vSphere transport {name!r} (known: {', '.join(sorted(_TRANSPORTS))})") from None


_DATASTORE_PATH = re.compile(r"^\[(?P<ds>[^\]]+)\]\s*(?P<path>.*)$")
#: ``RW 4192256 VMFS "disk-flat.vmdk"`` (an extent line of a VMDK descriptor)
_EXTENT = re.compile(r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)\s+"([^"]+)"(?:\s+(\d+))?\s*$', re.M)
DESCRIPTOR_MAGIC = b"# Disk DescriptorFile"
PROBE = 4096  #: bytes read first to tell a descriptor from the data itself


def split_datastore_path(file: str) -> tuple[str, str]:
    """``[LocalDS_0] vm1/disk1.vmdk`` → (``LocalDS_0``, ``vm1/disk1.vmdk``)."""
    m = _DATASTORE_PATH.match(file)
    if not m:
        raise SourceError(f"{file!r} is not a datastore path ([datastore] folder/file)")
    return m.group("ds"), m.group("path")


class HttpDatastoreReader:
    """Ranged GETs of the disk's file through the datastore's HTTP access (see the module)."""

    mode = "http"

    def __init__(self, loc: DiskLocation, client: httpx.AsyncClient) -> None:
        self.loc = loc
        self.client = client
        self.url = ""
        self.length = 0  #: bytes of the file; the rest of the disk reads as zeros

    @classmethod
    async def open(cls, loc: DiskLocation) -> HttpDatastoreReader:
        verify: ssl.SSLContext | bool = loc.ssl_context if loc.ssl_context is not None else False
        headers = {"Cookie": loc.cookie} if loc.cookie else {}
        limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
        client = httpx.AsyncClient(headers=headers, verify=verify, limits=limits,
                                   timeout=httpx.Timeout(60.0, connect=20.0))
        reader = cls(loc, client)
        try:
            await reader._locate(loc.path)
        except BaseException:
            await client.aclose()
            raise
        return reader

    def _url(self, path: str) -> str:
        q = f"dcPath={quote(self.loc.dc_path, safe='')}&dsName={quote(self.loc.datastore, safe='')}"
        return f"{self.loc.base_url}/folder/{quote(path)}?{q}"

    async def _get(self, url: str, start: int, end: int) -> httpx.Response:
        """GET bytes ``start..end-1``; 416 (nothing there) is answered, not raised."""
        try:
            r = await self.client.get(url, headers={"Range": f"bytes={start}-{end - 1}"})
        except httpx.HTTPError as exc:
            raise SourceError(f"{self.loc.label}: reading {self.loc.file} at offset {start} failed: {exc}") from exc
        if r.status_code == 404:
            raise SourceError(f"{self.loc.label}: {self.loc.file} not found on datastore {self.loc.datastore}")
        if r.status_code in (401, 403):
            raise SourceError(f"{self.loc.label}: reading {self.loc.file} refused ({r.status_code})")
        if r.status_code not in (200, 206, 416):
            raise SourceError(f"{self.loc.label}: reading {self.loc.file} at offset {start} failed: "
                              f"HTTP {r.status_code}")
        return r

    @staticmethod
    def _total(r: httpx.Response) -> int:
        if r.status_code == 200:
            return len(r.content)
        rng = r.headers.get("content-range", "")
        total = rng.rpartition("/")[2]
        if not total.isdigit():
            raise SourceError(f"unexpected Content-Range {rng!r}")
        return int(total)

    async def _locate(self, path: str) -> None:
        """Find the file that holds the data: the disk's file, or its descriptor's flat extent."""
        url = self._url(path)
        r = await self._get(url, 0, PROBE)
        self.url, self.length = url, 0 if r.status_code == 416 else self._total(r)
        if not r.content.startswith(DESCRIPTOR_MAGIC):
            return
        text = r.content.decode("utf-8", "replace")
        extents = _EXTENT.findall(text)
        if len(extents) != 1 or extents[0][2] not in ("FLAT", "VMFS") or (extents[0][4] or "0") != "0":
            kinds = ", ".join(e[2] for e in extents) or "none"
            raise SourceError(f"{self.loc.label}: {self.loc.file} is not one flat extent (extents: {kinds}); the "
                              "http transport reads flat disks only (a VM with snapshots of its own has sparse "
                              "delta disks)")
        folder = path.rpartition("/")[0]
        flat = f"{folder}/{extents[0][3]}" if folder else extents[0][3]
        r = await self._get(self._url(flat), 0, 1)
        self.url, self.length = self._url(flat), 0 if r.status_code == 416 else self._total(r)

    async def data_extents(self) -> list[Extent] | None:
        n = min(self.length, self.loc.capacity)
        return [(0, n)] if n else []

    async def read_into(self, offset: int, buffers: Sequence[Buffer]) -> int:
        total = sum(len(b) for b in buffers)
        end = min(offset + total, self.length)
        data = b""
        if offset < end:
            r = await self._get(self.url, offset, end)
            data = r.content if r.status_code == 206 else r.content[offset:end]
            if len(data) != end - offset:
                raise SourceError(f"{self.loc.label}: short read of {self.loc.file} at offset {offset} "
                                  f"({len(data)} of {end - offset} bytes): the file changed?")
        pos = 0
        for buf in buffers:
            n = len(buf)
            chunk = data[pos:pos + n]
            buf[:len(chunk)] = chunk
            if len(chunk) < n:
                buf[len(chunk):] = bytes(n - len(chunk))
            pos += n
        return total

    async def aclose(self) -> None:
        await self.client.aclose()


register_transport("http", HttpDatastoreReader.open)
