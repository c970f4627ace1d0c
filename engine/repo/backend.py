"""The storage contract every repository backend meets (local directory, S3).

Keys are ``/``-separated relative names (``packs/ab/ab12...``). The contract is written so that a
backend without rename (S3) fits: the only ways to publish bytes are :meth:`Backend.put` (a whole
small object, atomically) and an :class:`Upload` (a large object, visible only after ``commit``).
A reader therefore never sees half an object, whatever happens to the writer.

Every method raises only engine errors: :class:`~blockferry.errors.NotFoundError` for a missing
key, :class:`~blockferry.errors.KeyExistsError` for an exclusive put onto an existing key, and
:class:`~blockferry.errors.RepositoryError` (``transient``) for everything else.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import msgspec
from blockferry.errors import RepositoryError


class KeyExistsError(RepositoryError):
    """An exclusive put found the key already present (used for locks and create-once keys)."""

    transient = False


class BackendCapabilities(msgspec.Struct, frozen=True, kw_only=True):
    """What callers may rely on, and how hard they may push."""

    #: useful requests in flight at once
    max_connections: int = 8
    #: publishing uses rename (informational: the contract never requires it)
    atomic_rename: bool = False
    #: the backend keeps data on this machine's filesystem (free-space checks are meaningful)
    local: bool = False


class ObjectInfo(msgspec.Struct, frozen=True):
    key: str
    size: int


@runtime_checkable
class Upload(Protocol):
    """A large object being written. Nothing is visible under its key until :meth:`commit`."""

    key: str

    async def write(self, parts: Sequence[bytes | bytearray | memoryview]) -> int:
        """Append the parts in order; returns the bytes appended. Not retried by callers: a failed
        write aborts the upload."""
        ...

    async def commit(self) -> None:
        """Make the object durable and visible under its key, whole. Called once."""
        ...

    async def abort(self) -> None:
        """Discard what was written. Idempotent; safe after a failed write or commit."""
        ...


@runtime_checkable
class Backend(Protocol):
    url: str
    capabilities: BackendCapabilities

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """The object's bytes from ``offset`` (``length`` bytes, or to the end). Idempotent, may be
        retried. A missing key raises NotFoundError; a range past the end returns what exists."""
        ...

    async def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Several ``(offset, length)`` ranges of one object, in the order asked. Idempotent."""
        ...

    async def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        """Store a whole object atomically and durably: readers see the old object or the new one,
        never a mix. With ``exclusive`` an existing key raises KeyExistsError and is left alone.
        Without it the put is idempotent (a retry stores the same bytes)."""
        ...

    async def open_upload(self, key: str) -> Upload:
        """Start writing a large object (a pack)."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the object. Idempotent: a missing key is not an error."""
        ...

    async def exists(self, key: str) -> bool:
        ...

    async def stat(self, key: str) -> ObjectInfo:
        """Size of the object; NotFoundError if missing."""
        ...

    def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        """Every committed object whose key starts with ``prefix`` (``"points/"``), in no set
        order. Uploads not yet committed are never listed."""
        ...

    async def check_writable(self) -> None:
        """Prove that a write would succeed now (RepositoryError with the reason if not)."""
        ...

    async def free_space(self) -> int | None:
        """Bytes that can still be written, or None when the backend has no such limit."""
        ...

    async def aclose(self) -> None:
        ...


@runtime_checkable
class BackendPlugin(Protocol):
    """Entry point ``blockferry.backends``, named by URL scheme."""

    scheme: str

    async def open(self, url: str, options: Mapping[str, Any]) -> Backend:
        """Open the storage at ``url`` (which need not hold a repository yet)."""
        ...
