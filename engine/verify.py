"""Verify: re-read every chunk a restore point references and check it against its id.

Reads are grouped by pack and coalesced, decoded and hashed in worker threads. Chunks that are
missing (no index entry, or a pack that is gone) count as damaged. The report names every
damaged chunk and, for each restore point it affects, the disk and the offsets.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import anyio.to_thread
import msgspec

from .blocks import decode_chunk
from .errors import BlockferryError, CorruptionError
from .format import DIGEST_SIZE, HOLE
from .store import RepositoryStore, unpack_loc, pack_key
from .task import Runtime

#: largest single read while verifying (bytes)
READ_SPAN = 8 << 20


class DamagedChunk(msgspec.Struct, kw_only=True):
    chunk: str
    pack: str | None
    reason: str


class AffectedDisk(msgspec.Struct, kw_only=True):
    point: str
    object: str
    disk: str
    damaged_blocks: int
    offsets: list[int]  #: the first few damaged offsets


class VerifyReport(msgspec.Struct, kw_only=True):
    points: int = 0
    chunks_checked: int = 0
    bytes_checked: int = 0  #: stored bytes read
    damaged: list[DamagedChunk] = msgspec.field(default_factory=list)
    affected: list[AffectedDisk] = msgspec.field(default_factory=list)
    duration: float = 0.0

    @property
    def healthy(self) -> bool:
        return not self.damaged


async def verify(store: RepositoryStore, runtime: Runtime, *, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    t0 = anyio.current_time()
    await store.load_index()
    report = VerifyReport()
    ids = await store.point_ids()
    report.points = len(ids)
    referenced: set[bytes] = set()
    damaged: dict[bytes, DamagedChunk] = {}
    for pid in ids:
        try:
            m = await store.manifest(pid)
        except CorruptionError as exc:
            report.affected.append(AffectedDisk(point=pid, object="?", disk="?", damaged_blocks=-1, offsets=[]))
            damaged[pid.encode()] = DamagedChunk(chunk=f"manifest {pid}", pack=None, reason=str(exc))
            continue
        for d in m.disks:
            b = d.blocks
            referenced.update(b[i:i + DIGEST_SIZE] for i in range(0, len(b), DIGEST_SIZE))
    referenced.discard(HOLE)

    by_pack: dict[int, list[tuple[int, int, int, int, bytes]]] = {}
    for digest in referenced:
        loc = store.index.lookup(digest)
        if loc is None:
            damaged[digest] = DamagedChunk(chunk=digest.hex(), pack=None, reason="missing from the index")
            continue
        pno, off, n, raw_len, flags = unpack_loc(loc)
        by_pack.setdefault(pno, []).append((off, n, raw_len, flags, digest))
    total = len(referenced)

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
        key = pack_key(store.index.packs[pno])
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
                    damaged[it[4]] = DamagedChunk(chunk=it[4].hex(), pack=key, reason=f"cannot read: {exc}")
                continue
            report.bytes_checked += len(stored)
            for digest, reason in await anyio.to_thread.run_sync(check, stored, span, base, key, limiter=runtime.cpu):
                damaged[digest] = DamagedChunk(chunk=digest.hex(), pack=key, reason=reason)
            report.chunks_checked += len(span)
            if progress is not None:
                progress(report.chunks_checked, total)

    packs = iter(sorted(by_pack.items()))

    async def lane() -> None:
        for pno, items in packs:
            await verify_pack(pno, items)

    async with anyio.create_task_group() as tg:
        for _ in range(runtime.settings.lanes):
            tg.start_soon(lane)

    report.damaged = sorted(damaged.values(), key=lambda d: d.chunk)
    bad = {d for d in damaged if len(d) == DIGEST_SIZE}
    if bad:
        for pid in ids:
            try:
                m = await store.manifest(pid)
            except CorruptionError:
                continue
            for d in m.disks:
                b = d.blocks
                hits = [i for i in range(0, len(b) // DIGEST_SIZE) if b[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE] in bad]
                if hits:
                    report.affected.append(AffectedDisk(
                        point=m.id, object=m.object, disk=d.name, damaged_blocks=len(hits),
                        offsets=[i * m.block_size for i in hits[:10]],
                    ))
    report.duration = anyio.current_time() - t0
    return report
