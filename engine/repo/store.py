"""The repository format over a backend: the chunk index, pack writing, commits, manifests, lock.

:class:`RepositoryStore` is what the Repository actor, restore and verify share. Its rules:

* A chunk is *committed* once an index file lists it; *pending* once its bytes are in a pack this
  process is writing or has sealed; *claimed* while a task is compressing it. Deduplication sees
  all three, so a block seen by four tasks at once is compressed and stored once.
* A restore point is committed in the order packs → index → manifest, each published atomically
  by the backend. A crash at any moment leaves only unreferenced packs behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import AsyncIterator, Iterable
from typing import Any

import anyio
import msgspec
from blockferry.errors import (
    AmbiguousError,
    ChunkLostError,
    ConfigError,
    CorruptionError,
    ImmutableError,
    NotARepositoryError,
    NotFoundError,
    RepositoryError,
    RepositoryLockedError,
    UnsupportedFormatError,
    plain_errors,
)
from blockferry.log import get_logger
from blockferry.processes import process_start
from blockferry.repo.backend import (
    AbortsUploads,
    Backend,
    CleansTmp,
    KeyExistsError,
    ObjectInfo,
    PreparesRead,
    Protects,
    Retention,
)
from blockferry.repo.format import (
    DEFAULT_PACK_SIZE,
    DIGEST_SIZE,
    FORMAT_VERSION,
    HOLE,
    INDEX_RECORD,
    MIN_BLOCK_SIZE,
    PACK_RECORD,
    DiskRecord,
    Manifest,
    RepositoryConfig,
    TaskStats,
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
    unpack_loc,
    utc_now,
)
from blockferry.repo.health import Health
from blockferry.repo.index import INDEX_COMPACT_AT, ChunkIndex, IndexEntry
from blockferry.repo.locks import LockInfo, holder_alive
from blockferry.repo.packs import PackWriter, Spawn, WriterHandle, pack_key
from blockferry.repo.packscan import read_trailer
from blockferry.repo.retention import parse_time

log = get_logger()

CONFIG_KEY = "config"
LOCK_KEY = "locks/writer"
GC_LOCK_KEY = "locks/gc"
#: a reader's session marker: locks/read-<id> (restores, verify, copies read without the writer
#: lock; garbage collection waits for those that started before its plan)
READ_LOCK_PREFIX = "locks/read-"
GC_PLAN_KEY = "gc/plan"
#: seconds a writer reuses its listing of points (see RepositoryStore.point_ids)
POINT_LISTING_REUSE = 1.0
HEALTH_KEY = "health/damaged"
#: what a point's manifest is named (its id: 16 hex digits); other names in points/ are strays
POINT_ID = re.compile(r"[0-9a-f]{16}")
#: what packs and index files are named; other files under packs/ and index/ are strays
PACK_KEY = re.compile(r"packs/([0-9a-f]{2})/(\1[0-9a-f]{30})")
INDEX_KEY = re.compile(r"index/[0-9a-f]{32}")


class GcPlan(msgspec.Struct, kw_only=True):
    """What a garbage collection decided to remove. Backups that start while a plan exists never
    deduplicate against its condemned chunks; the plan is swept once every session that started
    before it has ended (see engine/repo/gc.py)."""

    version: int = 1
    id: str
    created: str
    condemned: bytes  #: ids (32 bytes each) of chunks no point referenced when the plan was made
    delete_packs: list[str]  #: packs holding only condemned chunks
    rewrite_packs: list[str]  #: packs mostly condemned: their live chunks move to new packs
    freed_bytes: int = 0
    sweeping: str | None = None  #: set while a sweep deletes: readers that start wait for it


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
    immutable_until: str | None = None
    stats: TaskStats = msgspec.field(default_factory=TaskStats)
    #: a health check found a chunk it uses with no good copy (not part of the manifest)
    damaged: bool = False
    #: the manifest itself cannot be read (why): only ``id`` is known (not part of the manifest)
    error: str | None = None


class RepositoryStore:
    """An open repository. Create with :meth:`open` (or :meth:`init` then :meth:`open`)."""

    def __init__(self, backend: Backend, config: RepositoryConfig) -> None:
        self.backend = backend
        self.config = config
        self.index = ChunkIndex()
        self._open_packs: dict[int, PackWriter] = {}
        self._shared_writer: PackWriter | None = None
        self._unindexed: list[tuple[int, bytes]] = []
        self._index_files: list[str] = []
        self.index_loaded = False
        self._commit_lock = anyio.Lock()
        self._summaries: dict[str, PointSummary] = {}
        self._point_ids: tuple[float, list[str]] | None = None  # (when listed, ids): see point_ids
        self._manifests: dict[str, Manifest] = {}  # the few most recently used, decoded
        self._strays: set[str] = set()  # names in points/ that are not points (warned about once)
        self._writer: LockInfo | None = None  # the writer lock, while this store holds it
        #: chunks a garbage-collection plan condemned (never deduplicated against)
        self.condemned: set[bytes] = set()
        #: (chunk, pack) copies a health check found damaged (never deduplicated; read only as
        #: a last resort, see ChunkIndex.masked)
        self.damaged: set[tuple[bytes, str]] = set()
        #: index files that would not decode (key → why): their packs are read from their own
        #: records instead, until ``repair`` rebuilds the index
        self.damaged_index: dict[str, str] = {}
        self._indexed_packs: set[str] = set()  # packs the good index files list
        self._packs_scanned = False  # the others' records were read (see find_unindexed)
        #: the health record would not decode (why), or None: it is ignored until verify or
        #: repair writes a new one
        self.health_damaged: str | None = None
        #: the garbage-collection plan would not decode (why), or None (see load_gc_plan)
        self.gc_plan_damaged: str | None = None
        self.log = log.bind(repository=backend.url)

    def __repr__(self) -> str:
        return f"<RepositoryStore {self.backend.url} chunks={len(self.index)} open_packs={len(self._open_packs)}>"

    # -- opening -------------------------------------------------------------------------------

    @staticmethod
    async def init(backend: Backend, *, block_size: int, compression: str,
                   immutable_days: int | None = None, pack_size: int = DEFAULT_PACK_SIZE) -> RepositoryConfig:
        """Write a new repository's config; refuses a location that holds one."""
        check_block_size(block_size)
        check_compression(compression)
        if immutable_days is not None and immutable_days < 1:
            raise ConfigError(f"immutable days must be 1 or more, not {immutable_days}")
        if not MIN_BLOCK_SIZE <= pack_size <= 1 << 30:
            raise ConfigError(f"pack size {pack_size} is out of range (256 KiB to 1 GiB)")
        cfg = RepositoryConfig(id=new_id(), created=utc_now(), block_size=block_size, compression=compression,
                               immutable_days=immutable_days, pack_size=pack_size)
        try:
            await backend.put(CONFIG_KEY, encode_config(cfg), exclusive=True)
        except KeyExistsError:
            raise ConfigError(f"{backend.url} already holds a repository") from None
        return cfg

    @classmethod
    async def open(cls, backend: Backend) -> RepositoryStore:
        try:
            data = await backend.get(CONFIG_KEY)
        except NotFoundError:
            raise NotARepositoryError(f"{backend.url} is not a blockferry repository (no config)") from None
        return cls(backend, decode_config(data, backend.url))

    async def load_index(self, *, reload: bool = False) -> None:
        """Read every index file (once, or again with ``reload``), leaving out the copies a
        health check found damaged and the chunks a garbage-collection plan condemned."""
        if self.index_loaded and not reload:
            return
        if reload:
            self.index.committed.clear()
            self.index.masked.clear()
            self._index_files.clear()
        keys: list[str] = []

        async def list_index() -> None:
            keys.extend(await self.index_keys())

        with plain_errors():
            async with anyio.create_task_group() as tg:  # two round trips at once
                tg.start_soon(self.load_health)
                tg.start_soon(list_index)
        self.damaged_index = {}
        indexed: set[str] = set()
        for key in sorted(keys):
            try:
                f = decode_index(await self.backend.get(key), key)
            except UnsupportedFormatError:
                raise
            except CorruptionError as exc:
                # the others still hold; the packs it listed describe themselves
                self.damaged_index[key] = str(exc)
                self.log.warning("index_file_damaged", key=key, error=str(exc),
                                 help="chunks are found from the packs' own records meanwhile; "
                                      f"'blockferry repair {self.backend.url}' rebuilds the index")
                continue
            self.index.load_index_file(f, self.damaged)
            indexed.update(f.packs)
            self._index_files.append(key)
        self._indexed_packs = indexed
        self._packs_scanned = False
        if self.damaged_index:
            await self._index_from_packs(indexed)
            self._packs_scanned = True
        self.index_loaded = True
        self._mask()

    @property
    def strays(self) -> set[str]:
        """Files seen under points/, packs/ or index/ that are not named like the format's."""
        return set(self._strays)

    def _stray(self, key: str) -> None:
        if key not in self._strays:
            self._strays.add(key)
            self.log.warning("stray_file_ignored", key=key,
                             help="not a file of the repository format (see docs/format.md for the names); "
                                  "it is ignored and can be removed")

    async def pack_objects(self) -> list[ObjectInfo]:
        """Every pack (files under packs/ not named like one are ignored, with a warning)."""
        out = []
        async for o in self.backend.list("packs/"):
            if PACK_KEY.fullmatch(o.key):
                out.append(o)
            else:
                self._stray(o.key)
        return out

    async def index_keys(self) -> list[str]:
        """Every index file's key (others under index/ are ignored, with a warning)."""
        out = []
        async for o in self.backend.list("index/"):
            if INDEX_KEY.fullmatch(o.key):
                out.append(o.key)
            else:
                self._stray(o.key)
        return out

    async def find_unindexed(self, digests: Iterable[bytes]) -> int:
        """Chunks among ``digests`` that the index does not know (an index file lost or damaged):
        look for them once in the packs no index file lists, by their own records. Returns how
        many were found that way (``repair`` indexes them for good)."""
        index = self.index
        missing = [d for d in digests if index.lookup(d) is None and d not in index.masked]
        if not missing or self._packs_scanned:
            return 0
        await self._index_from_packs(self._indexed_packs)
        self._packs_scanned = True
        self._mask()
        found = sum(1 for d in missing if index.lookup(d) is not None or d in index.masked)
        if found:
            self.log.warning("chunks_found_in_unindexed_packs", count=found,
                             help=f"no index file lists them; 'blockferry repair {self.backend.url}' indexes them")
        return found

    async def _index_from_packs(self, indexed: set[str]) -> None:
        """An index file is damaged: take the chunks of the packs no good index file lists from
        the packs' own records (in memory only; ``repair`` writes a new index). Records of a pack
        whose frame is damaged are used only as a last resort, like damaged copies (each chunk
        is checked against its id when read)."""
        committed, masked = self.index.committed, self.index.masked
        for o in await self.pack_objects():
            pack = o.key.rsplit("/", 1)[-1]
            if pack in indexed:
                continue
            try:
                frame = await read_trailer(self.backend, o.key, o.size)
            except (RepositoryError, NotFoundError) as exc:
                self.log.warning("pack_unreadable", key=o.key, error=str(exc))
                continue
            no = self.index.pack_no(pack)
            for digest, off, n, raw_len, flags in frame.records:
                loc = pack_loc(no, off, n, raw_len, flags)
                if frame.problem is not None or (digest, pack) in self.damaged:
                    masked.setdefault(digest, loc)
                elif digest not in committed:
                    committed[digest] = loc

    def _mask(self) -> None:
        committed, packs = self.index.committed, self.index.packs
        for d in self.condemned:
            committed.pop(d, None)
        for d, pack in self.damaged:
            loc = committed.get(d)
            if loc is not None and packs[loc >> 84] == pack:
                self.index.masked[d] = loc
                del committed[d]

    async def load_health(self) -> Health | None:
        """The health record, or None. A damaged one is ignored with a warning (``verify`` or
        ``repair`` writes a new one): it only ever marks copies as suspect."""
        try:
            data = await self.backend.get(HEALTH_KEY)
        except NotFoundError:
            self.damaged = set()
            self.health_damaged = None
            return None
        try:
            health = msgspec.json.decode(data, type=Health)
            damaged = {(bytes.fromhex(d.chunk), d.pack or "") for d in health.damaged}
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            if self.health_damaged is None:
                self.log.warning("health_record_damaged", key=HEALTH_KEY, error=str(exc),
                                 help=f"ignored; 'blockferry verify {self.backend.url}' or 'blockferry repair "
                                      f"{self.backend.url}' writes a new one")
            self.health_damaged = f"{HEALTH_KEY} is damaged ({exc})"
            self.damaged = set()
            return None
        self.health_damaged = None
        self.damaged = damaged
        return health

    async def save_health(self, health: Health) -> None:
        if health.damaged or health.points:
            await self.backend.put(HEALTH_KEY, msgspec.json.encode(health))
        else:
            await self.backend.delete(HEALTH_KEY)
        self.health_damaged = None
        before = self.damaged
        self.damaged = {(bytes.fromhex(d.chunk), d.pack or "") for d in health.damaged}
        if before - self.damaged and self.index_loaded:
            await self.load_index(reload=True)  # copies found good again are used again
        self._mask()  # copies found bad just now are not used from now on

    async def load_gc_plan(self) -> GcPlan | None:
        """The garbage-collection plan, or None. A damaged plan reads as None, with
        ``gc_plan_damaged`` set and a warning: the next collection discards it (see
        engine/repo/gc.py for why that is safe)."""
        try:
            data = await self.backend.get(GC_PLAN_KEY)
        except NotFoundError:
            self.gc_plan_damaged = None
            return None
        try:
            plan = msgspec.msgpack.decode(data, type=GcPlan)
            if len(plan.condemned) % DIGEST_SIZE:
                raise msgspec.ValidationError("condemned ids are truncated")
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            if self.gc_plan_damaged is None:
                self.log.warning("gc_plan_damaged", key=GC_PLAN_KEY, error=str(exc),
                                 help=f"ignored; the next 'blockferry gc {self.backend.url}' discards it")
            self.gc_plan_damaged = f"{GC_PLAN_KEY} is damaged ({exc})"
            return None
        self.gc_plan_damaged = None
        return plan

    async def gc_running(self) -> bool:
        """Whether a live process holds the collection lock."""
        holder = await self.read_lock(GC_LOCK_KEY)
        return holder is not None and (holder.host != socket.gethostname() or holder_alive(holder))

    # -- writer lock ---------------------------------------------------------------------------

    @staticmethod
    def _session_info(purpose: str) -> LockInfo:
        return LockInfo(host=socket.gethostname(), pid=os.getpid(), pid_start=process_start(os.getpid()),
                        created=utc_now(), purpose=purpose)

    async def take_lock(self, key: str, purpose: str) -> LockInfo:
        """Create ``key`` exclusively; RepositoryLockedError if a live process holds it. A lock
        left by a dead process of this host is removed."""
        info = self._session_info(purpose)
        data = msgspec.json.encode(info)
        for _ in range(2):
            try:
                await self.backend.put(key, data, exclusive=True)
                return info
            except KeyExistsError:
                holder = await self.read_lock(key)
                if holder is not None and (holder.host != info.host or holder_alive(holder)):
                    raise RepositoryLockedError(
                        f"{self.backend.url} is locked by pid {holder.pid} on {holder.host} since "
                        f"{holder.created} ({holder.purpose}); if that process is gone, run "
                        f"'blockferry unlock {self.backend.url}'"
                    ) from None
                self.log.warning("stale_lock_removed", key=key,
                                 holder=msgspec.to_builtins(holder) if holder else None)
                await self.backend.delete(key)
        raise RepositoryLockedError(f"{self.backend.url}: could not take {key}")

    async def lock(self, purpose: str) -> None:
        """Take the writer lock (RepositoryLockedError if a live process holds it); then apply a
        pending garbage-collection plan, so this writer never deduplicates against chunks about
        to be removed. Taking the lock before reading the plan is what makes that safe: a
        collection reads the locks after writing its plan (see engine/repo/gc.py)."""
        if self._writer is not None:
            return
        self._writer = await self.take_lock(LOCK_KEY, purpose)
        self._point_ids = None  # listed before the lock: another writer may have committed since
        backend = self.backend
        if isinstance(backend, CleansTmp):
            await anyio.to_thread.run_sync(backend.clean_tmp)

        async def abort_left_uploads(uploads: AbortsUploads) -> None:
            # only this lock's holder and a garbage collection write packs: with no collection
            # running, every incomplete upload was left by a writer that died
            gc_holder = await self.read_lock(GC_LOCK_KEY)
            gc_running = gc_holder is not None and (gc_holder.host != socket.gethostname() or holder_alive(gc_holder))
            await uploads.abort_incomplete_uploads(older_than=86400.0 if gc_running else None)

        async def refresh_index() -> None:
            # a store kept open between writer sessions (a daemon, an embedding program) may have
            # an index that another process changed since: a collection that swept packs this
            # index still lists would have it deduplicate against chunks that are gone
            keys = await self.index_keys()
            if sorted(keys) != sorted([*self._index_files, *self.damaged_index]):
                self.condemned = set()
                await self.load_index(reload=True)

        async def read_plan() -> None:
            nonlocal plan
            plan = await self.load_gc_plan()

        plan: GcPlan | None = None
        # independent reads, at once (on object storage each is a round trip); the plan is
        # applied after the index is current
        with plain_errors():
            async with anyio.create_task_group() as tg:
                if isinstance(backend, AbortsUploads):
                    tg.start_soon(abort_left_uploads, backend)
                if self.index_loaded:
                    tg.start_soon(refresh_index)
                tg.start_soon(read_plan)
        if plan is None and self.gc_plan_damaged and await self.gc_running():
            # its condemned chunks are unknown while its sweep may be deleting them
            await self.unlock()
            raise RepositoryLockedError(f"{self.backend.url}: a garbage collection is running and its plan "
                                        f"cannot be read ({self.gc_plan_damaged}); try again once it has ended")
        if plan is not None:
            self.condemned = {plan.condemned[i:i + DIGEST_SIZE] for i in range(0, len(plan.condemned), DIGEST_SIZE)}
            self._mask()

    async def read_lock(self, key: str = LOCK_KEY) -> LockInfo | None:
        try:
            return msgspec.json.decode(await self.backend.get(key), type=LockInfo)
        except NotFoundError:
            return None
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None  # a damaged lock file protects nothing; treat as stale

    async def release_lock(self, key: str, info: LockInfo) -> None:
        # shielded: a cancelled job, copy or collection must not leave its lock behind
        with anyio.CancelScope(shield=True):
            holder = await self.read_lock(key)
            if holder is not None and holder.pid == info.pid and holder.created == info.created:
                await self.backend.delete(key)

    async def unlock(self) -> None:
        if self._writer is None:
            return
        with anyio.CancelScope(shield=True):
            await self._discard_unindexed()
        await self.release_lock(LOCK_KEY, self._writer)
        self._writer = None

    async def break_lock(self) -> LockInfo | None:
        """Remove the writer lock whoever holds it (``blockferry unlock``, for a holder that is
        gone); returns the holder, or None if the repository was not locked."""
        holder = await self.read_lock()
        if holder is not None:
            await self.backend.delete(LOCK_KEY)
        return holder

    async def _discard_unindexed(self) -> None:
        """Delete the packs this writer sealed but never indexed, before the lock goes: no point
        references their chunks (a commit indexes every pack sealed before it), so they are the
        leftovers of failed tasks, and on a full filesystem they hold the space the next backup
        needs until a gc. Only packs no index file lists go (an index write that failed on our
        side may still have reached the repository), and none while an index file is damaged
        (it may list them)."""
        if not self._unindexed:
            return
        batch, self._unindexed = self._unindexed, []
        pending = self.index.pending
        for pno, recs in batch:
            for digest, *_ in PACK_RECORD.iter_unpack(recs):
                loc = pending.get(digest)
                if loc is not None and loc >> 84 == pno:
                    del pending[digest]  # never deduplicate against them again
        try:
            _, listed, damaged = await read_index_files(self)
            if damaged:
                self.log.warning("unindexed_packs_kept", packs=len(batch), damaged_index_files=sorted(damaged))
                return
            for pno, _ in batch:
                pack = self.index.packs[pno]
                if pack not in listed:
                    await self.backend.delete(pack_key(pack))
                    self.log.info("unindexed_pack_removed", pack=pack)
        except (RepositoryError, NotFoundError, CorruptionError) as exc:  # a gc removes them later
            self.log.warning("unindexed_packs_kept", packs=len(batch), error=str(exc))

    @contextlib.asynccontextmanager
    async def reading(self, purpose: str) -> AsyncIterator[None]:
        """Mark a read session (restore, verify, copy) so that garbage collection does not
        delete packs under it; no lock is taken, readers never wait."""
        info = self._session_info(purpose)
        key = f"{READ_LOCK_PREFIX}{new_id(8)}"
        await self.backend.put(key, msgspec.json.encode(info))
        try:
            # a collection sweeping now may delete packs this reader would read: wait it out
            # (it saw no reader when it started; see engine/repo/gc.py)
            while ((plan := await self.load_gc_plan()) is not None and plan.sweeping) or self.gc_plan_damaged:
                holder = await self.read_lock(GC_LOCK_KEY)
                if holder is None or (holder.host == socket.gethostname() and not holder_alive(holder)):
                    break  # that collection died: nothing more will be deleted until the next one
                await anyio.sleep(0.2)
            if self.index_loaded:
                await self.load_index(reload=True)
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await self.backend.delete(key)

    async def sessions(self) -> list[tuple[str, LockInfo]]:
        """Every live lock and read session of the repository (stale ones are skipped)."""
        out = []
        async for o in self.backend.list("locks/"):
            info = await self.read_lock(o.key)
            if info is not None and (info.host != socket.gethostname() or holder_alive(info)):
                out.append((o.key, info))
        return out

    @property
    def locked(self) -> bool:
        return self._writer is not None

    # -- writing -------------------------------------------------------------------------------

    def writer(self, spawn: Spawn | None = None) -> PackWriter | WriterHandle:
        """A pack writer for one task: its own on a local repository, a handle on the store's
        shared one on a remote repository (see :class:`PackWriter`). With ``spawn`` (the
        ``start_soon`` of a task group the caller leaves only after :meth:`PackWriter.finish`)
        a pack that one of the task's adds fills is sealed in that group while the task goes on
        (at most :data:`MAX_SEALING` packs at once, the memory bound); without it, in the add."""
        if self.backend.capabilities.local:
            return PackWriter(self, spawn)
        if self._shared_writer is None:
            self._shared_writer = PackWriter(self)
        return WriterHandle(self._shared_writer, spawn)

    def _pack_sealed(self, pack_no: int, records: bytes) -> None:
        self._open_packs.pop(pack_no, None)
        self._unindexed.append((pack_no, records))

    async def commit(self, manifest: Manifest) -> None:
        """Publish a restore point: make every chunk it references durable, write the index for
        everything sealed since the last commit, then the manifest. ChunkLostError if a chunk it
        references is not stored (its writer failed)."""
        async with self._commit_lock:
            await self._make_durable(manifest)
            await self.write_index()
            await self.backend.put(f"points/{manifest.id}", encode_manifest(manifest), exclusive=True)
            self._summaries[manifest.id] = summary_of(manifest)
            self._point_ids = None
            if manifest.immutable_until:
                await self.protect_point(manifest)
            if self.damaged:
                await self.refresh_health()
            if len(self._index_files) > INDEX_COMPACT_AT:
                await self._compact_index()

    async def _make_durable(self, manifest: Manifest) -> None:
        index = self.index
        referenced = self.referenced(manifest)
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

    async def write_index(self) -> list[str]:
        """Write the index file of the packs written since the last one; returns those packs."""
        if not self._unindexed:
            return []
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
        return packs

    async def _compact_index(self) -> None:
        """Replace all index files by one, merged from the files themselves (not from this
        store's memory, which may hold locations a collection has since moved). Crash-safe: the
        merged file is written first, so a crash leaves duplicates (harmless), never a gap.

        Skipped while a collection's plan exists: its sweep may delete packs and index files
        under the merge. Without a plan now, a collection that plans later waits for this
        writer (it holds the writer lock from before that plan; see engine/repo/gc.py)."""
        if await self.load_gc_plan() is not None or self.gc_plan_damaged:
            return
        files, packs, damaged = await read_index_files(self)
        if damaged:
            return  # never delete an index file that cannot be read: repair rebuilds it
        table = sorted(packs)
        records = bytearray()
        for no, pack in enumerate(table):
            for e in packs[pack]:
                records += INDEX_RECORD.pack(e.digest, no, e.offset, e.length, e.raw_len, e.flags)
        key = f"index/{new_id()}"
        await self.backend.put(key, encode_index(table, bytes(records)))
        for k in files:
            await self.backend.delete(k)
        self._index_files = [key]

    # -- reading -------------------------------------------------------------------------------

    async def point_ids(self) -> list[str]:
        """Every point's id, from a listing. While this store holds the writer lock (no other
        writer can add a point), lookups a moment apart (the disks of a backup each finding
        their base) share one listing for up to ``POINT_LISTING_REUSE`` seconds; this store's
        own commits and deletions drop it. On object storage a listing is a billed, slow
        request; a deletion by another process in that moment is seen as late as if it had come
        a moment later."""
        if self._writer is not None and self._point_ids is not None \
                and anyio.current_time() - self._point_ids[0] < POINT_LISTING_REUSE:
            return list(self._point_ids[1])
        ids = []
        async for o in self.backend.list("points/"):
            name = o.key.removeprefix("points/")
            if POINT_ID.fullmatch(name):
                ids.append(name)
            else:
                self._stray(o.key)
        self._point_ids = (anyio.current_time(), ids)
        return list(ids)

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

    async def summaries(self, *, with_health: bool = True, readable: bool = False) -> list[PointSummary]:
        """Every restore point, oldest first, marked damaged from the health record (not read
        with ``with_health=False``, for callers that do not look). A point whose manifest is
        damaged is listed damaged, with ``error`` saying why and nothing else known (left out
        with ``readable``: callers that need its object, date or disks)."""
        ids = await self.point_ids()
        out = []
        for pid in ids:
            s = self._summaries.get(pid)
            if s is None:
                try:
                    s = self._summaries[pid] = decode_manifest_as(
                        await self._manifest_bytes(pid), f"restore point {pid}", PointSummary)
                except NotFoundError:
                    continue  # deleted since the listing
                except CorruptionError as exc:
                    self.log.warning("point_damaged", point=pid, error=str(exc))
                    s = PointSummary(id=pid, object="?", created="", block_size=0, disks=[], damaged=True,
                                     error=str(exc))
            if readable and s.error is not None:
                continue
            out.append(s)
        out.sort(key=lambda s: (s.created, s.id))
        if not with_health:
            return out
        health = await self.load_health()
        bad = set(health.points) if health else set()
        for s in out:
            s.damaged = s.id in bad or s.error is not None
        return out

    async def resolve_point(self, ref: str, *, object_name: str | None = None) -> str:
        """A full point id from an id, a unique prefix (4+ characters) or ``latest``. A point
        whose manifest this store has just read (resolved once already) is taken without
        listing the points again."""
        if ref == "latest":
            summaries = [s for s in await self.summaries(with_health=False, readable=True)
                         if object_name is None or s.object == object_name]
            if not summaries:
                raise NotFoundError(f"{self.backend.url} has no restore points" + (f" of {object_name}" if object_name else ""))
            return summaries[-1].id
        if ref in self._manifests:
            return ref
        ids = await self.point_ids()
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

    async def check_block_size(self) -> list[PointSummary]:
        """The points' summaries, once it is checked that they were all made with the config's
        block size (CorruptionError otherwise: the config was edited or damaged since)."""
        summaries = await self.summaries(with_health=False, readable=True)
        other = next((s for s in summaries if s.block_size != self.config.block_size), None)
        if other is not None:
            raise CorruptionError(
                f"{self.backend.url}: the config says blocks of {self.config.block_size} bytes, but point {other.id} "
                f"was made with {other.block_size}: the config was edited or damaged since (the block size is fixed "
                "for a repository's life); put the block size back")
        return summaries

    async def latest_disk(self, object_name: str, disk_name: str) -> tuple[str, DiskRecord] | None:
        """The newest point of ``object_name`` that has ``disk_name``, with that disk's record.

        Every backup asks this first; a point made with another block size than the config's
        means the config was edited (or damaged) since: CorruptionError, before anything is
        written (an incremental would take the base's blocks for blocks of another size)."""
        summaries = await self.check_block_size()
        for s in reversed(summaries):
            if s.object == object_name and any(d.name == disk_name for d in s.disks):
                try:
                    m = await self.manifest(s.id)
                except CorruptionError as exc:  # never a base: the one before it is
                    self.log.warning("point_damaged", point=s.id, error=str(exc))
                    continue
                return m.id, m.disk(disk_name)
        return None

    async def prepare_read(self, manifests: Iterable[Manifest], progress: Any = None) -> int:
        """Before reading points: let the backend bring back packs of theirs that sit in an
        archive tier (S3 RestoreObject), waiting until they are readable. Returns how many it had
        to restore (0 where the backend has no archive tier). The index must be loaded."""
        backend = self.backend
        if not isinstance(backend, PreparesRead):
            return 0
        keys = {pack_key(self.index.packs[loc >> 84]) for m in manifests for d in self.referenced(m)
                if (loc := self.index.lookup(d)) is not None}
        return await backend.prepare_read(sorted(keys), progress)

    async def protect_point(self, manifest: Manifest) -> bool:
        """Ask the backend to enforce a point's immutability on its manifest and on every pack
        holding its chunks (the local backend sets the filesystem's immutable attribute). False
        where the backend cannot: blockferry's own refusal is then the only protection."""
        backend = self.backend
        if not isinstance(backend, Protects) or not manifest.immutable_until:
            return False
        packs = {self.index.packs[loc >> 84] for d in self.referenced(manifest)
                 if (loc := self.index.lookup(d)) is not None}
        ok = await backend.protect(f"points/{manifest.id}", manifest.immutable_until)
        for p in sorted(packs):
            ok = await backend.protect(pack_key(p), manifest.immutable_until) and ok
        return ok

    async def refresh_health(self) -> None:
        """Drop from the damaged points those whose chunks all have a good copy again (a backup
        re-stored them)."""
        health = await self.load_health()
        if health is None or not health.points:
            return
        still = []
        for pid in health.points:
            try:
                refs = self.referenced(await self.manifest(pid))
            except NotFoundError:
                continue
            except CorruptionError:
                still.append(pid)
                continue
            if any(self.index.lookup(d) is None for d in refs):
                still.append(pid)
        if still != health.points:
            await self.save_health(msgspec.structs.replace(health, points=still))

    def unhealthy_runs(self, disk: DiskRecord) -> list[tuple[int, int]]:
        """Runs of a disk's blocks whose chunk has no good copy (damaged, or lost): an incremental
        must read them again even when nothing says they changed, which heals the repository."""
        runs: list[tuple[int, int]] = []
        if not self.damaged:
            return runs
        bad = {d for d, _ in self.damaged if self.index.lookup(d) is None}
        b = disk.blocks
        for i in range(len(b) // DIGEST_SIZE):
            if b[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE] in bad:
                if runs and runs[-1][0] + runs[-1][1] == i:
                    runs[-1] = (runs[-1][0], runs[-1][1] + 1)
                else:
                    runs.append((i, 1))
        return runs

    @staticmethod
    def referenced(manifest: Manifest) -> set[bytes]:
        """Every chunk id a point references."""
        out: set[bytes] = set()
        for disk in manifest.disks:
            b = disk.blocks
            out.update(b[i:i + DIGEST_SIZE] for i in range(0, len(b), DIGEST_SIZE))
        out.discard(HOLE)
        return out

    async def delete_point(self, point_id: str, *, now: str | None = None) -> None:
        """Remove a restore point (its chunks stay until garbage collection). ImmutableError if it
        is immutable until a later date, whoever asks. A point whose manifest is damaged can be
        deleted (its date cannot be read: only the storage's own protection applies). (``now`` is
        for tests.)"""
        try:
            m: Manifest | None = await self.manifest(point_id)
        except CorruptionError as exc:
            self.log.warning("deleting_damaged_point", point=point_id, error=str(exc))
            m = None
        if m is not None and immutable_now(m.immutable_until, now):
            raise ImmutableError(f"restore point {point_id} is immutable until {m.immutable_until}")
        backend = self.backend
        # server-side retention (S3 object lock)
        if isinstance(backend, Retention) and (until := await backend.locked_until(f"points/{point_id}")):
            raise ImmutableError(f"restore point {point_id} is locked by the storage until {until}")
        if isinstance(backend, Protects) and m is not None and m.immutable_until:
            await backend.unprotect(f"points/{point_id}")
        await self.backend.delete(f"points/{point_id}")
        self._summaries.pop(point_id, None)
        self._manifests.pop(point_id, None)
        self._point_ids = None

    def locate(self, digest: bytes, *, suspect: bool = False) -> tuple[str, int, int, int, int] | None:
        """(pack key, offset, stored length, raw length, flags) of a chunk, or None. With
        ``suspect``, a copy a health check found damaged when there is no other (the reader
        checks it against its id, as it checks every chunk)."""
        loc = self.index.lookup(digest)
        if loc is None and suspect:
            loc = self.index.masked.get(digest)
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
        immutable_until=m.immutable_until, stats=m.stats,
    )


async def read_index_files(store: RepositoryStore) -> tuple[list[str], dict[str, list[IndexEntry]], dict[str, str]]:
    """Every index file in the repository now, every pack's entries according to them (no
    masks, nothing from memory), and the index files that are damaged (key → why)."""
    files = sorted(await store.index_keys())
    packs: dict[str, list[IndexEntry]] = {}
    damaged: dict[str, str] = {}
    for key in files:
        try:
            f = decode_index(await store.backend.get(key), key)
        except NotFoundError:
            continue  # replaced by a concurrent commit's compaction
        except UnsupportedFormatError:
            raise
        except CorruptionError as exc:
            damaged[key] = str(exc)
            continue
        for digest, pno, off, n, raw_len, flags in INDEX_RECORD.iter_unpack(f.records):
            packs.setdefault(f.packs[pno], []).append(IndexEntry(digest, off, n, raw_len, flags))
    return files, packs, damaged


def immutable_now(until: str | None, now: str | None = None) -> bool:
    """Whether an ``immutable_until`` date (ISO 8601) is still in the future."""
    if not until:
        return False
    return parse_time(until) > (parse_time(now) if now else parse_time(utc_now()))
