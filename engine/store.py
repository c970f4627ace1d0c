"""The repository format over a backend: the chunk index, pack writing, commits, manifests, lock.

:class:`RepositoryStore` is what the Repository actor, restore and verify share. Its rules:

* A chunk is *committed* once an index file lists it; *pending* once its bytes are in a pack this
  process is writing or has sealed; *claimed* while a task is compressing it. Deduplication sees
  all three, so a block seen by four tasks at once is compressed and stored once.
* A restore point is committed in the order packs → index → manifest, each published atomically
  by the backend. A crash at any moment leaves only unreferenced packs behind.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from typing import Any

import anyio
import msgspec

from .backend import Backend, KeyExistsError, Upload
from .log import get_logger
from .errors import (
    AmbiguousError,
    ChunkLostError,
    NotARepositoryError,
    NotFoundError,
    RepositoryError,
    RepositoryLockedError,
)
from .format import (
    DIGEST_SIZE,
    FORMAT_VERSION,
    HOLE,
    INDEX_RECORD,
    PACK_HEADER,
    PACK_RECORD,
    DiskRecord,
    Manifest,
    RepositoryConfig,
    check_block_size,
    check_compression,
    decode_config,
    decode_index,
    decode_manifest,
    decode_manifest_as,
    encode_config,
    encode_index,
    encode_manifest,
    new_id,
    pack_loc,
    pack_trailer,
    unpack_loc,
    utc_now,
)

log = get_logger()

CONFIG_KEY = "config"
LOCK_KEY = "locks/writer"
#: merge index files into one when a repository has more than this many
INDEX_COMPACT_AT = 64


def pack_key(pack_id: str) -> str:
    return f"packs/{pack_id[:2]}/{pack_id}"


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
        self._changed: anyio.Event | None = None

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

    def load_index_file(self, f: Any) -> int:
        nos = [self.pack_no(p) for p in f.packs]
        n = 0
        committed = self.committed
        for digest, pno, off, length, raw_len, flags in INDEX_RECORD.iter_unpack(f.records):
            committed[digest] = pack_loc(nos[pno], off, length, raw_len, flags)
            n += 1
        return n


class LockInfo(msgspec.Struct, kw_only=True):
    host: str
    pid: int
    pid_start: str
    created: str
    purpose: str


def _process_start(pid: int) -> str:
    """Start time of a process (tells a live lock holder from a reused pid); '' if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()
    except (OSError, IndexError):
        return ""


def _holder_alive(info: LockInfo) -> bool:
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not info.pid_start or _process_start(info.pid) in ("", info.pid_start)


class PackWriter:
    """Appends chunks to one pack at a time and seals it at the repository's pack size.

    Owned by one target mover while it runs; the commit may seal its pack early (under
    ``lock``) when a restore point needs chunks that are still in it.
    """

    def __init__(self, store: RepositoryStore) -> None:
        self._store = store
        self.lock = anyio.Lock()
        self._upload: Upload | None = None
        self._pack_no = -1
        self._offset = 0
        self._records = bytearray()
        self._digests: list[bytes] = []
        self.written = 0  #: bytes written to the backend, framing included
        self.busy = 0.0  #: seconds spent writing

    def __repr__(self) -> str:
        return f"<PackWriter pack={self._pack_no} bytes={self._offset}>"

    async def add(self, chunks: list[tuple[bytes, bytes, int, int]]) -> list[bytes]:
        """Store ``(digest, payload, raw_len, flags)`` chunks the repository lacks; returns the
        digests that turned out to be stored already (and were skipped)."""
        index = self._store.index
        async with self.lock:
            fresh: list[tuple[bytes, bytes, int, int]] = []
            skipped: list[bytes] = []
            seen: set[bytes] = set()
            for c in chunks:
                if c[0] in seen or index.lookup(c[0]) is not None:
                    skipped.append(c[0])
                else:
                    seen.add(c[0])
                    fresh.append(c)
            if fresh:
                t0 = anyio.current_time()
                try:
                    if self._upload is None:
                        await self._open()
                    parts = [c[1] for c in fresh]
                    assert self._upload is not None
                    await self._upload.write(parts)
                except BaseException:
                    await self._abort()
                    raise
                self.busy += anyio.current_time() - t0
                off = self._offset
                for digest, payload, raw_len, flags in fresh:
                    n = len(payload)
                    index.pending[digest] = pack_loc(self._pack_no, off, n, raw_len, flags)
                    self._records += PACK_RECORD.pack(digest, off, n, raw_len, flags)
                    self._digests.append(digest)
                    off += n
                self.written += off - self._offset
                self._offset = off
            index.resolve(c[0] for c in chunks)
            if self._offset >= self._store.config.pack_size:
                await self._seal()
            return skipped

    async def _open(self) -> None:
        pack_id = new_id()
        self._upload = await self._store.backend.open_upload(pack_key(pack_id))
        self._pack_no = self._store.index.pack_no(pack_id)
        await self._upload.write([PACK_HEADER])
        self._offset = len(PACK_HEADER)
        self.written += self._offset
        self._store._open_packs[self._pack_no] = self

    async def _seal(self) -> None:
        if self._upload is None:
            return
        t0 = anyio.current_time()
        trailer = pack_trailer(bytes(self._records))
        try:
            await self._upload.write([trailer])
            await self._upload.commit()
        except BaseException:
            await self._abort()
            raise
        self.written += len(trailer)
        self.busy += anyio.current_time() - t0
        self._store._pack_sealed(self._pack_no, bytes(self._records))
        self._upload = None
        self._records = bytearray()
        self._digests = []
        self._offset = 0

    async def _abort(self) -> None:
        """The pack cannot be finished: forget its chunks so nothing will reference them."""
        upload, self._upload = self._upload, None
        if upload is not None:
            with anyio.CancelScope(shield=True):
                await upload.abort()
        for d in self._digests:
            self._store.index.pending.pop(d, None)
        self._store._open_packs.pop(self._pack_no, None)
        self._records = bytearray()
        self._digests = []
        self._offset = 0

    async def seal(self, pack_no: int | None = None) -> None:
        """Seal the open pack (only if it is ``pack_no``, when given)."""
        async with self.lock:
            if self._upload is not None and (pack_no is None or pack_no == self._pack_no):
                await self._seal()

    async def close(self) -> None:
        """Seal what was written. Call once the owner is done."""
        await self.seal()

    async def discard(self) -> None:
        """Abort the open pack (its chunks become unknown again)."""
        async with self.lock:
            await self._abort()


class PointSummary(msgspec.Struct, kw_only=True):
    """A manifest without its block maps: enough to list points."""

    class Disk(msgspec.Struct, kw_only=True):
        name: str
        size: int
        source: str
        base: str | None = None
        hinted: bool = False

    version: int = FORMAT_VERSION
    id: str
    object: str
    created: str
    block_size: int
    job: str | None = None
    disks: list[Disk]


class RepositoryStore:
    """An open repository. Create with :meth:`open` (or :meth:`init` then :meth:`open`)."""

    def __init__(self, backend: Backend, config: RepositoryConfig) -> None:
        self.backend = backend
        self.config = config
        self.index = ChunkIndex()
        self._open_packs: dict[int, PackWriter] = {}
        self._unindexed: list[tuple[int, bytes]] = []
        self._index_files: list[str] = []
        self._index_loaded = False
        self._commit_lock = anyio.Lock()
        self._lock_info: LockInfo | None = None
        self._summaries: dict[str, PointSummary] = {}
        self._manifests: dict[str, Manifest] = {}  # the few most recently used, decoded
        self.log = log.bind(repository=backend.url)

    def __repr__(self) -> str:
        return f"<RepositoryStore {self.backend.url} chunks={len(self.index)} open_packs={len(self._open_packs)}>"

    # -- opening -------------------------------------------------------------------------------

    @staticmethod
    async def init(backend: Backend, *, block_size: int, compression: str) -> RepositoryConfig:
        """Write a new repository's config; NotARepositoryError-free: refuses an existing one."""
        check_block_size(block_size)
        check_compression(compression)
        cfg = RepositoryConfig(id=new_id(), created=utc_now(), block_size=block_size, compression=compression)
        try:
            await backend.put(CONFIG_KEY, encode_config(cfg), exclusive=True)
        except KeyExistsError:
            raise RepositoryError(f"{backend.url} already holds a repository") from None
        return cfg

    @classmethod
    async def open(cls, backend: Backend) -> RepositoryStore:
        try:
            data = await backend.get(CONFIG_KEY)
        except NotFoundError:
            raise NotARepositoryError(f"{backend.url} is not a blockferry repository (no config)") from None
        return cls(backend, decode_config(data, backend.url))

    async def load_index(self) -> None:
        """Read every index file (once)."""
        if self._index_loaded:
            return
        keys = [o.key async for o in self.backend.list("index/")]
        for key in sorted(keys):
            f = decode_index(await self.backend.get(key), key)
            self.index.load_index_file(f)
            self._index_files.append(key)
        self._index_loaded = True

    # -- writer lock ---------------------------------------------------------------------------

    async def lock(self, purpose: str) -> None:
        """Take the writer lock; RepositoryLockedError if a live process holds it. A lock left by
        a dead process of this host is removed."""
        if self._lock_info is not None:
            return
        info = LockInfo(
            host=socket.gethostname(), pid=os.getpid(), pid_start=_process_start(os.getpid()),
            created=utc_now(), purpose=purpose,
        )
        data = msgspec.json.encode(info)
        for _ in range(2):
            try:
                await self.backend.put(LOCK_KEY, data, exclusive=True)
                self._lock_info = info
                if hasattr(self.backend, "clean_tmp"):
                    await anyio.to_thread.run_sync(self.backend.clean_tmp)
                return
            except KeyExistsError:
                holder = await self.read_lock()
                if holder is not None and (holder.host != info.host or _holder_alive(holder)):
                    raise RepositoryLockedError(
                        f"{self.backend.url} is locked by pid {holder.pid} on {holder.host} since "
                        f"{holder.created} ({holder.purpose}); if that process is gone, run "
                        f"'blockferry unlock {self.backend.url}'"
                    ) from None
                self.log.warning("stale_lock_removed", holder=msgspec.to_builtins(holder) if holder else None)
                await self.backend.delete(LOCK_KEY)
        raise RepositoryLockedError(f"{self.backend.url}: could not take the writer lock")

    async def read_lock(self) -> LockInfo | None:
        try:
            return msgspec.json.decode(await self.backend.get(LOCK_KEY), type=LockInfo)
        except NotFoundError:
            return None
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None  # a damaged lock file protects nothing; treat as stale

    async def unlock(self) -> None:
        if self._lock_info is None:
            return
        holder = await self.read_lock()
        if holder is not None and holder.pid == self._lock_info.pid and holder.created == self._lock_info.created:
            await self.backend.delete(LOCK_KEY)
        self._lock_info = None

    @property
    def locked(self) -> bool:
        return self._lock_info is not None

    # -- writing -------------------------------------------------------------------------------

    def writer(self) -> PackWriter:
        return PackWriter(self)

    def _pack_sealed(self, pack_no: int, records: bytes) -> None:
        self._open_packs.pop(pack_no, None)
        self._unindexed.append((pack_no, records))

    async def commit(self, manifest: Manifest) -> None:
        """Publish a restore point: make every chunk it references durable, write the index for
        everything sealed since the last commit, then the manifest. ChunkLostError if a chunk it
        references is not stored (its writer failed)."""
        async with self._commit_lock:
            await self._make_durable(manifest)
            await self._write_index()
            await self.backend.put(f"points/{manifest.id}", encode_manifest(manifest), exclusive=True)
            self._summaries[manifest.id] = summary_of(manifest)
            if len(self._index_files) > INDEX_COMPACT_AT:
                await self._compact_index()

    async def _make_durable(self, manifest: Manifest) -> None:
        index = self.index
        referenced: set[bytes] = set()
        for disk in manifest.disks:
            b = disk.blocks
            referenced.update(b[i:i + DIGEST_SIZE] for i in range(0, len(b), DIGEST_SIZE))
        referenced.discard(HOLE)
        for _ in range(3):
            missing = [d for d in referenced if d not in index.committed and d not in index.pending]
            if missing:
                raise ChunkLostError(
                    f"point {manifest.id} of {manifest.object}: {len(missing)} chunk(s) it needs were not stored "
                    f"(first {missing[0].hex()[:16]})"
                )
            open_packs = {index.pending[d] >> 84 for d in referenced if d in index.pending} & set(self._open_packs)
            if not open_packs:
                return
            for pno in open_packs:
                writer = self._open_packs.get(pno)
                if writer is not None:
                    await writer.seal(pno)
        raise RepositoryError(f"point {manifest.id}: its packs kept changing while committing")

    async def _write_index(self) -> None:
        if not self._unindexed:
            return
        batch, self._unindexed = self._unindexed, []
        packs: list[str] = []
        records = bytearray()
        for local_no, (pno, recs) in enumerate(batch):
            packs.append(self.index.packs[pno])
            for digest, off, n, raw_len, flags in PACK_RECORD.iter_unpack(recs):
                records += INDEX_RECORD.pack(digest, local_no, off, n, raw_len, flags)
        key = f"index/{new_id()}"
        try:
            await self.backend.put(key, encode_index(packs, bytes(records)))
        except BaseException:
            self._unindexed = batch + self._unindexed
            raise
        self._index_files.append(key)
        pending, committed = self.index.pending, self.index.committed
        for pno, recs in batch:
            for digest, *_ in PACK_RECORD.iter_unpack(recs):
                loc = pending.get(digest)
                if loc is not None:
                    committed[digest] = loc
                    del pending[digest]

    async def _compact_index(self) -> None:
        """Replace all index files by one. Crash-safe: the merged file is written first, so a
        crash leaves duplicates (harmless), never a gap."""
        old = list(self._index_files)
        packs = list(self.index.packs)
        records = bytearray()
        for digest, loc in self.index.committed.items():
            pno, off, n, raw_len, flags = unpack_loc(loc)
            records += INDEX_RECORD.pack(digest, pno, off, n, raw_len, flags)
        key = f"index/{new_id()}"
        await self.backend.put(key, encode_index(packs, bytes(records)))
        for k in old:
            await self.backend.delete(k)
        self._index_files = [key]

    # -- reading -------------------------------------------------------------------------------

    async def point_ids(self) -> list[str]:
        return [o.key.removeprefix("points/") async for o in self.backend.list("points/")]

    async def _manifest_bytes(self, point_id: str) -> bytes:
        try:
            return await self.backend.get(f"points/{point_id}")
        except NotFoundError:
            raise NotFoundError(f"no restore point {point_id} in {self.backend.url}") from None

    async def manifest(self, point_id: str) -> Manifest:
        """A restore point's manifest (decoded once; the last few are kept)."""
        m = self._manifests.get(point_id)
        if m is None:
            m = decode_manifest(await self._manifest_bytes(point_id), f"restore point {point_id}")
            if len(self._manifests) >= 4:
                self._manifests.pop(next(iter(self._manifests)))
            self._manifests[point_id] = m
        return m

    async def summaries(self) -> list[PointSummary]:
        """Every restore point, oldest first. Damaged manifests raise CorruptionError."""
        ids = await self.point_ids()
        out = []
        for pid in ids:
            s = self._summaries.get(pid)
            if s is None:
                s = self._summaries[pid] = decode_manifest_as(
                    await self._manifest_bytes(pid), f"restore point {pid}", PointSummary)
            out.append(s)
        out.sort(key=lambda s: (s.created, s.id))
        return out

    async def resolve_point(self, ref: str, *, object_name: str | None = None) -> str:
        """A full point id from an id, a unique prefix (4+ characters) or ``latest``."""
        ids = await self.point_ids()
        if ref == "latest":
            summaries = [s for s in await self.summaries() if object_name is None or s.object == object_name]
            if not summaries:
                raise NotFoundError(f"{self.backend.url} has no restore points" + (f" of {object_name}" if object_name else ""))
            return summaries[-1].id
        if ref in ids:
            return ref
        if len(ref) < 4:
            raise NotFoundError(f"no restore point {ref!r} (give at least 4 characters of its id, or 'latest')")
        matches = [i for i in ids if i.startswith(ref)]
        if not matches:
            raise NotFoundError(f"no restore point {ref!r} in {self.backend.url}")
        if len(matches) > 1:
            raise AmbiguousError(f"{ref!r} matches {len(matches)} points: {', '.join(sorted(matches)[:5])}")
        return matches[0]

    async def latest_disk(self, object_name: str, disk_name: str) -> tuple[str, DiskRecord] | None:
        """The newest point of ``object_name`` that has ``disk_name``, with that disk's record."""
        for s in reversed(await self.summaries()):
            if s.object == object_name and any(d.name == disk_name for d in s.disks):
                m = await self.manifest(s.id)
                return m.id, m.disk(disk_name)
        return None

    def locate(self, digest: bytes) -> tuple[str, int, int, int, int] | None:
        """(pack key, offset, stored length, raw length, flags) of a chunk, or None."""
        loc = self.index.lookup(digest)
        if loc is None:
            return None
        pno, off, n, raw_len, flags = unpack_loc(loc)
        return pack_key(self.index.packs[pno]), off, n, raw_len, flags

    async def close(self) -> None:
        """Seal open packs (their chunks stay unindexed garbage unless a commit follows) and
        release the lock."""
        for writer in list(self._open_packs.values()):
            try:
                await writer.close()
            except Exception as exc:  # closing must not hide the error that got us here
                self.log.warning("pack_seal_failed", error=repr(exc))
        await self.unlock()



def summary_of(m: Manifest) -> PointSummary:
    return PointSummary(
        id=m.id, object=m.object, created=m.created, block_size=m.block_size, job=m.job,
        disks=[PointSummary.Disk(name=d.name, size=d.size, source=d.source, base=d.base, hinted=d.hinted) for d in m.disks],
    )
