"""Retention (prune) and backup copy: what keeps a repository's points to their period, and what
copies points to a second repository."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Sequence

import anyio
import anyio.to_thread
import msgspec
from blockferry.errors import ConfigError, CorruptionError, ImmutableError
from blockferry.registry import backend_plugin
from blockferry.repo.chunks import compressor, decode_chunk
from blockferry.repo.format import FLAG_ZSTD
from blockferry.repo.retention import RetentionDecision, RetentionPolicy, decide
from blockferry.repo.store import RepositoryStore
from blockferry.runtime.resources import Runtime


class Refusal(msgspec.Struct, frozen=True, kw_only=True):
    point: str
    reason: str


class PruneReport(msgspec.Struct, kw_only=True):
    policy: str
    dry_run: bool
    decisions: list[RetentionDecision]
    removed: list[str] = msgspec.field(default_factory=list)
    refused: list[Refusal] = msgspec.field(default_factory=list)


async def prune(
    store: RepositoryStore,
    policy: RetentionPolicy,
    *,
    objects: Iterable[str] | None = None,
    dry_run: bool = False,
    now: dt.datetime | None = None,
) -> PruneReport:
    """Apply ``policy`` to every object's points (or only ``objects``'): remove the points no
    rule keeps. Immutable points are always kept. The chunks of removed points stay until
    garbage collection."""
    wanted = set(objects) if objects is not None else None
    points = [s for s in await store.summaries(readable=True) if wanted is None or s.object in wanted]
    decisions = decide(points, policy, now=now)
    report = PruneReport(policy=policy.describe(), dry_run=dry_run, decisions=decisions)
    if dry_run:
        return report
    for d in decisions:
        if d.keep:
            continue
        try:
            await store.delete_point(d.point, now=now.isoformat() if now else None)
            report.removed.append(d.point)
        except ImmutableError as exc:  # became immutable since the decision: never removed
            report.refused.append(Refusal(point=d.point, reason=str(exc)))
    return report


class CopyReport(msgspec.Struct, kw_only=True):
    points: list[str] = msgspec.field(default_factory=list)  #: copied
    skipped: list[str] = msgspec.field(default_factory=list)  #: the target had them already
    chunks_copied: int = 0
    chunks_present: int = 0  #: chunks the target already had
    bytes_read: int = 0  #: stored bytes read from the source
    bytes_written: int = 0  #: stored bytes written to the target
    duration: float = 0.0
    pruned: list[str] = msgspec.field(default_factory=list)  #: removed from the target by its retention


def _reencode(stored: bytes, raw_len: int, flags: int, digest: bytes, level: int | None,
              same_level: bool) -> tuple[bytes, int]:
    """Verify a chunk against its id; keep its stored bytes when the compression level is the
    same, else compress the block again at the target's level."""
    data = decode_chunk(stored, raw_len, flags, digest)
    if same_level:
        return stored, flags
    if level is None:
        return data, 0
    c = compressor(level).compress(data)
    return (c, FLAG_ZSTD) if len(c) < len(data) else (data, 0)


async def copy_points(
    source: RepositoryStore,
    target: RepositoryStore,
    point_ids: Sequence[str],
    *,
    runtime: Runtime,
    progress: Callable[[int, int], None] | None = None,
) -> CopyReport:
    """Copy restore points (same ids) from ``source`` to ``target``, sending only the chunks the
    target lacks, each verified against its id on the way. The target may compress differently;
    a different block size is refused. The target's writer lock is held while copying."""
    t0 = anyio.current_time()
    if source.config.block_size != target.config.block_size:
        raise ConfigError(
            f"cannot copy: the repositories' block sizes differ ({source.config.block_size} and "
            f"{target.config.block_size} bytes); a copy target needs the same block size"
        )
    same_level = source.config.compression == target.config.compression
    level = target.config.zstd_level
    report = CopyReport()
    await target.lock("copy")
    try:
        await source.load_index()
        await target.load_index()
        existing = set(await target.point_ids())
        async with source.reading("copy"):
            # packs in an archive tier come back first, all at once (a no-op elsewhere)
            await source.prepare_read([await source.manifest(p) for p in point_ids if p not in existing])
            for n, pid in enumerate(point_ids):
                if pid in existing:
                    report.skipped.append(pid)
                    continue
                m = await source.manifest(pid)
                needed = sorted(d for d in source.referenced(m) if target.index.lookup(d) is None)
                report.chunks_present += len(source.referenced(m)) - len(needed)
                writer = target.writer()
                try:
                    for i in range(0, len(needed), 64):
                        await _copy_chunks(source, needed[i:i + 64], writer, level, same_level, runtime, report)
                finally:
                    await writer.close()
                await target.commit(m)
                report.points.append(pid)
                if progress is not None:
                    progress(n + 1, len(point_ids))
    finally:
        await target.unlock()
    report.duration = anyio.current_time() - t0
    return report


async def points_to_copy(store: RepositoryStore, *, objects: Iterable[str] | None = None,
                         latest: bool = False) -> list[str]:
    """The points a copy sends, oldest first: all of them, or with ``latest`` the newest of each
    object (what a periodic copy sends each time); only ``objects``' if given."""
    wanted = set(objects) if objects is not None else None
    summaries = [s for s in await store.summaries(readable=True) if wanted is None or s.object in wanted]  # oldest first
    if latest:
        newest = {s.object: s for s in summaries}  # the last one of each object wins
        summaries = sorted(newest.values(), key=lambda s: (s.created, s.id))
    return [s.id for s in summaries]


async def copy_to_url(
    source: RepositoryStore,
    url: str,
    point_ids: Sequence[str],
    *,
    runtime: Runtime,
    retention: RetentionPolicy | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CopyReport:
    """Copy points to the repository at ``url``, then apply the copy's own retention to the
    objects copied (immediate and periodic copies, the CLI and the API all come here)."""
    backend = await backend_plugin(url).open(url, {"limiter": runtime.io})
    try:
        target = await RepositoryStore.open(backend)
        try:
            report = await copy_points(source, target, point_ids, runtime=runtime, progress=progress)
            if retention is not None:
                objects = sorted({(await target.manifest(p)).object for p in [*report.points, *report.skipped]})
                if objects:
                    pruned = await prune(target, retention, objects=objects)
                    report.pruned = pruned.removed
            return report
        finally:
            await target.close()
    finally:
        await backend.aclose()


async def _copy_chunks(source: RepositoryStore, digests: list[bytes], writer: object, level: int | None,
                       same_level: bool, runtime: Runtime, report: CopyReport) -> None:
    by_pack: dict[str, list[tuple[int, int, int, int, bytes]]] = {}
    for d in digests:
        loc = source.locate(d)
        if loc is None:
            raise CorruptionError(f"chunk {d.hex()[:16]} is missing from the source repository")
        key, off, n, raw_len, flags = loc
        by_pack.setdefault(key, []).append((off, n, raw_len, flags, d))
    out: list[tuple[bytes, bytes, int, int]] = []
    for key, items in by_pack.items():
        items.sort()
        data = await source.backend.get_ranges(key, [(off, n) for off, n, *_ in items])
        report.bytes_read += sum(len(x) for x in data)

        def encode(items: list[tuple[int, int, int, int, bytes]] = items, data: list[bytes] = data) -> list[tuple[bytes, bytes, int, int]]:
            res = []
            for (_, _, raw_len, flags, d), stored in zip(items, data):
                try:
                    payload, f = _reencode(stored, raw_len, flags, d, level, same_level)
                except CorruptionError as exc:
                    raise CorruptionError(f"{key}: {exc}; the copy stops rather than spread damage") from None
                res.append((d, payload, raw_len, f))
            return res

        out += await anyio.to_thread.run_sync(encode, limiter=runtime.cpu)
    await writer.add(out)  # type: ignore[attr-defined]
    report.chunks_copied += len(out)
    report.bytes_written += sum(len(p) for _, p, _, _ in out)


__all__ = ["CopyReport", "PruneReport", "Refusal", "RetentionPolicy", "copy_points", "prune"]
