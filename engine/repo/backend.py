"""The storage contract every repository backend meets (local directory, S3).

Keys are ``/``-separated relative names (``packs/ab/ab12...``). The contract is written so that a
backend without rename (S3) fits: the only ways to publish bytes are :meth:`Backend.put` (a whole
small object, atomically) and an :class:`Upload` (a large object, visible only after ``commit``).
A reader therefore never sees half an object, whatever happens to the writer.

Every method raises only engine errors: :class:`~blockferry.errors.NotFoundError` for a missing
key, :class:`~blockferry.errors.KeyExistsError` for an exclusive put onto an existing key, and
:class:`~blockferry.errors.RepositoryError` (``transient``) for everything else.

A backend may offer more than :class:`Backend`: each optional capability is a small protocol
below (:class:`Protects`, :class:`Retention`, :class:`AbortsUploads`, :class:`CleansTmp`,
:class:`PreparesRead`, :class:`StorageClasses`, :class:`ReadsInto`, :class:`MapsObjects`). A
backend offers one by having its methods; callers check with ``isinstance(backend, Protects)``
once per operation (a runtime-checkable ``isinstance`` looks every member up: never per block or
per chunk). The conformance suite (``tests/conformance.py``) tests every capability a backend
offers against the contract written here.
"""

from __future__ import annotations

import mmap
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
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


# -- optional capabilities -------------------------------------------------------------------------


@runtime_checkable
class Protects(Protocol):
    """Immutability enforced by the storage itself, beyond blockferry's own refusal: the local
    filesystem's immutable attribute, S3 object lock (retention)."""

    async def protect(self, key: str, until: str) -> bool:
        """Make the storage refuse to change or delete the object until ``until`` (ISO 8601, UTC
        when it has no zone; a storage whose protection has no date keeps it until
        :meth:`unprotect`). True when the storage now enforces it; False when this storage cannot
        (no object lock on the bucket, a filesystem without the attribute, no privilege to set
        it). Idempotent, may be retried: protecting again keeps a later date already set. A
        missing key raises NotFoundError where the storage can protect objects (one that cannot
        may answer False without looking)."""
        ...

    async def unprotect(self, key: str) -> bool:
        """Lift the protection :meth:`protect` set, so the object can be deleted (nothing to do
        for an object without one). True when the object is now unprotected as far as the
        storage tells; False when this call cannot lift it: its protection ends only at its date
        (S3 retention: :class:`Retention` says until when), the storage has no protection to
        lift, or the key is missing. Idempotent: a second call answers as the first."""
        ...


@runtime_checkable
class Retention(Protocol):
    """The storage refuses deletes of an object until a date it keeps (S3 object lock).
    Deleting and garbage collection ask first instead of failing half-way."""

    async def locked_until(self, key: str) -> str | None:
        """The date (ISO 8601, with zone) until which the storage refuses to delete the object,
        if it lies in the future; else None (not locked, lock expired, or the key missing).
        Idempotent; one request per key."""
        ...


@runtime_checkable
class AbortsUploads(Protocol):
    """Uploads of writers that died stay in the storage, billed and unlisted (S3 multipart
    uploads), until aborted."""

    async def abort_incomplete_uploads(self, *, older_than: float | None = None) -> int:
        """Abort the uploads not committed under this repository, or only those started more than
        ``older_than`` seconds ago; returns how many. Called by the writer lock's holder (so no
        other writer has one open). Idempotent: a second call finds nothing left."""
        ...


@runtime_checkable
class CleansTmp(Protocol):
    """Temporary files of writers that died stay behind (the local backend's ``tmp/``)."""

    def clean_tmp(self, *, older_than: float = 3600.0) -> int:
        """Blocking (call it from a worker thread). Remove what dead writers left; returns how
        many. What a live writer of this host is writing stays, unless older than
        ``older_than`` seconds and not this process's own. Idempotent."""
        ...


@runtime_checkable
class PreparesRead(Protocol):
    """Objects may sit where they cannot be read at once (an archive storage class)."""

    async def prepare_read(self, keys: Sequence[str], progress: Callable[[str], None] | None = None) -> int:
        """Make ``keys`` readable before a restore or copy reads them: request every archived one
        back at once and wait until all can be read, telling ``progress`` (sentences for a
        person) while waiting. Returns how many had to be brought back (0 when none was
        archived). A missing key is not an error (there is nothing to bring back; the read that
        follows finds it missing). ArchivedError when waiting longer than the storage's limit
        (the requests stand: running again later finds them done). Idempotent."""
        ...


@runtime_checkable
class StorageClasses(Protocol):
    """Objects can move between storage classes (the archive tier, ``blockferry archive``)."""

    #: the class archiving moves packs to when none is named
    archive_class: str

    async def storage_class(self, key: str) -> str:
        """The object's storage class (``"STANDARD"`` by default). NotFoundError if missing."""
        ...

    async def set_storage_class(self, key: str, storage_class: str) -> bool:
        """Move the object to ``storage_class``, keeping its key and bytes. False if it is in that
        class already (idempotent: a retry answers False). NotFoundError if missing; ConfigError
        for a class the storage does not offer."""
        ...


@runtime_checkable
class ReadsInto(Protocol):
    """Large ranges can be read into a buffer the caller recycles (a remote backend: a new buffer
    is zeroed and faulted in on the event loop)."""

    async def get_into(self, key: str, offset: int, length: int, buffer: bytearray) -> bytes:
        """``length`` bytes at ``offset``, as :meth:`Backend.get` (a range past the end gives what
        exists; NotFoundError if missing). When ``buffer`` holds them the answer may be a view of
        it, valid until the caller reuses the buffer; otherwise a new bytes-like object.
        Idempotent."""
        ...


@runtime_checkable
class MapsObjects(Protocol):
    """Objects can be mapped into memory (a local directory): readers in worker threads decode
    in place, without a copy."""

    def map_sync(self, key: str, size: int) -> mmap.mmap:
        """Blocking (call it from a worker thread). A read-only mapping of the first ``size``
        bytes of a committed object; the caller closes it. NotFoundError if missing;
        CorruptionError if the object is shorter than ``size`` (so a mapping never reaches past
        the end of its file)."""
        ...


#: every optional capability a backend may declare (the conformance suite checks each one found)
BACKEND_CAPABILITIES: tuple[type, ...] = (Protects, Retention, AbortsUploads, CleansTmp, PreparesRead, StorageClasses,
                                          ReadsInto, MapsObjects)


@runtime_checkable
class BackendPlugin(Protocol):
    """Entry point ``blockferry.backends``, named by URL scheme."""

    scheme: str

    async def open(self, url: str, options: Mapping[str, Any]) -> Backend:
        """Open the storage at ``url`` (which need not hold a repository yet)."""
        ...
