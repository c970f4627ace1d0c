"""Health checks and repair.

**Verify** re-reads chunks that restore points reference (all of them, or a random sample) and
checks each against its id. Reads are grouped by pack and coalesced, decoded and hashed in worker
threads. What it finds goes into the repository's health record (``health/damaged``):

* the damaged *copies* (chunk and pack): from then on they are never read and never deduplicated
  against, so the next backup that meets the block stores it again;
* the restore points that use a chunk with no good copy: ``points`` lists them as damaged; they
  still restore with ``allow_damaged`` (damaged ranges left as zeros and reported).

A point's status is refreshed by the next full check (or by the backup that heals it).

**Repair** rebuilds the index from the packs' own trailers when the index is lost or damaged,
and reports packs it cannot read with the points they affect.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import anyio
import anyio.to_thread
import msgspec
from blockferry.errors import BlockferryError, CorruptionError
from blockferry.repo.chunks import decode_chunk
from blockferry.repo.format import (
    INDEX_RECORD,
    PACK_FOOTER,
    PACK_HEADER,
    encode_index,
    new_id,
    parse_pack_footer,
    parse_pack_records,
    unpack_loc,
    utc_now,
)
from blockferry.repo.health import DamagedChunk, Health
from blockferry.repo.packs import pack_key
from blockferry.repo.store import RepositoryStore
from blockferry.runtime.resources import Runtime

#: largest single read while verifying (bytes)
READ_SPAN = 8 << 20


class AffectedDisk(msgspec.Struct, kw_only=True):
    point: str
    object: str
    disk: str
    damaged_blocks: int
    offsets: list[int]  #: the first few damaged offsets


class VerifyReport(msgspec.Struct, kw_only=True):
    points: int = 0
    sample: float | None = None  #: percent of the chunks checked, None: all
    chunks_checked: int = 0
    bytes_checked: int = 0  #: stored bytes read
    damaged: list[DamagedChunk] = msgspec.field(default_factory=list)
    affected: list[AffectedDisk] = msgspec.field(default_factory=list)
    duration: float = 0.0

    @property
    def healthy(self) -> bool:
        return not self.damaged


async def _referenced(store: RepositoryStore, report: VerifyReport,
                      damaged: dict[bytes, DamagedChunk]) -> tuple[list[str], set[bytes]]:
    ids = await store.point_ids()
    report.points = len(ids)
    refs: set[bytes] = set()
    for pid in ids:
        try:
            refs |= store.referenced(await store.manifest(pid))
        except CorruptionError as exc:
            report.affected.append(AffectedDisk(point=pid, object="?", disk="?", damaged_blocks=-1, offsets=[]))
            damaged[pid.encode()] = DamagedChunk(chunk=f"manifest {pid}", pack=None, reason=str(exc), found=utc_now())
    return ids, refs


async def _affected(store: RepositoryStore, ids: list[str], bad: set[bytes]) -> list[AffectedDisk]:
    """The disks (of every point) that use one of the ``bad`` chunks, and where."""
    out = []
    for pid in ids:
        try:
            m = await store.manifest(pid)
        except CorruptionError:
            continue
        for d in m.disks:
            b = d.blocks
            hits = [i for i in range(len(b) // 32) if b[i * 32:(i + 1) * 32] in bad]
            if hits:
                out.append(AffectedDisk(point=m.id, object=m.object, disk=d.name, damaged_blocks=len(hits),
                                        offsets=[i * m.block_size for i in hits[:10]]))
    return out


async def verify(store: RepositoryStore, runtime: Runtime, *, sample: float | None = None,
                 progress: Callable[[int, int], None] | None = None, record: bool = True) -> VerifyReport:
    """Check every referenced chunk (or ``sample`` percent of them, chosen at random), and (with
    ``record``) write what was found to the repository's health record."""
    t0 = anyio.current_time()
    if sample is not None and not 0 < sample <= 100:
        raise BlockferryError(f"--sample takes a percentage above 0 and at most 100, not {sample}")
    await store.load_index()
    report = VerifyReport(sample=sample)
    damaged: dict[bytes, DamagedChunk] = {}
    now = utc_now()
    ids, referenced = await _referenced(store, report, damaged)
    chosen = sorted(referenced)
    if sample is not None and sample < 100 and chosen:
        chosen = random.sample(chosen, max(1, round(len(chosen) * sample / 100)))

    by_pack: dict[int, list[tuple[int, int, int, int, bytes]]] = {}
    for digest in chosen:
        loc = store.index.lookup(digest)
        if loc is None:  # never indexed, or only damaged copies are left
            damaged[digest] = DamagedChunk(chunk=digest.hex(), pack=None, found=now,
                                           reason="no good copy (missing from the index, or damaged)")
            continue
        pno, off, n, raw_len, flags = unpack_loc(loc)
        by_pack.setdefault(pno, []).append((off, n, raw_len, flags, digest))
    total = len(chosen)

    def check(stored: bytes, items: list[tuple[int, int, int, int, bytes]], base: int, key: str) -> list[tuple[bytes, str]]:
        bad = []
        view = memoryview(stored)
        for off, n, raw_len, flags, digest in items:
            chunk = view[off - base: off - base + n]
            if len(chunk) != n:
                bad.append((digest, f"{key} is truncated"))
                continue
            try:
                decode_chunk(chunk, raw_len, flags, digest)
            except CorruptionError as exc:
                bad.append((digest, str(exc)))
        return bad

    async def verify_pack(pno: int, items: list[tuple[int, int, int, int, bytes]]) -> None:
        pack = store.index.packs[pno]
        key = pack_key(pack)
        items.sort()
        spans: list[list[tuple[int, int, int, int, bytes]]] = [[]]
        for it in items:
            if spans[-1] and it[0] + it[1] - spans[-1][0][0] > READ_SPAN:
                spans.append([])
            spans[-1].append(it)
        for span in spans:
            base = span[0][0]
            length = span[-1][0] + span[-1][1] - base
            try:
                stored = await store.backend.get(key, base, length)
            except BlockferryError as exc:
                for it in span:
                    damaged[it[4]] = DamagedChunk(chunk=it[4].hex(), pack=pack, reason=f"cannot read: {exc}", found=now)
                continue
            report.bytes_checked += len(stored)
            for digest, reason in await anyio.to_thread.run_sync(check, stored, span, base, key, limiter=runtime.cpu):
                damaged[digest] = DamagedChunk(chunk=digest.hex(), pack=pack, reason=reason, found=now)
            report.chunks_checked += len(span)
            if progress is not None:
                progress(report.chunks_checked, total)

    packs = iter(sorted(by_pack.items()))

    async def lane() -> None:
        for pno, items in packs:
            await verify_pack(pno, items)

    async with store.reading("verify"):
        async with anyio.create_task_group() as tg:
            for _ in range(runtime.settings.lanes):
                tg.start_soon(lane)

    report.damaged = sorted(damaged.values(), key=lambda d: d.chunk)
    bad = {d for d in damaged if len(d) == 32}
    if bad:
        report.affected += await _affected(store, ids, bad)
    if record:
        await _record(store, report, full=sample is None or sample >= 100)
    report.duration = anyio.current_time() - t0
    return report


async def _record(store: RepositoryStore, report: VerifyReport, *, full: bool) -> None:
    """Merge this check into the health record: damaged copies accumulate (they stay masked); the
    damaged points are this check's (a sampled check only adds)."""
    previous = await store.load_health()
    copies = {(d.chunk, d.pack): d for d in (previous.damaged if previous else [])}
    for d in report.damaged:
        if len(d.chunk) == 64:
            copies.setdefault((d.chunk, d.pack), d)
    points = {a.point for a in report.affected}
    if previous is not None and not full:
        points |= set(previous.points)
    await store.save_health(Health(checked=utc_now(), damaged=list(copies.values()), points=sorted(points)))


class UnreadablePack(msgspec.Struct, kw_only=True):
    pack: str
    reason: str


class RepairReport(msgspec.Struct, kw_only=True):
    packs: int = 0  #: packs read
    chunks: int = 0  #: chunks indexed
    unreadable: list[UnreadablePack] = msgspec.field(default_factory=list)
    missing_chunks: int = 0  #: chunks restore points reference that no readable pack holds
    affected: list[AffectedDisk] = msgspec.field(default_factory=list)
    duration: float = 0.0


async def repair(store: RepositoryStore) -> RepairReport:
    """Rebuild the index from the packs' trailers (under the writer lock), replacing every index
    file; report the packs that cannot be read and the points that lost chunks."""
    t0 = anyio.current_time()
    report = RepairReport()
    backend = store.backend
    await store.lock("repair")
    try:
        packs: list[str] = []
        records = bytearray()
        async for o in backend.list("packs/"):
            pack = o.key.rsplit("/", 1)[-1]
            try:
                if o.size < len(PACK_HEADER) + PACK_FOOTER.size:
                    raise CorruptionError(f"{o.key} is truncated")
                footer = await backend.get(o.key, o.size - PACK_FOOTER.size, PACK_FOOTER.size)
                n, crc = parse_pack_footer(footer, o.key)
                start = o.size - PACK_FOOTER.size - n * 45
                if start < len(PACK_HEADER):
                    raise CorruptionError(f"{o.key}: footer says {n} chunks, more than the pack holds")
                recs = parse_pack_records(await backend.get(o.key, start, n * 45), crc, o.key)
            except BlockferryError as exc:
                report.unreadable.append(UnreadablePack(pack=pack, reason=str(exc)))
                continue
            no = len(packs)
            packs.append(pack)
            for digest, off, length, raw_len, flags in recs:
                if off + length > start:
                    report.unreadable.append(UnreadablePack(pack=pack, reason="a chunk lies past the pack's data"))
                    break
                records += INDEX_RECORD.pack(digest, no, off, length, raw_len, flags)
                report.chunks += 1
            report.packs += 1
        old = [o.key async for o in backend.list("index/")]
        key = f"index/{new_id()}"
        await backend.put(key, encode_index(packs, bytes(records)))
        for k in old:
            await backend.delete(k)
        await store.load_index(reload=True)
        ids = await store.point_ids()
        missing: set[bytes] = set()
        for pid in ids:
            try:
                refs = store.referenced(await store.manifest(pid))
            except CorruptionError:
                continue
            missing |= {d for d in refs if store.index.lookup(d) is None}
        report.missing_chunks = len(missing)
        if missing:
            report.affected = await _affected(store, ids, missing)
    finally:
        await store.unlock()
    report.duration = anyio.current_time() - t0
    return report
