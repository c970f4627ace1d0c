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

Why not generations or a grace period alone: a grace period must outlast the longest backup, which
nobody knows; the session check makes the wait exactly as long as needed.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import msgspec
from blockferry.errors import NotFoundError
from blockferry.repo.format import DIGEST_SIZE, INDEX_RECORD, encode_index, new_id, utc_now
from blockferry.repo.packs import pack_key
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
    chunks_removed: int = 0
    bytes_freed: int = 0  #: bytes of packs deleted minus bytes of packs written
    packs_kept_immutable: int = 0
    duration: float = 0.0

    def summary(self) -> str:
        from blockferry.units import human

        if self.state == "deferred":
            return f"deferred (nothing removed): {self.reason}"
        text = (f"{self.state}: {human(self.bytes_freed)} freed; {self.packs_deleted} pack(s) deleted, "
                f"{self.packs_rewritten} rewritten into {self.packs_written}, {self.chunks_removed} chunk(s) "
                f"removed, {self.orphan_packs_deleted} orphan pack(s)")
        if self.packs_kept_immutable:
            text += f"; {self.packs_kept_immutable} pack(s) kept for immutable points"
        return text


async def _live(store: RepositoryStore, now: str | None = None) -> tuple[set[bytes], set[bytes]]:
    """(chunks any point references, chunks a point immutable now references)."""
    live: set[bytes] = set()
    frozen: set[bytes] = set()
    for pid in await store.point_ids():
        m = await store.manifest(pid)
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
    _, packs = await read_index_files(store)
    live, frozen = await _live(store, now)
    delete, rewrite, condemned = [], [], bytearray()
    kept_immutable = freed = 0
    # a backend with server-side retention (S3 object lock) can say what it would refuse to delete
    locked_until = getattr(store.backend, "locked_until", None)
    for pack, entries in sorted(packs.items()):
        dead = [e for e in entries if e.digest not in live]
        if not dead:
            continue
        if any(e.digest in frozen for e in entries):
            kept_immutable += 1
            continue
        if locked_until is not None and await locked_until(pack_key(pack)):
            kept_immutable += 1
            continue
        if any(e.digest in live and (e.digest, pack) in store.damaged for e in entries):
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
    gc_lock = await store._take_lock(GC_LOCK_KEY, "garbage collection")
    try:
        plan = await store.load_gc_plan()
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
            await store._release(GC_LOCK_KEY, gc_lock)
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
    _, packs = await read_index_files(store)
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
    elsewhere = {e.digest for p, entries in packs.items() if p not in going for e in entries}
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
    new_packs = [store.index.packs[pno] for pno, _ in store._unindexed]
    await store._write_index()
    report.packs_written = len(new_packs)
    # one index without the old packs; then the files it replaces; then the packs
    files, now_packs = await read_index_files(store)
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
    unprotect = getattr(backend, "unprotect", None)
    for p in targets:
        if unprotect is not None:
            await unprotect(pack_key(p))
        await backend.delete(pack_key(p))
    await backend.delete(GC_PLAN_KEY)
    report.bytes_freed = old_bytes - new_bytes
    store.condemned = set()
    await store.load_index(reload=True)


async def _delete_orphans(store: RepositoryStore, report: GcReport) -> int:
    """Packs no index lists are left by backups that died before their commit; delete them when
    no writer runs (a running one may still index its packs)."""
    if any(key == LOCK_KEY for key, _ in await store.sessions()):
        return 0
    _, packs = await read_index_files(store)
    freed = 0
    async for o in store.backend.list("packs/"):
        pack = o.key.rsplit("/", 1)[-1]
        if pack not in packs:
            locked_until = getattr(store.backend, "locked_until", None)
            if locked_until is not None and await locked_until(o.key):
                report.packs_kept_immutable += 1
                continue
            await store.backend.delete(o.key)
            report.orphan_packs_deleted += 1
            freed += o.size
    return freed

