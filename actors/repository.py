"""Repository: owns one repository's store, runs target movers (at most ``max_tasks`` at once),
checks availability before tasks start, and commits restore points.

Everything else done on the store goes through it too, as messages: a job's retention
(``ApplyRetention``), backup copies (``CopyPoints``) and lifecycle runs (``RunLifecycle``). Those
take long, so each runs in a helper task of the actor (the reply is a ``Running``) while it goes on
serving the backups that use the repository meanwhile.
"""

from __future__ import annotations

from typing import Any

import anyio
from blockferry.actors._host import MoverHost
from blockferry.actors.target_mover import TargetMover
from blockferry.errors import BlockferryError, NotFoundError, RepositoryError, RepositoryUnavailableError
from blockferry.jobs.config import RepositorySettings
from blockferry.jobs.maintenance import run_copy, run_lifecycle
from blockferry.jobs.messages import (
    ApplyRetention,
    Availability,
    CheckAvailable,
    CommitPoint,
    CopyPoints,
    DescribeRepository,
    FindBase,
    OpenTarget,
    Outcome,
    ReleaseLock,
    RepositoryInbox,
    RepositoryStatus,
    RepositoryStatusQuery,
    RunLifecycle,
    SessionResult,
    UpdateRepository,
)
from blockferry.registry import backend_plugin
from blockferry.repo.format import DiskRecord
from blockferry.repo.lifecycle import CopyReport, prune
from blockferry.repo.store import CONFIG_KEY, RepositoryStore
from blockferry.runtime.actor import Actor, Completion
from blockferry.runtime.resources import Runtime
from blockferry.units import human


async def repository_work(repository: Actor[RepositoryInbox], msg: ApplyRetention | CopyPoints | RunLifecycle,
                          *, timeout: float | None) -> Any:
    """Ask a repository actor for work on its store and wait for the outcome (see
    :meth:`~blockferry.runtime.actor.Actor.ask_work`); ``timeout`` bounds the ask, not the work."""
    try:
        return await repository.ask_work(msg, timeout=timeout)
    except TimeoutError:
        raise RepositoryUnavailableError(f"{repository.name} did not take the request in {timeout} s") from None


async def copy_points(repository: Actor[RepositoryInbox], order: CopyPoints, *, timeout: float | None) -> CopyReport:
    """Have a repository actor make a backup copy and wait for it: a backup job's immediate
    copies, the scheduler's periodic ones (and, in the actor, a ``copy`` lifecycle job's) all go
    through ``CopyPoints``."""
    report: CopyReport = await repository_work(repository, order, timeout=timeout)
    return report


class Repository(MoverHost[RepositoryInbox]):
    def __init__(self, settings: RepositorySettings, runtime: Runtime, store: RepositoryStore | None = None) -> None:
        super().__init__(f"repository:{settings.name}", max_tasks=settings.max_tasks,
                         mailbox_size=runtime.settings.mailbox_size)
        self.settings = settings
        self.runtime = runtime
        self.store = store
        self._own_store = store is None

    def __repr__(self) -> str:
        return f"<Repository {self.settings.name} {self.settings.url} tasks={self.load}/{self.settings.max_tasks}>"

    async def on_start(self) -> None:
        if self.store is None:
            backend = await backend_plugin(self.settings.url).open(
                self.settings.url, {**self.settings.options, "limiter": self.runtime.io})
            try:
                self.store = await RepositoryStore.open(backend)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await backend.aclose()
                raise
        await self.store.load_index()

    async def on_stop(self) -> None:
        await self._release_store()

    async def on_failed(self, error: BaseException) -> None:
        # failed for good (its index would not load, say): nothing will use the store again
        await self._release_store()

    async def _release_store(self) -> None:
        store = self.store
        if store is not None and self._own_store:
            # the backend this actor opened goes with it (an S3 client's connections, say)
            self.store = None
            try:
                await store.close()
            finally:
                await store.backend.aclose()
        elif store is not None:
            await store.unlock()

    async def handle(self, msg: RepositoryInbox) -> Any:
        store = self.store
        assert store is not None
        match msg:
            case CheckAvailable():
                return await self._check_available(store)
            case OpenTarget(task=task, inbox=inbox):
                done: Completion[DiskRecord] = Completion()
                # the source mover deduplicates against this index before compressing
                task.index = store.index
                return await self.host(TargetMover(task, inbox, store, self.runtime, done), done)
            case FindBase(object=obj, disk=disk):
                found = await store.latest_disk(obj, disk)
                if found is None:
                    return None
                return found[0], found[1], store.unhealthy_runs(found[1])
            case CommitPoint(manifest=manifest):
                await store.commit(manifest)
                self.log.info("point_committed", point=manifest.id, object=manifest.object, disks=len(manifest.disks))
                return manifest.id
            case ReleaseLock():
                if self.load == 0:
                    await store.unlock()
                return None
            case RepositoryStatusQuery():
                return RepositoryStatus(name=self.settings.name, url=self.settings.url, load=self.load,
                                        peak=self.peak, max_tasks=self.settings.max_tasks, chunks=len(store.index))
            case UpdateRepository(settings=settings):
                if settings.url != self.settings.url:
                    raise BlockferryError(f"{self.name}: a new URL opens a new repository actor")
                self.settings, self.max_tasks = settings, settings.max_tasks
                return None
            case DescribeRepository():
                return store.config
            case ApplyRetention(policy=policy, objects=objects):
                return self.start_work(lambda: prune(store, policy, objects=objects), f"{self.name}: retention")
            case CopyPoints() as order:
                return self.start_work(lambda: run_copy(store, self.runtime, order),
                                       f"{self.name}: copy to {order.to}")
            case RunLifecycle(spec=spec, job=job, started=started, say=say):
                async def lifecycle() -> tuple[Outcome, SessionResult]:
                    result = SessionResult(job=job, started=started)
                    return await run_lifecycle(spec, store, self.runtime, result, say=say), result

                return self.start_work(lifecycle, f"{self.name}: {spec.type} job {job}")
        raise BlockferryError(f"{self.name}: unexpected message {type(msg).__name__}")

    async def _check_available(self, store: RepositoryStore) -> Availability:
        """Reachable, writable, not locked by another writer, enough free space; the reason
        otherwise. Takes the writer lock (held until the last job using the repository ends:
        the server sends ReleaseLock, or until the repository actor stops)."""
        backend = store.backend
        try:
            await backend.stat(CONFIG_KEY)
        except (NotFoundError, RepositoryError) as exc:
            raise RepositoryUnavailableError(f"repository {self.settings.name} is not reachable: {exc}") from exc
        try:
            await backend.check_writable()
        except RepositoryError as exc:
            raise RepositoryUnavailableError(f"repository {self.settings.name} is not writable: {exc}") from exc
        try:
            await store.lock("backup")
        except RepositoryError as exc:
            raise RepositoryUnavailableError(f"repository {self.settings.name} is locked: {exc}") from exc
        free = await backend.free_space()
        if free is not None and free < self.settings.min_free_bytes:
            raise RepositoryUnavailableError(
                f"repository {self.settings.name} at {backend.url} has {human(free)} free, "
                f"less than the {human(self.settings.min_free_bytes)} required"
            )
        return Availability(url=backend.url, free_bytes=free)
