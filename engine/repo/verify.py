"""Health checks and repair.

**Verify** checks the repository against itself. A full check reads every pack whole: the
header, every chunk against its id (referenced or not: a damaged copy nobody uses yet must not be
deduplicated against either), the chunk list against its checksum and the data it describes, and
the footer, so that a change to any byte of a pack is found; it also reads every manifest and
index file. A sampled check re-reads a random share of the chunks restore points reference.
Reads are grouped by pack and coalesced, decoded and hashed in worker threads. What it finds
goes into the repository's health record (``health/damaged``):

* the damaged *copies* (chunk and pack): from then on they are never deduplicated against, and
  read only as a last resort, so the next backup that meets the block stores it again;
* the restore points that use a chunk with no good copy: ``points`` lists them as damaged; they
  still restore with ``allow_damaged`` (damaged ranges left as zeros and reported).

An object that cannot be read (permission denied, an I/O error, a timeout) is *unreadable*, not
damaged: it is reported as such and the health record keeps what it said about it. A copy the
record calls damaged that a later check reads correctly is cleared. A point's status is refreshed
by the next complete full check (or by the backup that heals it).

**Repair** rebuilds the index from the packs' own records. A pack whose frame (header, chunk
list, footer) is damaged is salvaged: every chunk that still decodes to its id (found from the
index or from what is left of the chunk list) is copied into a new pack, then the damaged pack
goes. A pack that cannot be read keeps its index entries. Repair also writes a new health record
when the old one is damaged, by verifying again.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import anyio
import anyio.to_thread
import msgspec
from blockferry.errors import BlockferryError, CorruptionError, NotFoundError, RepositoryError
from blockferry.repo.format import (
    INDEX_RECORD,
    PACK_RECORD,
    encode_index,
    new_id,
    unpack_loc,
    utc_now,
)
from blockferry.repo.health import DamagedChunk, Health
from blockferry.repo.packs import pack_key
from blockferry.repo.packscan import (
    Record,
    accounts,
    check_chunks,
    content_id,
    covering,
    read_span,
    read_trailer,
    scan_chunks,
    spans,
)
from blockferry.repo.store import HEALTH_KEY, RepositoryStore, read_index_files
from blockferry.runtime.resources import Runtime


class AffectedDisk(msgspec.Struct, kw_only=True):
    point: str
    object: str
    disk: str
    damaged_blocks: int  #: -1: the point's manifest itself is damaged
    offsets: list[int]  #: the first few damaged offsets


class FileProblem(msgspec.Struct, kw_only=True):
    key: str  #: the repository's key (packs/.., index/.., points/..)
    reason: str


class VerifyReport(msgspec.Struct, kw_only=True):
    points: int = 0
    sample: float | None = None  #: percent of the chunks checked, None: all
    packs_checked: int = 0  #: packs read whole (a full check)
    chunks_checked: int = 0
    bytes_checked: int = 0  #: stored bytes read
    damaged: list[DamagedChunk] = msgspec.field(default_factory=list)
    #: damaged files: a pack's frame (header, chunk list, footer), a manifest, an index file
    damaged_files: list[FileProblem] = msgspec.field(default_factory=list)
    #: objects that could not be read (not damage: nothing was recorded about them)
    unreadable: list[FileProblem] = msgspec.field(default_factory=list)
    affected: list[AffectedDisk] = msgspec.field(default_factory=list)
    cleared: int = 0  #: copies the health record called damaged that read back correctly
    #: copies known damaged (in the health record) whose chunk has a good copy elsewhere
    superseded: int = 0
    #: packs holding only chunks no point references (gc frees them; see docs/lifecycle.md)
    unreferenced_packs: int = 0
    unreferenced_bytes: int = 0
    notes: list[str] = msgspec.field(default_factory=list)
    duration: float = 0.0

    @property
    def has_damage(self) -> bool:
        return bool(self.damaged or self.damaged_files)

    @property
    def healthy(self) -> bool:
        return not self.has_damage and not self.unreadable


async def _referenced(store: RepositoryStore, report: VerifyReport) -> tuple[list[str], set[bytes]]:
    ids = await store.point_ids()
    report.points = len(ids)
    refs: set[bytes] = set()
    for pid in ids:
        try:
            refs |= store.referenced(await store.manifest(pid))
        except NotFoundError:
            continue  # deleted since the listing
        except CorruptionError as exc:
            report.affected.append(AffectedDisk(point=pid, object="?", disk="?", damaged_blocks=-1, offsets=[]))
            report.damaged_files.append(FileProblem(key=f"points/{pid}", reason=str(exc)))
    return ids, refs


async def _affected(store: RepositoryStore, ids: list[str], bad: set[bytes]) -> list[AffectedDisk]:
    """The disks (of every point) that use one of the ``bad`` chunks, and where."""
    out = []
    for pid in ids:
        try:
            m = await store.manifest(pid)
        except (CorruptionError, NotFoundError):
            continue
        for d in m.disks:
            b = d.blocks
            hits = [i for i in range(len(b) // 32) if b[i * 32:(i + 1) * 32] in bad]
            if hits:
                out.append(AffectedDisk(point=m.id, object=m.object, disk=d.name, damaged_blocks=len(hits),
                                        offsets=[i * m.block_size for i in hits[:10]]))
    return out


class _Findings:
    """What the reads of one check found, by chunk and copy."""

    def __init__(self) -> None:
        self.good: set[bytes] = set()  #: chunks with a copy read correctly
        self.good_copies: set[tuple[bytes, str]] = set()  #: only those the health record named
        self.bad: dict[tuple[bytes, str], str] = {}  #: copies that do not decode to their id
        self.unknown: set[bytes] = set()  #: chunks with a copy in a pack that could not be read
        self.missing: set[bytes] = set()  #: (sampled check) chosen chunks with no copy at all


async def _check_items(store: RepositoryStore, runtime: Runtime, report: VerifyReport, found: _Findings,
                       pack: str, items: list[Record], total: int,
                       progress: Callable[[int, int], None] | None) -> bool:
    """Read and check copies of chunks in ``pack`` (several records may describe the same bytes:
    a copy is bad only when no record of its offset decodes). False if the pack could not be
    read (its chunks are then unknown)."""
    key = pack_key(pack)
    suspects = store.damaged
    good_offsets: set[int] = set()
    bad: list[tuple[Record, str]] = []
    for span in spans(items):
        try:
            base, data = await read_span(store.backend, key, span)
        except NotFoundError as exc:
            for rec in span:
                bad.append((rec, f"cannot read: {exc}"))
            continue
        except RepositoryError as exc:
            report.unreadable.append(FileProblem(key=key, reason=str(exc)))
            found.unknown.update(r[0] for r in items)
            return False
        report.bytes_checked += len(data)
        ok, wrong = await anyio.to_thread.run_sync(check_chunks, data, base, span, limiter=runtime.cpu)
        for rec in ok:
            found.good.add(rec[0])
            good_offsets.add(rec[1])
            if (rec[0], pack) in suspects:
                found.good_copies.add((rec[0], pack))
        bad += wrong
        report.chunks_checked += len(span)
        if progress is not None:
            progress(report.chunks_checked, total)
    for rec, reason in bad:
        if rec[1] not in good_offsets:
            found.bad.setdefault((rec[0], pack), reason)
    return True


async def verify(store: RepositoryStore, runtime: Runtime, *, sample: float | None = None,
                 progress: Callable[[int, int], None] | None = None, record: bool = True) -> VerifyReport:
    """Check the repository (every pack whole, or ``sample`` percent of the referenced chunks,
    chosen at random), and (with ``record``) write what was found to its health record."""
    t0 = anyio.current_time()
    if sample is not None and not 0 < sample <= 100:
        raise BlockferryError(f"--sample takes a percentage above 0 and at most 100, not {sample}")
    full = sample is None or sample >= 100
    await store.load_index()
    report = VerifyReport(sample=sample)
    for key, why in sorted(store.damaged_index.items()):
        report.damaged_files.append(FileProblem(key=key, reason=f"{why}; 'blockferry repair' rebuilds the index"))
    if store.health_damaged:
        report.notes.append(f"{store.health_damaged}: ignored" + ("; this check writes a new one" if record else ""))
    if store.gc_plan_damaged:
        report.notes.append(f"{store.gc_plan_damaged}: ignored; the next gc discards it")
    ids, referenced = await _referenced(store, report)
    found = _Findings()
    now = utc_now()

    async with store.reading("verify"):
        if full:
            await _check_all_packs(store, runtime, report, found, referenced, progress)
        else:
            await _check_sample(store, runtime, report, found, referenced, sample or 100.0, progress)

    lost = {d for d in referenced if d not in found.good and d not in found.unknown} if full else found.missing
    bad_chunks = {d for d, _ in found.bad}
    # a copy already known damaged whose chunk has a good copy elsewhere (a backup stored it
    # again) is harmless: gc removes it
    known = {(d, p) for (d, p), _ in found.bad.items() if (d, p) in store.damaged and d in found.good}
    report.superseded = len(known)
    damaged = [DamagedChunk(chunk=d.hex(), pack=p, reason=r, found=now)
               for (d, p), r in found.bad.items() if (d, p) not in known]
    damaged += [DamagedChunk(chunk=d.hex(), pack=None, found=now,
                             reason="no copy in any pack" if full else "no good copy (missing from the index, or damaged)")
                for d in lost if d not in bad_chunks]
    report.damaged = sorted(damaged, key=lambda d: (d.chunk, d.pack or ""))
    report.cleared = len(found.good_copies)
    bad = (lost | bad_chunks) & referenced - found.good
    if bad:
        report.affected += await _affected(store, ids, bad)
    if full and not ids and report.packs_checked:
        report.notes.append(f"no restore points, but {report.packs_checked} pack(s) hold data: if no point was "
                            "deleted on purpose, manifests are lost (see 'What damage does' in docs/lifecycle.md)")
    elif report.unreferenced_packs:
        report.notes.append(f"{report.unreferenced_packs} pack(s) hold only chunks no restore point uses: after "
                            "prune or delete, gc frees them; if no point was deleted, manifests may be lost "
                            "(see docs/lifecycle.md)")
    for key in sorted(store.strays):
        report.notes.append(f"{key} is not a file of the repository format: ignored (it can be removed)")
    if record:
        await _record(store, report, found, full=full and not report.unreadable)
    report.duration = anyio.current_time() - t0
    return report


async def _check_all_packs(store: RepositoryStore, runtime: Runtime, report: VerifyReport, found: _Findings,
                           referenced: set[bytes], progress: Callable[[int, int], None] | None) -> None:
    """Read every pack whole: its frame, and every chunk its records or the index name."""
    _, indexed, _ = await read_index_files(store)
    listing = {o.key.rsplit("/", 1)[-1]: o.size for o in await store.pack_objects()}
    plan = await store.load_gc_plan()
    explained = set(plan.delete_packs) if plan is not None else set()
    for pack in sorted(set(indexed) - set(listing)):
        report.damaged_files.append(FileProblem(
            key=pack_key(pack), reason=f"missing: the index lists {len(indexed[pack])} chunk(s) in it"))
    frames: dict[str, list[Record]] = {}
    in_unindexed: set[bytes] = set()

    async def read_frame(pack: str, size: int) -> None:
        key = pack_key(pack)
        try:
            frame = await read_trailer(store.backend, key, size)
        except NotFoundError:
            return  # deleted since the listing
        except RepositoryError as exc:
            report.unreadable.append(FileProblem(key=key, reason=str(exc)))
            found.unknown.update(e.digest for e in indexed.get(pack, []))
            return
        if frame.problem is not None:
            report.damaged_files.append(FileProblem(key=key, reason=frame.problem))
        items = set(frame.records)
        items.update((e.digest, e.offset, e.length, e.raw_len, e.flags) for e in indexed.get(pack, []))
        frames[pack] = sorted(items, key=lambda r: r[1])
        if pack not in indexed:
            in_unindexed.update(r[0] for r in frame.records)

    todo = iter(sorted(listing.items()))

    async def frame_lane() -> None:
        for pack, size in todo:
            await read_frame(pack, size)

    async with anyio.create_task_group() as tg:
        for _ in range(runtime.settings.lanes):
            tg.start_soon(frame_lane)
    total = sum(len(v) for v in frames.values())
    work = iter(sorted(frames.items()))

    async def check_lane() -> None:
        for pack, items in work:
            if await _check_items(store, runtime, report, found, pack, items, total, progress):
                report.packs_checked += 1
                if not any(r[0] in referenced for r in items) and pack not in explained:
                    report.unreferenced_packs += 1
                    report.unreferenced_bytes += listing[pack]

    async with anyio.create_task_group() as tg:
        for _ in range(runtime.settings.lanes):
            tg.start_soon(check_lane)
    indexed_chunks = {e.digest for entries in indexed.values() for e in entries}
    stray = (referenced & in_unindexed & found.good) - indexed_chunks
    if stray and not store.damaged_index:
        report.damaged_files.append(FileProblem(
            key="index/", reason=f"{len(stray)} chunk(s) restore points use are in packs no index file lists; "
                                 "'blockferry repair' indexes them"))


async def _check_sample(store: RepositoryStore, runtime: Runtime, report: VerifyReport, found: _Findings,
                        referenced: set[bytes], sample: float, progress: Callable[[int, int], None] | None) -> None:
    """Read a random share of the referenced chunks (their copy in use, else the suspect one)."""
    chosen = sorted(referenced)
    if chosen:
        chosen = random.sample(chosen, max(1, round(len(chosen) * sample / 100)))
    by_pack: dict[str, list[Record]] = {}
    missing: set[bytes] = set()
    for digest in chosen:
        loc = store.index.lookup(digest)
        if loc is None:
            loc = store.index.masked.get(digest)
        if loc is None:
            missing.add(digest)
            continue
        pno, off, n, raw_len, flags = unpack_loc(loc)
        by_pack.setdefault(store.index.packs[pno], []).append((digest, off, n, raw_len, flags))
    found.missing = missing
    total = len(chosen)
    work = iter(sorted(by_pack.items()))

    async def lane() -> None:
        for pack, items in work:
            await _check_items(store, runtime, report, found, pack, items, total, progress)

    async with anyio.create_task_group() as tg:
        for _ in range(runtime.settings.lanes):
            tg.start_soon(lane)


async def _record(store: RepositoryStore, report: VerifyReport, found: _Findings, *, full: bool) -> None:
    """Merge this check into the health record: damaged copies accumulate (they stay masked)
    until a check reads them correctly; the damaged points are this check's when it was full
    and complete (else it only adds)."""
    previous = await store.load_health()
    copies = {(d.chunk, d.pack): d for d in (previous.damaged if previous else [])}
    for (c, p) in list(copies):
        digest = bytes.fromhex(c) if len(c) == 64 else b""
        if (digest, p) in found.good_copies or (p is None and digest in found.good):
            del copies[(c, p)]
    for d in report.damaged:
        copies.setdefault((d.chunk, d.pack), d)
    for (digest, p), reason in found.bad.items():  # superseded copies stay known
        copies.setdefault((digest.hex(), p), DamagedChunk(chunk=digest.hex(), pack=p, reason=reason, found=utc_now()))
    points = {a.point for a in report.affected}
    if previous is not None and not full:
        points |= set(previous.points)
    await store.save_health(Health(checked=utc_now(), damaged=list(copies.values()), points=sorted(points)))


class UnreadablePack(msgspec.Struct, kw_only=True):
    pack: str
    reason: str


class SalvagedPack(msgspec.Struct, kw_only=True):
    pack: str
    reason: str  #: what is damaged in it
    salvaged: int  #: chunks that decode to their id, now in a new pack
    lost: int  #: chunks whose bytes are damaged
    removed: bool  #: the damaged pack was deleted (its good chunks are safe elsewhere)


class RepairReport(msgspec.Struct, kw_only=True):
    packs: int = 0  #: packs read
    chunks: int = 0  #: chunks indexed
    #: packs that could not be read now (their index entries are kept as they were)
    unreadable: list[UnreadablePack] = msgspec.field(default_factory=list)
    salvaged: list[SalvagedPack] = msgspec.field(default_factory=list)
    damaged_index_files: list[str] = msgspec.field(default_factory=list)  #: replaced
    missing_chunks: int = 0  #: chunks restore points reference that no readable pack holds
    affected: list[AffectedDisk] = msgspec.field(default_factory=list)
    #: the health record was damaged and has been written again by a full check
    health_rebuilt: bool = False
    verify: VerifyReport | None = None
    duration: float = 0.0


async def _salvage(store: RepositoryStore, key: str, candidates: list[Record],
                   live: set[bytes]) -> tuple[list[Record], int]:
    """The chunks of a damaged pack that decode to their id (one per offset), and how many
    offsets hold none. A chunk whose record's id is damaged is named by what it decodes to,
    when a point uses that."""
    good: dict[int, Record] = {}
    offsets = {r[1] for r in candidates}
    for span in spans(candidates):
        base, data = await read_span(store.backend, key, span)
        ok, bad = check_chunks(data, base, span)
        for r in ok:
            good.setdefault(r[1], r)
        for r, _ in bad:
            if r[1] in good:
                continue
            stored = memoryview(data)[r[1] - base:r[1] - base + r[2]]
            if len(stored) == r[2] and (cid := content_id(stored, r[3], r[4])) is not None and cid in live:
                good[r[1]] = (cid, r[1], r[2], r[3], r[4])
    return sorted(good.values(), key=lambda r: r[1]), len(offsets - set(good))


async def repair(store: RepositoryStore, runtime: Runtime | None = None) -> RepairReport:
    """Rebuild the index from the packs' own records (under the writer lock), replacing every
    index file; salvage the chunks of packs whose frame is damaged; report the packs that cannot
    be read and the points that lost chunks. With ``runtime``, a damaged health record is
    written again by a full check."""
    t0 = anyio.current_time()
    report = RepairReport()
    backend = store.backend
    await store.lock("repair")
    try:
        await store.load_index()
        _, indexed, damaged_files = await read_index_files(store)
        report.damaged_index_files = sorted(damaged_files)
        table: list[str] = []
        records: list[tuple[int, Record]] = []
        rewrite: list[tuple[str, list[Record], str, int, bool]] = []
        live: set[bytes] = set()
        tails: set[int] = set()  # lengths of disks' last, partial blocks
        for pid in await store.point_ids():
            try:
                m = await store.manifest(pid)
            except (CorruptionError, NotFoundError):
                continue
            live |= store.referenced(m)
            tails |= {d.size % m.block_size for d in m.disks} - {0}
        for o in await store.pack_objects():
            pack = o.key.rsplit("/", 1)[-1]
            try:
                frame = await read_trailer(backend, o.key, o.size)
                if frame.problem is None:
                    recs = frame.records
                else:
                    candidates = set(frame.records)
                    candidates.update((e.digest, e.offset, e.length, e.raw_len, e.flags) for e in indexed.get(pack, []))
                    if not accounts(covering(candidates), frame.data_end):
                        # neither the index nor the chunk list names every chunk: walk the data
                        data = await backend.get(o.key)
                        candidates.update(await anyio.to_thread.run_sync(
                            scan_chunks, data, frame.data_end, covering(candidates), store.config.block_size,
                            tails, live))
                    recs, lost = await _salvage(store, o.key, sorted(candidates, key=lambda r: r[1]), live)
                    # removed only when every byte of its data is accounted for: else a chunk
                    # nobody can name any more may still be whole in it
                    whole = accounts(covering(candidates), frame.data_end) or frame.complete
                    rewrite.append((pack, recs, frame.problem, lost, whole))
                    continue
            except NotFoundError:
                continue  # gone since the listing
            except RepositoryError as exc:
                # not damage: keep what the index said about it
                report.unreadable.append(UnreadablePack(pack=pack, reason=str(exc)))
                recs = [(e.digest, e.offset, e.length, e.raw_len, e.flags) for e in indexed.get(pack, [])]
                if not recs:
                    continue
            no = len(table)
            table.append(pack)
            records += [(no, r) for r in recs]
            report.packs += 1
        # the good chunks of damaged packs move to new packs (stored bytes copied as they are)
        writer = store.writer()
        store.condemned = set()
        for pack, recs, _, _, _ in rewrite:
            data = await backend.get_ranges(pack_key(pack), [(r[1], r[2]) for r in recs])
            for i in range(0, len(recs), 64):
                await writer.add([(r[0], d, r[3], r[4]) for r, d in zip(recs[i:i + 64], data[i:i + 64])],
                                 dedup=False)
        await writer.close()
        for pno, recs_bytes in store._unindexed:
            no = len(table)
            table.append(store.index.packs[pno])
            for r in PACK_RECORD.iter_unpack(recs_bytes):
                records.append((no, r))
                store.index.pending.pop(r[0], None)  # indexed below
            report.packs += 1
        store._unindexed = []
        out = bytearray()
        for no, (digest, off, length, raw_len, flags) in records:
            out += INDEX_RECORD.pack(digest, no, off, length, raw_len, flags)
        report.chunks = len(records)
        old = await store.index_keys()
        key = f"index/{new_id()}"
        await backend.put(key, encode_index(table, bytes(out)))
        for k in old:
            await backend.delete(k)
        for pack, recs, problem, lost, whole in rewrite:
            removed = whole
            try:
                if whole:
                    await backend.delete(pack_key(pack))
                else:
                    store.log.warning("damaged_pack_kept", pack=pack, problem=problem,
                                      help="part of its data is described by no record that survived: it is "
                                           "kept, unindexed, for forensic recovery; delete it by hand if not needed")
            except BlockferryError as exc:  # protected by the storage, say: it stays, unindexed
                store.log.warning("damaged_pack_kept", pack=pack, error=str(exc))
                removed = False
            report.salvaged.append(SalvagedPack(pack=pack, reason=problem, salvaged=len(recs), lost=lost,
                                                removed=removed))
        await store.load_index(reload=True)
        ids = await store.point_ids()
        missing: set[bytes] = set()
        for pid in ids:
            try:
                refs = store.referenced(await store.manifest(pid))
            except (CorruptionError, NotFoundError):
                continue
            missing |= {d for d in refs if store.index.lookup(d) is None and d not in store.index.masked}
        report.missing_chunks = len(missing)
        if missing:
            report.affected = await _affected(store, ids, missing)
    finally:
        await store.unlock()
    if runtime is not None and (store.health_damaged or await _health_damaged(store)):
        await backend.delete(HEALTH_KEY)
        store.health_damaged = None
        report.verify = await verify(store, runtime)
        report.health_rebuilt = True
    report.duration = anyio.current_time() - t0
    return report


async def _health_damaged(store: RepositoryStore) -> bool:
    await store.load_health()
    return store.health_damaged is not None
