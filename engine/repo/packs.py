"""Writing packs: a :class:`PackWriter` appends chunks to one pack at a time and seals it (trailer,
upload, commit) at the repository's pack size; :class:`WriterHandle` shares one writer between
the tasks of a remote repository."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
from blockferry.errors import (
    RepositoryError,
)
from blockferry.log import get_logger
from blockferry.repo.backend import Upload
from blockferry.repo.format import (
    PACK_HEADER,
    PACK_RECORD,
    new_id,
    pack_loc,
    pack_trailer,
)

if TYPE_CHECKING:
    from blockferry.repo.store import RepositoryStore

log = get_logger()


def pack_key(pack_id: str) -> str:
    return f"packs/{pack_id[:2]}/{pack_id}"


#: packs of one writer sealed at once in callers' task groups while adds go on (an add that
#: fills one more waits, holding the writer, for a slot): an S3 pack is held in memory until
#: its upload is done, so the packs in memory are the open one and at most these
MAX_SEALING = 2


Spawn = Callable[..., None]


class _Sealing:
    """A pack taken out of its writer to be finished (trailer, commit) or forgotten, while the
    writer takes new chunks into a fresh pack."""

    __slots__ = ("pack_no", "upload", "records", "digests", "done", "failed")

    def __init__(self, pack_no: int, upload: Upload, records: bytes, digests: list[bytes]) -> None:
        self.pack_no = pack_no
        self.upload = upload
        self.records = records
        self.digests = digests
        self.done = anyio.Event()
        self.failed = False


class PackWriter:
    """Appends chunks to one pack at a time and seals it at the repository's pack size.

    On a local repository each target mover owns one (its packs are written with ``O_DIRECT``
    as they fill). On a remote one (S3) the store has one writer that every task shares
    through a :class:`WriterHandle`: one pack fills at a time, so packs fill and go out while
    the tasks are still reading (per-task packs of an incremental only fill at the end) and
    only one pack is held in memory while filling. Sealing happens outside the lock, in the
    task whose chunks filled the pack: the others go on adding to the next pack meanwhile.
    The commit may seal a pack early (``seal(pack_no)``) when a restore point needs chunks
    that are still in it.
    """

    def __init__(self, store: RepositoryStore, spawn: Spawn | None = None) -> None:
        self._store = store
        #: where a pack that an add filled is sealed while the adder goes on (a task group's
        #: ``start_soon``, owned by the caller); None: the add seals it before returning
        self.spawn = spawn
        self.lock = anyio.Lock()
        self._upload: Upload | None = None
        self._pack_no = -1
        self._offset = 0
        self._records = bytearray()
        self._digests: list[bytes] = []
        self._sealing: dict[int, _Sealing] = {}
        self._slots = anyio.Semaphore(MAX_SEALING)  #: seals running in callers' task groups
        self.written = 0  #: bytes written to the backend, framing included
        self.busy = 0.0  #: seconds spent writing
        self.packs: set[int] = set()  #: packs written into (what close must see sealed)
        self.users = 0  #: handles sharing this writer that have not finished

    def __repr__(self) -> str:
        return f"<PackWriter pack={self._pack_no} bytes={self._offset} sealing={len(self._sealing)}>"

    async def add(self, chunks: list[tuple[bytes, bytes, int, int]], *, dedup: bool = True,
                  account: PackWriter | WriterHandle | None = None) -> list[bytes]:
        """Store ``(digest, payload, raw_len, flags)`` chunks the repository lacks (all of them
        without ``dedup``: garbage collection moving chunks); returns the digests that turned out
        to be stored already (and were skipped). Bytes written and time spent go to
        ``account`` (a handle's own figures)."""
        acct = account if account is not None else self
        index = self._store.index
        sealing: _Sealing | None = None
        async with self.lock:
            fresh: list[tuple[bytes, bytes, int, int]] = []
            skipped: list[bytes] = []
            seen: set[bytes] = set()
            for c in chunks:
                if c[0] in seen or (dedup and index.lookup(c[0]) is not None):
                    skipped.append(c[0])
                else:
                    seen.add(c[0])
                    fresh.append(c)
            if fresh:
                t0 = anyio.current_time()
                try:
                    if self._upload is None:
                        acct.written += await self._open()
                    parts = [c[1] for c in fresh]
                    assert self._upload is not None
                    await self._upload.write(parts)
                except BaseException:
                    await self._abort()
                    raise
                acct.busy += anyio.current_time() - t0
                acct.packs.add(self._pack_no)
                off = self._offset
                for digest, payload, raw_len, flags in fresh:
                    n = len(payload)
                    index.pending[digest] = pack_loc(self._pack_no, off, n, raw_len, flags)
                    self._records += PACK_RECORD.pack(digest, off, n, raw_len, flags)
                    self._digests.append(digest)
                    off += n
                acct.written += off - self._offset
                self._offset = off
            index.resolve(c[0] for c in chunks)
            if self._upload is not None and self._offset >= self._store.config.pack_size:
                if acct.spawn is not None:
                    # under the lock: with every slot taken, all adders wait (the memory bound)
                    await self._slots.acquire()
                sealing = self._detach()
        if sealing is not None:
            if acct.spawn is None:
                await self._finish(sealing, acct)
            else:
                acct.spawn(self._finish_in_slot, sealing, acct)  # the caller goes on filling the next pack
        return skipped

    async def _open(self) -> int:
        pack_id = new_id()
        self._upload = await self._store.backend.open_upload(pack_key(pack_id))
        self._pack_no = self._store.index.pack_no(pack_id)
        await self._upload.write([PACK_HEADER])
        self._offset = len(PACK_HEADER)
        self._store._open_packs[self._pack_no] = self
        return self._offset

    def _detach(self) -> _Sealing | None:
        """Take the open pack out to be sealed (under the lock)."""
        if self._upload is None:
            return None
        s = _Sealing(self._pack_no, self._upload, bytes(self._records), self._digests)
        self._sealing[s.pack_no] = s
        self._upload = None
        self._records = bytearray()
        self._digests = []
        self._offset = 0
        return s

    async def _finish(self, s: _Sealing, acct: PackWriter | WriterHandle) -> None:
        """Write a detached pack's trailer and commit it; on failure its chunks are forgotten
        (so nothing will reference them) and the error raised."""
        t0 = anyio.current_time()
        trailer = pack_trailer(s.records)
        try:
            await s.upload.write([trailer])
            await s.upload.commit()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._forget(s)
            raise
        self._store._pack_sealed(s.pack_no, s.records)
        self._sealing.pop(s.pack_no, None)
        s.done.set()
        acct.written += len(trailer)
        acct.busy += anyio.current_time() - t0

    async def _finish_in_slot(self, s: _Sealing, acct: PackWriter | WriterHandle) -> None:
        try:
            await self._finish(s, acct)
        finally:
            self._slots.release()

    async def _forget(self, s: _Sealing) -> None:
        """A detached pack that will not be sealed: abort its upload and forget its chunks (so
        nothing will reference them); whoever waits for it sees it failed."""
        s.failed = True
        try:
            await s.upload.abort()
        finally:
            for d in s.digests:
                self._store.index.pending.pop(d, None)
            self._store._open_packs.pop(s.pack_no, None)
            self._sealing.pop(s.pack_no, None)
            s.done.set()

    async def _abort(self) -> None:
        """The open pack cannot be finished: forget its chunks so nothing will reference them."""
        s = self._detach()
        if s is not None:
            with anyio.CancelScope(shield=True):
                await self._forget(s)

    async def seal(self, pack_no: int | None = None) -> None:
        """Seal the open pack and wait for packs being sealed (only pack ``pack_no``, when
        given). A pack that failed to seal has had its chunks forgotten: callers check."""
        await self._seal_packs(None if pack_no is None else {pack_no}, self)

    async def _seal_packs(self, packs: set[int] | None, acct: PackWriter | WriterHandle) -> list[int]:
        """Seal ``packs`` (all if None) that are still open or being sealed; returns those that
        failed to seal."""
        async with self.lock:
            mine = self._upload is not None and (packs is None or self._pack_no in packs)
            s = self._detach() if mine else None
            waiting = [w for no, w in self._sealing.items() if w is not s and (packs is None or no in packs)]
        if s is not None:
            await self._finish(s, acct)
        for w in waiting:
            await w.done.wait()
        return [w.pack_no for w in waiting if w.failed]

    async def close(self) -> None:
        """Seal what was written. Call once the owner is done."""
        await self.seal()

    async def finish(self) -> None:
        """A target mover is done with its own writer: seal (as :meth:`close`)."""
        await self.close()

    async def discard(self) -> None:
        """Abort the open pack (its chunks become unknown again)."""
        async with self.lock:
            await self._abort()


class WriterHandle:
    """A task's share of a store's shared :class:`PackWriter` (remote repositories): adds go to
    the shared pack; the figures are this task's own; :meth:`close` returns once every pack
    this task wrote into is sealed (or raises if one could not be)."""

    def __init__(self, writer: PackWriter, spawn: Spawn | None = None) -> None:
        self._w = writer
        self.spawn = spawn  #: as PackWriter.spawn, for the packs this task's adds fill
        self.written = 0
        self.busy = 0.0
        self.packs: set[int] = set()
        self._active = True
        writer.users += 1

    def __repr__(self) -> str:
        return f"<WriterHandle of {self._w!r} packs={len(self.packs)}>"

    async def add(self, chunks: list[tuple[bytes, bytes, int, int]], *, dedup: bool = True) -> list[bytes]:
        return await self._w.add(chunks, dedup=dedup, account=self)

    def _leave(self) -> bool:
        """Stop counting as a user; whether this was the last one."""
        if self._active:
            self._active = False
            self._w.users -= 1
        return self._w.users == 0

    async def close(self) -> None:
        """Return once this handle's chunks are all in sealed packs (garbage collection and
        copies rely on that before they go on); the last user seals whatever is open."""
        last = self._leave()
        failed = await self._w._seal_packs(None if last else set(self.packs), self)
        self.packs.clear()
        if failed:
            raise RepositoryError(f"{len(failed)} pack(s) holding this task's chunks could not be written "
                                  "(another task's upload failed)")

    async def finish(self) -> None:
        """A target mover is done: the last one seals the shared pack; earlier ones leave their
        chunks in it for the others to fill (the point's commit seals whatever it still needs,
        :meth:`RepositoryStore._make_durable`)."""
        if self._leave():
            await self.close()
