"""The chunk index: where every chunk is (committed, pending, or claimed by a task compressing it),
loaded from the repository's index files and consulted by the data path's dedup check."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import anyio
import msgspec
from blockferry.log import get_logger
from blockferry.repo.format import (
    INDEX_RECORD,
    pack_loc,
)

log = get_logger()


#: merge index files into one when a repository has more than this many
INDEX_COMPACT_AT = 64


class Claim:
    """A task's promise to store a chunk it is compressing (identity matters, not content)."""

    __slots__ = ("owner",)

    def __init__(self, owner: object) -> None:
        self.owner = owner


KNOWN, MINE, FOREIGN = 0, 1, 2


class ChunkIndex:
    """Where every chunk is. Read from worker threads (dict reads and ``setdefault`` are atomic
    under the GIL); written only from the event loop."""

    def __init__(self) -> None:
        self.packs: list[str] = []
        self._pack_nos: dict[str, int] = {}
        self.committed: dict[bytes, int] = {}
        self.pending: dict[bytes, int] = {}
        self.claims: dict[bytes, Claim] = {}
        #: copies a health check found damaged (never deduplicated against; read only as a last
        #: resort, and kept only if they decode to their id: a transient read error may have
        #: marked a good copy)
        self.masked: dict[bytes, int] = {}
        self._changed: anyio.Event | None = None
        #: chunks compressed ahead for the next backup (a blocks.PreparedChunks), if any
        self.prepared: Any = None

    def __len__(self) -> int:
        return len(self.committed) + len(self.pending)

    def pack_no(self, pack_id: str) -> int:
        no = self._pack_nos.get(pack_id)
        if no is None:
            no = self._pack_nos[pack_id] = len(self.packs)
            self.packs.append(pack_id)
        return no

    def lookup(self, digest: bytes) -> int | None:
        loc = self.committed.get(digest)
        return loc if loc is not None else self.pending.get(digest)

    def classify(self, digest: bytes, owner: object) -> int:
        """KNOWN (stored or being stored), MINE (the caller must store it) or FOREIGN (another
        claim will store it). Thread-safe."""
        if digest in self.committed or digest in self.pending:
            return KNOWN
        claim = Claim(owner)
        return MINE if self.claims.setdefault(digest, claim) is claim else FOREIGN

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def resolve(self, digests: Iterable[bytes]) -> None:
        """The chunks are written (or known): their claims end."""
        for d in digests:
            self.claims.pop(d, None)
        self._notify()

    def release(self, digests: Iterable[bytes]) -> None:
        """A task ended: drop its claims that were never written (waiters then see them lost)."""
        changed = False
        for d in digests:
            if self.claims.pop(d, None) is not None:
                changed = True
        if changed:
            self._notify()

    async def wait_stored(self, digests: Iterable[bytes]) -> list[bytes]:
        """Wait until none of ``digests`` is claimed; return those that ended up not stored."""
        todo = set(digests)
        while True:
            todo = {d for d in todo if self.lookup(d) is None}
            waiting = [d for d in todo if d in self.claims]
            if not waiting:
                return sorted(todo)
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()

    def load_index_file(self, f: Any, damaged: set[tuple[bytes, str]] | None = None) -> int:
        """Add an index file's entries, except the ``damaged`` copies (chunk, pack): a bad copy
        must never replace a good one of the same chunk."""
        nos = [self.pack_no(p) for p in f.packs]
        n = 0
        committed = self.committed
        for digest, pno, off, length, raw_len, flags in INDEX_RECORD.iter_unpack(f.records):
            loc = pack_loc(nos[pno], off, length, raw_len, flags)
            if damaged and (digest, f.packs[pno]) in damaged:
                self.masked[digest] = loc
                continue
            committed[digest] = loc
            n += 1
        return n


class IndexEntry(msgspec.Struct, array_like=True, gc=False):
    """Where a chunk is in a pack, as an index file says."""

    digest: bytes
    offset: int
    length: int
    raw_len: int
    flags: int
