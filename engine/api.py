"""The embedded Python API: every CLI operation, no daemon needed.

::

    import blockferry

    await blockferry.init_repository("/srv/repo")
    async with blockferry.open_repository("/srv/repo") as repo:
        session = await repo.backup(["vm1-disk0.img", "vm1-disk1.img"], name="vm1")
        points = await repo.points()
        await repo.restore(points[-1].id, "/restore/here")
        report = await repo.verify()

Everything runs on asyncio or trio (through anyio). Bad input (a missing source, a malformed
hint file, an unknown point) raises before anything is written.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from blockferry.datapath.blocks import PreparedChunks
from blockferry.datapath.hints import check_within, load_hints
from blockferry.datapath.prepare import prepare_chunks, wants_preparing
from blockferry.errors import ConfigError, NotFoundError, plain_errors
from blockferry.jobs.config import (
    DiskSpec,
    JobSpec,
    ObjectSpec,
    ProxyConfig,
    RepositorySettings,
    ServerConfig,
    expand_disks,
    validated,
)
from blockferry.jobs.messages import JobStatus, SessionResult
from blockferry.registry import backend_plugin, path_from_url, scheme_of, source_plugin
from blockferry.repo.archive import ArchiveReport, archive_points
from blockferry.repo.format import COMPRESSION_LEVELS, DEFAULT_BLOCK_SIZE, DiskRecord, Manifest, RepositoryConfig
from blockferry.repo.gc import GcReport, collect
from blockferry.repo.lifecycle import CopyReport, PruneReport, copy_to_url, points_to_copy, prune
from blockferry.repo.locks import LockInfo
from blockferry.repo.retention import RetentionPolicy
from blockferry.repo.store import PointSummary, RepositoryStore
from blockferry.repo.verify import RepairReport, VerifyReport, repair, verify
from blockferry.runtime.resources import Runtime
from blockferry.runtime.settings import EngineSettings

if TYPE_CHECKING:
    from blockferry.restore.files import RestoreResult

ProgressCallback = Callable[[JobStatus], None]

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _plain(fn: F) -> F:
    """Raise engine errors themselves, never wrapped in an exception group."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        with plain_errors():
            return await fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@_plain
async def init_repository(url: str, *, block_size: int = DEFAULT_BLOCK_SIZE, compression: str = "default",
                          immutable_days: int | None = None, pack_size: int | None = None,
                          backend_options: Mapping[str, Any] | None = None) -> RepositoryConfig:
    """Create a repository at ``url``. A local directory is created if missing and must be empty
    otherwise; a location that already holds a repository is refused. ``backend_options`` go
    to the backend plugin (for ``s3``: ``create_bucket``, ``object_lock``, endpoint and the
    other settings of docs/s3.md)."""
    if immutable_days is not None:
        _check_number("immutable_days", immutable_days, 1, 36500, integer=True)
    if scheme_of(url) == "file":
        path = path_from_url(url)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{path} exists and is not a directory")
        if path.is_dir() and any(path.iterdir()) and not (path / "config").exists():
            raise ConfigError(f"{path} is not empty; a new repository needs an empty or new directory")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create {path}: {exc.strerror}") from exc
    backend = await backend_plugin(url).open(url, dict(backend_options or {}))
    try:
        return await RepositoryStore.init(backend, block_size=block_size, compression=compression,
                                          immutable_days=immutable_days,
                                          **({"pack_size": pack_size} if pack_size else {}))
    finally:
        await backend.aclose()


@asynccontextmanager
async def open_repository(url: str, *, engine: EngineSettings | None = None,
                          proxies: Sequence[ProxyConfig] | None = None, max_tasks: int = 4,
                          backend_options: Mapping[str, Any] | None = None,
                          prepare: Mapping[str, str | os.PathLike[str]] | None = None) -> AsyncIterator[Repository]:
    """Open an existing repository (NotARepositoryError, UnsupportedFormatError otherwise).

    ``proxies`` and ``max_tasks`` shape backups made through this handle: by default one local
    proxy of 4 tasks and a repository limit of 4 tasks. ``backend_options`` go to the backend
    plugin (for ``s3``, the settings of docs/s3.md). ``prepare`` announces the changed-extent
    hints (source → file) of the backup about to be made: a remote repository compresses their
    blocks on the idle core while it opens (engine/datapath/prepare.py), for that backup only.
    """
    _check_number("max_tasks", max_tasks, 1, None, integer=True)  # 0 would wait forever for a slot
    runtime = Runtime(engine)
    budget = runtime.settings.prepare_bytes
    level = COMPRESSION_LEVELS["default"]
    if not prepare or not wants_preparing(url, prepare, budget) or level is None:
        async with _opened(url, runtime, proxies, max_tasks, backend_options, None) as repo:
            yield repo
        return
    chunks = PreparedChunks(level, budget)
    with plain_errors():  # the task group must not change which error a caller sees
        async with anyio.create_task_group() as tg:
            tg.start_soon(prepare_chunks, chunks, {str(k): str(v) for k, v in prepare.items()}, DEFAULT_BLOCK_SIZE)
            try:
                async with _opened(url, runtime, proxies, max_tasks, backend_options, chunks) as repo:
                    yield repo
            finally:
                chunks.clear()
                tg.cancel_scope.cancel()


@asynccontextmanager
async def _opened(url: str, runtime: Runtime, proxies: Sequence[ProxyConfig] | None, max_tasks: int,
                  backend_options: Mapping[str, Any] | None, chunks: PreparedChunks | None) -> AsyncIterator[Repository]:
    backend = await backend_plugin(url).open(url, {**(backend_options or {}), "limiter": runtime.io})
    try:
        store = await RepositoryStore.open(backend)
        if chunks is not None:
            if (store.config.block_size, store.config.zstd_level) == (DEFAULT_BLOCK_SIZE, chunks.level):
                store.index.prepared = chunks
            else:  # prepared for the default settings, which this repository does not use
                chunks.clear()
        repo = Repository(url, store, runtime, list(proxies) if proxies else None, max_tasks)
        try:
            yield repo
        finally:
            with anyio.CancelScope(shield=True):
                await store.close()
    finally:
        await backend.aclose()


class Repository:
    """An open repository (see :func:`open_repository`)."""

    def __init__(self, url: str, store: RepositoryStore, runtime: Runtime, proxies: list[ProxyConfig] | None,
                 max_tasks: int) -> None:
        self.url = url
        self.store = store
        self.runtime = runtime
        self.proxies = proxies
        self.max_tasks = max_tasks

    def __repr__(self) -> str:
        return f"<blockferry.Repository {self.url}>"

    @property
    def config(self) -> RepositoryConfig:
        return self.store.config

    @_plain
    async def points(self, object: str | None = None) -> list[PointSummary]:
        """Restore points, oldest first (only those of ``object`` if given)."""
        return [s for s in await self.store.summaries() if object is None or s.object == object]

    @_plain
    async def point(self, ref: str = "latest", *, object: str | None = None) -> Manifest:
        """A restore point by id, unique id prefix, or ``latest``."""
        return await self.store.manifest(await self.store.resolve_point(ref, object_name=object))

    @_plain
    async def backup(
        self,
        sources: Sequence[str | DiskSpec],
        *,
        name: str | None = None,
        hints: Mapping[str, str | os.PathLike[str]] | None = None,
        job: str | None = None,
        retries: int = 2,
        retry_delay: float = 1.0,
        immutable_days: int | None = None,
        retention: RetentionPolicy | None = None,
        progress: ProgressCallback | None = None,
        progress_interval: float = 0.5,
    ) -> SessionResult:
        """Back up ``sources`` (the disks of one object, named ``name`` or after the first
        source) into one new restore point. ``hints`` maps a source to its changed-extent file.

        Returns the session; its ``state`` says whether it succeeded. Bad input raises first.
        """
        if not sources:
            raise ConfigError("nothing to back up: give at least one source")
        given = [s.source if isinstance(s, DiskSpec) else str(s) for s in sources]
        twice = sorted({s for s in given if given.count(s) > 1})
        if twice:
            raise ConfigError(f"source {twice[0]!r} is given more than once")
        _check_number("retries", retries, 0, None, integer=True)
        _check_number("retry_delay", retry_delay, 0, None)
        hints = {str(k): str(v) for k, v in (hints or {}).items()}
        disks = [s if isinstance(s, DiskSpec) else DiskSpec(source=str(s), hints=hints.pop(str(s), None)) for s in sources]
        if hints:
            raise ConfigError(f"changed extents given for {', '.join(hints)}, which is not among the sources")
        obj = name or disks[0].name or source_plugin(disks[0].source).disk_name(disks[0].source)
        disks = await expand_disks(disks, strict=True)  # a VM by its QMP socket: one spec per disk
        await self._preflight(disks)
        spec = validated(JobSpec(name=job or f"backup {obj}", repository=_label(self.url),
                                 objects=[ObjectSpec(name=obj, disks=disks)], retries=retries,
                                 retry_delay=retry_delay, immutable_days=immutable_days, retention=retention))
        try:
            return await self.run_job(spec, progress=progress, progress_interval=progress_interval)
        finally:
            if self.store.index.prepared is not None:  # prepared for this backup only
                self.store.index.prepared.clear()
                self.store.index.prepared = None
            with anyio.CancelScope(shield=True):
                await self.store.unlock()  # the writer lock is held only while backing up

    @_plain
    async def run_job(self, spec: JobSpec, *, progress: ProgressCallback | None = None,
                      progress_interval: float = 0.5) -> SessionResult:
        """Run a whole job (several objects) against this repository, in an embedded server."""
        # loaded by the first backup: 10 ms of imports (the actors, the plan, the scheduler of
        # resources) that the commands which only read (points, restore, verify, prune...) skip
        from blockferry.actors.server import running_server

        validated(spec)
        # the embedded proxy runs here: it reaches local files and local QEMU sockets alike, and
        # the Ceph clusters whose configuration it is given (an RBD URL's ?conf=)
        local = ProxyConfig(name="local", max_tasks=self.max_tasks, transports=["file", "qemu", "rbd"])
        cfg = ServerConfig(proxies=self.proxies or [local],
                           engine=self.runtime.settings)
        async with running_server(cfg) as server:
            await server.add_repository(RepositorySettings(name=spec.repository, url=self.url, max_tasks=self.max_tasks),
                                        self.store)
            handle = await server.run_job(spec)
            if progress is None:
                return await handle.result()
            async with anyio.create_task_group() as tg:
                async def report() -> None:
                    while True:
                        progress(handle.manager.status())
                        await anyio.sleep(progress_interval)

                tg.start_soon(report)
                result = await handle.result()
                tg.cancel_scope.cancel()
            progress(handle.manager.status())
            return result

    async def _preflight(self, disks: list[DiskSpec]) -> None:
        """Open every source and read every hint file once, so bad input fails before anything
        is written; then take the writer lock (RepositoryLockedError if a live process has it).
        A config whose block size is not the points' is refused first (CorruptionError)."""
        await self.store.check_block_size()
        for d in disks:
            extents = load_hints(d.hints) if d.hints else None
            disk = await source_plugin(d.source).open(d.source, d.options)
            try:
                if extents is not None:
                    check_within(extents, disk.size, d.hints or d.source)
            finally:
                await disk.aclose()
        await self.store.lock("backup")

    @_plain
    async def restore(
        self,
        point: str,
        to: str | os.PathLike[str],
        *,
        disk: str | None = None,
        overwrite: bool = False,
        allow_damaged: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> list[RestoreResult]:
        """Restore a point's disks (or only ``disk``) as image files named after the disks in
        the directory ``to`` (created if missing)."""
        m = await self.point(point)
        disks = [m.disk(disk)] if disk else m.disks
        out = Path(to)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create {out}: {exc.strerror}") from exc
        # loaded by the first restore: 5.6 ms of imports (tempfile, random...) a backup skips
        from blockferry.restore.files import restore_disks

        async with self.store.reading("restore"):
            await self.store.load_index()
            await self.store.find_unindexed(self.store.referenced(m))
            await self.store.prepare_read([m], self.archive_progress)
            return await restore_disks(self.store, m, disks, [out / d.name for d in disks], runtime=self.runtime,
                                       overwrite=overwrite, allow_damaged=allow_damaged, progress=progress)

    async def point_disk(self, point: str, disk: str | None = None) -> tuple[Manifest, DiskRecord]:
        """A point and one of its disks: ``disk`` by name, or the only one."""
        m = await self.point(point)
        if disk is None:
            if len(m.disks) != 1:
                raise ConfigError(f"point {m.id} has {len(m.disks)} disks: name the one to restore")
            return m, m.disks[0]
        return m, m.disk(disk)

    @_plain
    async def restore_onto(self, point: str, target: str | os.PathLike[str], *, disk: str | None = None,
                           progress: Callable[[int], None] | None = None) -> RestoreResult:
        """Restore one disk onto an existing image file or block device, overwriting it."""
        m, record = await self.point_disk(point, disk)
        from blockferry.restore.files import restore_disk  # 5.6 ms a backup skips, as in restore

        async with self.store.reading("restore"):
            await self.store.load_index()
            await self.store.find_unindexed(self.store.referenced(m))
            await self.store.prepare_read([m], self.archive_progress)
            return await restore_disk(self.store, m, record, Path(target), runtime=self.runtime, into_existing=True,
                                      progress=progress)

    #: called with a message while packs come back from an archive tier (default: logged only)
    archive_progress: Callable[[str], None] | None = None

    @_plain
    async def archive(self, *, older_than_days: float | None = None, points: Sequence[str] | None = None,
                      storage_class: str | None = None, back: bool = False,
                      progress: Callable[[str], None] | None = None) -> ArchiveReport:
        """Move the packs of old points (created more than ``older_than_days`` days ago, or
        ``points``) to an archive storage class, or ``back`` to STANDARD; see engine/repo/archive.py."""
        if older_than_days is not None:
            _check_number("older_than_days", older_than_days, 0, None)
        await self.store.lock("archive")
        try:
            return await archive_points(self.store, older_than_days=older_than_days, points=points,
                                        storage_class=storage_class, back=back, progress=progress)
        finally:
            await self.store.unlock()

    @_plain
    async def prune(self, policy: RetentionPolicy, *, object: str | None = None, dry_run: bool = False,
                    now: dt.datetime | None = None) -> PruneReport:
        """Remove the points ``policy`` does not keep (only ``object``'s if given); immutable
        points are always kept. ``dry_run`` decides without removing. The space comes back with
        :meth:`gc`."""
        return await prune(self.store, policy, objects=[object] if object else None, dry_run=dry_run, now=now)

    @_plain
    async def delete(self, point: str) -> str:
        """Remove one restore point (ImmutableError while it is immutable). Returns its id."""
        pid = await self.store.resolve_point(point)
        await self.store.delete_point(pid)
        return pid

    @_plain
    async def gc(self, *, rewrite_threshold: float = 0.5, wait: float = 0.0,
                 progress: Callable[[str], None] | None = None) -> GcReport:
        """Free the space of chunks no point references (see engine/repo/gc.py for why it is safe
        while backups run)."""
        _check_number("rewrite_threshold", rewrite_threshold, 0, 1)
        _check_number("wait", wait, 0, None)
        return await collect(self.store, rewrite_threshold=rewrite_threshold, wait=wait, progress=progress)

    @_plain
    async def copy_to(self, target: str, points: Sequence[str] | None = None, *, latest: bool = False,
                      retention: RetentionPolicy | None = None,
                      progress: Callable[[int, int], None] | None = None) -> CopyReport:
        """Copy points (ids, prefixes or 'latest'; all of them by default, or with ``latest`` the
        newest of each object, as a periodic copy does) to the repository at ``target``, sending
        only the chunks it lacks; then apply the copy's own ``retention`` there."""
        if points is not None:
            ids = [await self.store.resolve_point(p) for p in points]
        else:
            ids = await points_to_copy(self.store, latest=latest)
        return await copy_to_url(self.store, target, ids, runtime=self.runtime, retention=retention,
                                 progress=progress)

    @_plain
    async def verify(self, *, sample: float | None = None,
                     progress: Callable[[int, int], None] | None = None) -> VerifyReport:
        """Re-read and hash every chunk any restore point references (or ``sample`` percent of
        them); record what is damaged in the repository's health record."""
        if sample is not None and not (isinstance(sample, (int, float)) and 0 < sample <= 100):  # NaN too
            raise ConfigError(f"sample takes a percentage above 0 and at most 100, not {sample!r}")
        return await verify(self.store, self.runtime, sample=sample, progress=progress)

    @_plain
    async def break_lock(self) -> LockInfo | None:
        """Remove the writer lock left by a process that is gone (``blockferry unlock``); returns
        the lock's holder, or None if the repository was not locked. Never for a live holder: it
        would go on writing as if it still held the lock."""
        return await self.store.break_lock()

    @_plain
    async def repair(self) -> RepairReport:
        """Rebuild the index from the packs; report unreadable packs and the points they hurt."""
        return await repair(self.store, self.runtime)


def _label(url: str) -> str:
    """The name the embedded server gives the repository at ``url`` (in messages): its last path
    component, as a configuration name allows."""
    tail = url.rstrip("/").rsplit("/", 1)[-1]
    name = "".join(c for c in tail if c.isprintable())[:200]
    return name or "repository"


def _check_number(name: str, value: Any, low: float | None, high: float | None, *, integer: bool = False,
                  above: bool = False) -> None:
    """ConfigError unless ``value`` is a finite number (an int with ``integer``) within
    ``low``..``high`` (``low`` excluded with ``above``)."""
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{name} must be {'a whole' if integer else 'a finite'} number, not {value!r}")
    if low is not None and (value < low or (above and value == low)):
        raise ConfigError(f"{name} must be {'more than' if above else 'at least'} {low}, not {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{name} must be at most {high}, not {value!r}")


__all__ = ["Repository", "init_repository", "open_repository", "NotFoundError"]
