"""Garbage collection: free the space of chunks no restore point references.

Mark and sweep, with the plan written down so that backups, restores and a killed collection all
stay safe:

1. **Mark.** Under the collection lock (``locks/gc``), read every manifest: the chunks they
   reference are live. Packs holding only dead chunks will be deleted; packs whose dead bytes are
   at least ``rewrite_threshold`` of the pack will be rewritten (their live chunks copied into new
   packs). Packs holding a chunk of a point that is still immutable, or a damaged copy of a live
   chunk, are left alone. The dead chunks of the chosen packs are *condemned*, and the plan is
   written to ``gc/plan``.
2. **Backups never use condemned chunks.** A writer takes its lock, *then* reads the plan and
   stops deduplicating against condemned chunks (it stores them again if it meets them). The
   collection writes its plan, *then* reads the locks. So either the writer sees the plan, or
   the collection sees the writer, which started before the plan: the sweep then waits until it
   has finished (or, without ``wait``, is deferred to the next run).
3. **Sweep.** Once no writer that started before the plan and no reader is running, mark the plan
   as sweeping (readers that start now wait until the sweep ends), re-read the manifests (a
   backup that started before the plan may have committed a point using a condemned chunk: it is
   live again), copy the live chunks of the packs to rewrite into new packs and index them, write
   one index without the old packs' entries, delete the index files it replaces, delete the old
   packs, delete the plan.

Every step leaves a consistent repository: an index entry never points at a deleted pack, and a
pack is deleted only when no index file names it. A collection killed at any moment is finished by
the next one (the plan is still there). Packs that no index lists (left by a backup that died
before its commit) are deleted when no writer is running.

Whatever the index says, a pack holding a chunk some point references is never deleted unless
that chunk is safe elsewhere: before a pack goes, its own records are read and checked against
the manifests (an index can be damaged or incomplete; the manifests decide what is live). A
collection refuses to start while a manifest or an index file cannot be read (it could not know
what is live), naming the file and the fix. A damaged plan is discarded: the sweep either had
not started, or had got as far as its own records show (the packs it deleted are gone, the
rest are still indexed or are orphans checked as above), so a fresh mark is always safe.

Why not generations or a grace period alone: a grace period must outlast the longest backup, which
nobody knows; the session check makes the wait exactly as long as needed.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import msgspec
from blockferry.errors import CorruptionError, NotFoundError, RepositoryError
from blockferry.repo.backend import Protects, Retention
from blockferry.repo.format import DIGEST_SIZE, INDEX_RECORD, encode_index, new_id, utc_now
from blockferry.repo.index import IndexEntry
from blockferry.repo.packs import pack_key
from blockferry.repo.packscan import read_trailer
from blockferry.repo.store import (
    GC_LOCK_KEY,
    GC_PLAN_KEY,
    LOCK_KEY,
    GcPlan,
    RepositoryStore,
    immutable_now,
    read_index_files,
)

#: fraction of a pack's bytes that must be dead before the pack is rewritten
DEFAULT_REWRITE_THRESHOLD = 0.5


class GcReport(msgspec.Struct, kw_only=True):
    state: str = "nothing to do"  #: "done", "deferred", "nothing to do"
    plan: str | None = None
    reason: str = ""
    packs_deleted: int = 0
    packs_rewritten: int = 0
    packs_written: int = 0
    orphan_packs_deleted: int = 0
    #: packs no index lists that hold chunks points use: kept ('blockferry repair' indexes them)
    orphan_packs_kept: int = 0
    #: packs the plan named that turned out to hold chunks points use: kept
    packs_kept_live: int = 0
    notes: list[str] = msgspec.field(default_factory=list)
    chunks_removed: int = 0
    bytes_freed: int = 0  #: bytes of packs deleted minus bytes of packs written
    packs_kept_immutable: int = 0
    duration: float = 0.0


async def _live(store: RepositoryStore, now: str | None = None) -> tuple[set[bytes], set[bytes]]:
    """(chunks any point references, chunks a point immutable now references)."""
    live: set[bytes] = set()
    frozen: set[bytes] = set()
    for pid in await store.point_ids():
        try:
            m = await store.manifest(pid)
        except NotFoundError:
            continue  # deleted since the listing
        except CorruptionError as exc:
            raise CorruptionError(
                f"{exc}: garbage collection cannot know which chunks it uses, so it does not run; "
                f"delete the point ('blockferry delete {store.backend.url} {pid}') or put back a good copy "
                "of its manifest first") from None
        refs = store.referenced(m)
        live |= refs
        if immutable_now(m.immutable_until, now):
            frozen |= refs
    return live, frozen


async def mark(store: RepositoryStore, *, rewrite_threshold: float = DEFAULT_REWRITE_THRESHOLD,
               now: str | None = None) -> tuple[GcPlan | None, int]:
    """Decide what to remove; write and return the plan (None: nothing to remove), and the
    number of packs kept for immutable points."""
    created = utc_now()
    _, packs = await _index(store)
    live, frozen = await _live(store, now)
    delete, rewrite, condemned = [], [], bytearray()
    kept_immutable = freed = 0
    # a backend with server-side retention (S3 object lock) can say what it would refuse to delete
    retention = store.backend if isinstance(store.backend, Retention) else None
    good_copies: dict[bytes, int] = {}  # chunk → packs holding a copy not found damaged
    for pack, entries in packs.items():
        for e in entries:
            if (e.digest, pack) not in store.damaged:
                good_copies[e.digest] = good_copies.get(e.digest, 0) + 1
    for pack, entries in sorted(packs.items()):
        # a damaged copy of a chunk with a good copy elsewhere is dead: nobody reads it
        dead = [e for e in entries if e.digest not in live
                or ((e.digest, pack) in store.damaged and good_copies.get(e.digest, 0) > 0)]
        if not dead:
            continue
        if any(e.digest in frozen for e in entries):
            kept_immutable += 1
            continue
        if retention is not None and await retention.locked_until(pack_key(pack)):
            kept_immutable += 1
            continue
        if any(e.digest in live and (e.digest, pack) in store.damaged and not good_copies.get(e.digest)
               for e in entries):
            continue  # moving a damaged copy of a live chunk would carry the damage to a new place
        total = sum(e.length for e in entries)
        dead_bytes = sum(e.length for e in dead)
        if len(dead) == len(entries):
            delete.append(pack)
        elif dead_bytes >= rewrite_threshold * total:
            rewrite.append(pack)
        else:
            continue
        freed += dead_bytes
        for e in dead:
            condemned += e.digest
    if not delete and not rewrite:
        return None, kept_immutable
    plan = GcPlan(id=new_id(8), created=created, condemned=bytes(condemned), delete_packs=delete,
                  rewrite_packs=rewrite, freed_bytes=freed)
    await store.backend.put(GC_PLAN_KEY, msgspec.msgpack.encode(plan))
    return plan, kept_immutable


async def _index(store: RepositoryStore) -> tuple[list[str], dict[str, list[IndexEntry]]]:
    """The index files and every pack's entries; CorruptionError if an index file is damaged
    (its packs' chunks would look unreferenced or unindexed)."""
    files, packs, damaged = await read_index_files(store)
    if damaged:
        key, why = sorted(damaged.items())[0]
        raise CorruptionError(f"{why}: garbage collection does not run on a damaged index; run "
                              f"'blockferry repair {store.backend.url}' first")
    return files, packs


async def _blockers(store: RepositoryStore, plan: GcPlan) -> list[str]:
    """Sessions the sweep must not run under: writers that started before the plan, and
    readers (they may read packs the sweep deletes)."""
    out = []
    for key, info in await store.sessions():
        if key == GC_LOCK_KEY:
            continue
        if key == LOCK_KEY and info.created >= plan.created:
            continue  # started after the plan: it never uses condemned chunks
        kind = "a backup" if key == LOCK_KEY else "a reader"
        out.append(f"{kind} ({info.purpose}, pid {info.pid} on {info.host}, since {info.created})")
    return out


async def collect(
    store: RepositoryStore,
    *,
    rewrite_threshold: float = DEFAULT_REWRITE_THRESHOLD,
    wait: float = 0.0,
    progress: Callable[[str], None] | None = None,
) -> GcReport:
    """Run a collection (or finish an interrupted one). With ``wait`` seconds, wait that long for
    blocking sessions to end; otherwise a blocked sweep is deferred to the next run."""
    t0 = anyio.current_time()
    report = GcReport()
    say = progress or (lambda _: None)
    gc_lock = await store.take_lock(GC_LOCK_KEY, "garbage collection")
    try:
        await store.load_health()  # damaged copies: never moved, never counted as safe
        plan = await store.load_gc_plan()
        if plan is None and store.gc_plan_damaged:
            # see the module's description: discarding it and marking afresh is safe
            store.log.warning("gc_plan_discarded", reason=store.gc_plan_damaged)
            report.notes.append(f"{store.gc_plan_damaged}: discarded")
            await store.backend.delete(GC_PLAN_KEY)
            store.gc_plan_damaged = None
        if plan is None:
            say("marking: reading every restore point")
            plan, report.packs_kept_immutable = await mark(store, rewrite_threshold=rewrite_threshold)
            if plan is None:
                report.bytes_freed = await _delete_orphans(store, report)
                if report.orphan_packs_deleted:  # something was freed after all
                    report.state = "done"
                report.duration = anyio.current_time() - t0
                return report
        report.plan = plan.id
        end = anyio.current_time() + wait
        while blockers := await _blockers(store, plan):
            if anyio.current_time() >= end:
                report.state = "deferred"
                report.reason = (f"{len(blockers)} session(s) that may use the data are running: "
                                 f"{'; '.join(blockers)}; run gc again once they have ended")
                report.duration = anyio.current_time() - t0
                return report
            say(f"waiting for {blockers[0]}")
            await anyio.sleep(1.0)
        await _sweep(store, plan, report, say)
        report.bytes_freed += await _delete_orphans(store, report)
        report.state = "done"
    finally:
        with anyio.CancelScope(shield=True):
            await store.release_lock(GC_LOCK_KEY, gc_lock)
    report.duration = anyio.current_time() - t0
    return report


async def _sweep(store: RepositoryStore, plan: GcPlan, report: GcReport, say: Callable[[str], None]) -> None:
    backend = store.backend
    # readers that start from now on wait for the sweep to end (see RepositoryStore.reading)
    await backend.put(GC_PLAN_KEY, msgspec.msgpack.encode(msgspec.structs.replace(plan, sweeping=utc_now())))
    if blockers := await _blockers(store, plan):  # a reader started before it could see the mark
        await backend.put(GC_PLAN_KEY, msgspec.msgpack.encode(plan))
        report.state, report.reason = "deferred", f"a session started: {blockers[0]}"
        return
    say("sweeping: reading every restore point again")
    live, _ = await _live(store)
    condemned = {plan.condemned[i:i + DIGEST_SIZE] for i in range(0, len(plan.condemned), DIGEST_SIZE)} - live
    _, packs = await _index(store)
    targets = [p for p in plan.delete_packs + plan.rewrite_packs if p in packs]
    old_bytes = 0
    for p in targets:
        try:
            old_bytes += (await backend.stat(pack_key(p))).size
        except NotFoundError:
            pass
    # a copy in a pack going away is dropped when nobody can use it (condemned, still dead) or
    # when the chunk has a copy in a pack that stays; the others move to new packs, their stored
    # bytes copied as they are
    going = set(targets)
    elsewhere = {e.digest for p, entries in packs.items() if p not in going for e in entries
                 if (e.digest, p) not in store.damaged}
    await store.load_index()
    writer = store.writer()
    moved: set[bytes] = set()
    for p in targets:
        keep = []
        for e in packs[p]:
            if e.digest in condemned or e.digest in elsewhere or e.digest in moved:
                continue
            keep.append(e)
            moved.add(e.digest)
        report.chunks_removed += len(packs[p]) - len(keep)
        if not keep:
            report.packs_deleted += 1
            continue
        say(f"rewriting pack {p[:12]}: {len(keep)} live chunk(s)")
        report.packs_rewritten += 1
        data = await backend.get_ranges(pack_key(p), [(e.offset, e.length) for e in keep])
        await writer.add([(e.digest, d, e.raw_len, e.flags) for e, d in zip(keep, data)], dedup=False)
    await writer.close()
    new_packs = await store.write_index()
    report.packs_written = len(new_packs)
    # one index without the old packs; then the files it replaces; then the packs
    # a pack goes only if its own records agree that every chunk of it a point uses is safe
    # elsewhere (an index entry missing for it would otherwise cost that chunk)
    safe = elsewhere | moved
    for p in targets:
        if not await _holds_only(store, p, safe, live):
            going.discard(p)
            report.packs_kept_live += 1
    files, now_packs = await _index(store)
    table = [p for p in sorted(now_packs) if p not in going]
    records = bytearray()
    for no, pack in enumerate(table):
        for e in now_packs[pack]:
            records += INDEX_RECORD.pack(e.digest, no, e.offset, e.length, e.raw_len, e.flags)
    merged = f"index/{new_id()}"
    await backend.put(merged, encode_index(table, bytes(records)))
    for key in files:
        await backend.delete(key)
    new_bytes = 0
    for p in new_packs:
        new_bytes += (await backend.stat(pack_key(p))).size
    # a pack once held by an immutable point may still carry the filesystem's immutable
    # attribute; no pack chosen here holds a chunk of a point that is immutable now (see mark)
    protects = backend if isinstance(backend, Protects) else None
    for p in targets:
        if p not in going:
            continue
        if protects is not None:
            await protects.unprotect(pack_key(p))
        await backend.delete(pack_key(p))
    await backend.delete(GC_PLAN_KEY)
    report.bytes_freed = old_bytes - new_bytes
    store.condemned = set()
    await store.load_index(reload=True)


async def _holds_only(store: RepositoryStore, pack: str, safe: set[bytes], live: set[bytes]) -> bool:
    """Whether every chunk of ``pack`` that a point uses (``live``) is in ``safe``, by the pack's
    own records. A pack whose records cannot be read or recovered is not known to: it stays."""
    key = pack_key(pack)
    try:
        size = (await store.backend.stat(key)).size
        frame = await read_trailer(store.backend, key, size)
    except NotFoundError:
        return True  # already gone
    except RepositoryError as exc:
        store.log.warning("pack_unreadable_kept", key=key, error=str(exc))
        return False
    if not frame.complete:  # part of its data is described by no surviving record
        store.log.warning("damaged_pack_kept", key=key, problem=frame.problem,
                          help=f"'blockferry repair {store.backend.url}' salvages its chunks")
        return False
    return all(r[0] in safe for r in frame.records if r[0] in live)


async def _delete_orphans(store: RepositoryStore, report: GcReport) -> int:
    """Packs no index lists are left by backups that died before their commit; delete them when
    no writer runs (a running one may still index its packs), and when they hold no chunk a
    point uses that has no indexed copy elsewhere (the index may have lost them: repair)."""
    if any(key == LOCK_KEY for key, _ in await store.sessions()):
        return 0
    _, packs = await _index(store)
    freed = 0
    retention = store.backend if isinstance(store.backend, Retention) else None
    listing = await store.pack_objects()
    present = {o.key.rsplit("/", 1)[-1] for o in listing}
    live: set[bytes] | None = None
    safe: set[bytes] = set()
    for o in listing:
        pack = o.key.rsplit("/", 1)[-1]
        if pack not in packs:
            if live is None:
                live, _ = await _live(store)
                safe = {e.digest for p, entries in packs.items() if p in present for e in entries
                        if (e.digest, p) not in store.damaged}
            if not await _holds_only(store, pack, safe, live):
                report.orphan_packs_kept += 1
                continue
            if retention is not None and await retention.locked_until(o.key):
                report.packs_kept_immutable += 1
                continue
            await store.backend.delete(o.key)
            report.orphan_packs_deleted += 1
            freed += o.size
    return freed

