"""The archive tier: packs of old restore points moved to a cheaper storage class, and back.

Only backends with storage classes (``s3``) have one. What moves: the packs whose every chunk is
used only by the chosen (old) points, never a pack a younger point also uses, so that restoring a
recent point and planning an incremental never wait for the archive. Manifests and index files
stay in the standard class: listing points, planning and deduplication read them, never packs.
Packs under object lock stay in place too (a copy onto a locked object would add a second,
unlockable copy).

Reading a point whose packs are archived (restore, copy, verify) first asks the backend to bring
them back (:meth:`RepositoryStore.prepare_read`): the S3 backend sends RestoreObject for each and
waits, with progress, until all are readable.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence

import anyio
import msgspec
from blockferry.errors import ConfigError
from blockferry.repo.backend import PreparesRead, Retention, StorageClasses
from blockferry.repo.packs import pack_key
from blockferry.repo.retention import parse_time
from blockferry.repo.store import RepositoryStore


class ArchiveReport(msgspec.Struct, kw_only=True):
    storage_class: str
    points: list[str] = msgspec.field(default_factory=list)  #: points whose packs were considered
    packs_moved: int = 0
    packs_already: int = 0  #: in that class before
    packs_shared: int = 0  #: kept where they are: a point not chosen uses them too
    packs_locked: int = 0  #: kept where they are: under object lock
    packs_restored: int = 0  #: brought back from an archive class before moving (``back``)
    duration: float = 0.0


async def archive_points(store: RepositoryStore, *, older_than_days: float | None = None,
                         points: Sequence[str] | None = None, storage_class: str | None = None,
                         back: bool = False, now: dt.datetime | None = None,
                         progress: Callable[[str], None] | None = None) -> ArchiveReport:
    """Move the packs of ``points`` (or of the points created more than ``older_than_days`` days
    ago) to ``storage_class`` (default: the backend's ``archive_class`` setting); with ``back``,
    to STANDARD (restoring them from the archive first where the class needs it)."""
    backend = store.backend
    if not isinstance(backend, StorageClasses):
        raise ConfigError(f"{backend.url}: this storage has no storage classes (the archive tier needs s3)")
    t0 = anyio.current_time()
    target = "STANDARD" if back else (storage_class or backend.archive_class)
    summaries = await store.summaries(readable=True)
    if points is not None:
        chosen = {await store.resolve_point(p) for p in points}
    elif older_than_days is not None:
        cutoff = (now or dt.datetime.now(dt.timezone.utc)) - dt.timedelta(days=older_than_days)
        chosen = {s.id for s in summaries if parse_time(s.created) < cutoff}
    elif back:
        chosen = {s.id for s in summaries}
    else:
        raise ConfigError("say which points to archive: --older-than DAYS or --point ID")
    report = ArchiveReport(storage_class=target, points=sorted(chosen))
    await store.load_index()
    packs = store.index.packs
    chosen_packs: set[str] = set()
    others: set[bytes] = set()
    for s in summaries:
        refs = store.referenced(await store.manifest(s.id))
        if s.id in chosen:
            chosen_packs |= {packs[loc >> 84] for d in refs if (loc := store.index.lookup(d)) is not None}
        elif not back:
            others |= refs
    if others:
        shared = {packs[loc >> 84] for d in others if (loc := store.index.lookup(d)) is not None}
        report.packs_shared = len(chosen_packs & shared)
        chosen_packs -= shared
    keys = sorted(pack_key(p) for p in chosen_packs)
    if back and isinstance(backend, PreparesRead):
        report.packs_restored = await backend.prepare_read(keys, progress)
    retention = backend if isinstance(backend, Retention) else None
    for key in keys:
        if retention is not None and await retention.locked_until(key):
            report.packs_locked += 1
            continue
        if await backend.set_storage_class(key, target):
            report.packs_moved += 1
        else:
            report.packs_already += 1
        if progress is not None:
            progress(f"{report.packs_moved + report.packs_already} of {len(keys)} pack(s) in {target}")
    report.duration = anyio.current_time() - t0
    return report


__all__ = ["ArchiveReport", "archive_points"]
