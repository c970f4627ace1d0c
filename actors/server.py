"""BackupServer: the root actor. Owns the configuration, the proxies and repositories, and the
resource scheduler; starts a JobManager per job run.

Embedded use (no daemon)::

    async with running_server(ServerConfig(...)) as server:
        await server.add_repository(RepositorySettings(name="main", url="/srv/repo"))
        handle = await server.run_job(JobSpec(...))
        session = await handle.result()
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
from blockferry.actors.job import JobManager
from blockferry.actors.proxy import Proxy
from blockferry.actors.repository import Repository
from blockferry.errors import BlockferryError, ConfigError, ConflictError, NotFoundError, plain_errors
from blockferry.jobs.config import JobSpec, ProxyConfig, RepositorySettings, ServerConfig
from blockferry.jobs.messages import (
    AddProxy,
    AddRepository,
    DescribeRepository,
    FindRepository,
    Inventory,
    InventoryQuery,
    ProxyStatusQuery,
    ReleaseLock,
    RemoveProxy,
    RemoveRepository,
    RepositoryStatusQuery,
    RunJob,
    ServerInbox,
    ServerStatus,
    ServerStatusQuery,
    SessionResult,
    UpdateProxy,
    UpdateRepository,
)
from blockferry.jobs.slots import ResourceScheduler
from blockferry.repo.format import RepositoryConfig
from blockferry.repo.store import RepositoryStore
from blockferry.runtime.actor import Actor, Completion
from blockferry.runtime.resources import Runtime
from blockferry.runtime.throttle import BandwidthLimit


class JobHandle(msgspec.Struct):
    """A running job: ask its ``manager`` for status, await :meth:`result` for the session."""

    manager: JobManager
    done: Completion[SessionResult]

    async def result(self) -> SessionResult:
        return await self.done.wait()


class BackupServer(Actor[ServerInbox]):
    def __init__(self, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        super().__init__("server", mailbox_size=self.config.engine.mailbox_size)
        self.proxies: dict[str, Proxy] = {}
        self.repositories: dict[str, Repository] = {}
        #: each repository's settings as last given (its actor keeps its own copy)
        self.repository_settings: dict[str, RepositorySettings] = {}
        self.jobs: dict[str, JobManager] = {}
        #: the repository (by name) each running job uses
        self.job_repositories: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"<BackupServer proxies={list(self.proxies)} repositories={list(self.repositories)} jobs={list(self.jobs)}>"

    async def on_start(self) -> None:
        self.runtime = Runtime(self.config.engine)
        self.scheduler = ResourceScheduler()
        for p in self.config.proxies:
            await self._add_proxy(p)
        for r in self.config.repositories:
            await self._add_repository(r, None)

    async def handle(self, msg: ServerInbox) -> Any:
        match msg:
            case RunJob(spec=spec, throttles=throttles, session=session):
                return await self._run_job(spec, throttles, session)
            case AddRepository(settings=settings, store=store):
                return await self._add_repository(settings, store)
            case AddProxy(config=config):
                return await self._add_proxy(config)
            case UpdateProxy(config=config):
                return await self._update_proxy(config)
            case RemoveProxy(name=name):
                return await self._remove_proxy(name)
            case UpdateRepository(settings=settings):
                return await self._update_repository(settings)
            case RemoveRepository(name=name):
                return await self._remove_repository(name)
            case ServerStatusQuery():
                return ServerStatus(
                    proxies=[await p.ask(ProxyStatusQuery()) for p in self.proxies.values()],
                    repositories=[await r.ask(RepositoryStatusQuery()) for r in self.repositories.values()],
                    jobs=sorted(self.jobs), waiting_tasks=self.scheduler.waiting,
                )
            case FindRepository(name=name):
                return self.repositories.get(name)
            case InventoryQuery():
                return Inventory(repositories={name: self._users(name) for name in self.repositories},
                                 proxies={e.config.name: e.slots.load for e in self.scheduler.proxies})
        raise BlockferryError(f"{self.name}: unexpected message {type(msg).__name__}")

    async def _ask_child(self, child: Actor[Any], msg: Any) -> Any:
        """Ask a proxy or repository; one that does not answer in time is an engine error (not
        the server's failure)."""
        timeout = self.runtime.settings.ask_timeout
        try:
            return await child.ask(msg, timeout=timeout)
        except TimeoutError:
            raise BlockferryError(f"{child.name} did not answer in {timeout} s") from None

    async def _add_proxy(self, config: ProxyConfig) -> Proxy:
        if config.name in self.proxies:
            raise ConfigError(f"a proxy named {config.name!r} exists")
        proxy = await self.spawn(Proxy(config, self.runtime))
        self.proxies[config.name] = proxy
        self.scheduler.add_proxy(config, proxy)
        return proxy

    async def _add_repository(self, settings: RepositorySettings, store: RepositoryStore | None) -> Repository:
        if settings.name in self.repositories:
            raise ConfigError(f"a repository named {settings.name!r} exists")
        with plain_errors():  # a repository that cannot open is the caller's error, not the server's failure
            repo = await self.spawn(Repository(settings, self.runtime, store))
        self.repositories[settings.name] = repo
        self.repository_settings[settings.name] = settings
        self.scheduler.add_repository(settings.name, settings.max_tasks)
        return repo

    async def _update_proxy(self, config: ProxyConfig) -> Proxy:
        proxy = self.proxies.get(config.name)
        if proxy is None:
            raise NotFoundError(f"no proxy named {config.name!r}")
        await self._ask_child(proxy, UpdateProxy(config))
        self.scheduler.update_proxy(config)
        return proxy

    async def _remove_proxy(self, name: str) -> None:
        proxy = self.proxies.get(name)
        if proxy is None:
            raise NotFoundError(f"no proxy named {name!r}")
        self.scheduler.remove_proxy(name)  # ConflictError while it has tasks
        del self.proxies[name]
        await proxy.stop()

    def _users(self, repository: str) -> list[str]:
        return sorted(job for job, name in self.job_repositories.items() if name == repository)

    async def _update_repository(self, settings: RepositorySettings) -> Repository:
        repo = self.repositories.get(settings.name)
        if repo is None:
            raise NotFoundError(f"no repository named {settings.name!r}")
        if settings.url == self.repository_settings[settings.name].url:
            await self._ask_child(repo, UpdateRepository(settings))
            self.repository_settings[settings.name] = settings
            self.scheduler.update_repository(settings.name, settings.max_tasks)
            return repo
        await self._remove_repository(settings.name)  # a new location: open it afresh
        return await self._add_repository(settings, None)

    async def _remove_repository(self, name: str) -> None:
        repo = self.repositories.get(name)
        if repo is None:
            raise NotFoundError(f"no repository named {name!r}")
        if self._users(name):
            raise ConflictError(f"repository {name} is used by running job(s) {', '.join(self._users(name))}")
        self.scheduler.remove_repository(name)
        del self.repositories[name]
        del self.repository_settings[name]
        await repo.stop()

    def _find_repository(self, ref: str) -> str:
        """The name of the repository ``ref`` names or locates."""
        if ref in self.repositories:
            return ref
        name = next((n for n, s in self.repository_settings.items() if s.url == ref), None)
        if name is None:
            raise ConfigError(f"unknown repository {ref!r} (known: {', '.join(self.repositories) or 'none'})")
        return name

    async def _run_job(self, spec: JobSpec, throttles: list[BandwidthLimit] | None = None,
                       session: int | None = None) -> JobHandle:
        if spec.name in self.jobs:
            raise ConfigError(f"job {spec.name!r} is already running")
        name = self._find_repository(spec.repository)
        repo = self.repositories[name]
        cfg: RepositoryConfig = await self._ask_child(repo, DescribeRepository())
        done: Completion[SessionResult] = Completion()
        manager = JobManager(spec, repository=repo, repository_name=name, block_size=cfg.block_size,
                             level=cfg.zstd_level, scheduler=self.scheduler, runtime=self.runtime, done=done,
                             throttles=throttles, repo_immutable_days=cfg.immutable_days, session=session)
        self.jobs[spec.name] = manager
        self.job_repositories[spec.name] = name
        try:
            await self.spawn(manager)
        except BaseException:
            del self.jobs[spec.name]
            del self.job_repositories[spec.name]
            raise
        self.start_soon(self._forget_job, spec.name, done)
        return JobHandle(manager, done)

    async def _forget_job(self, name: str, done: Completion[SessionResult]) -> None:
        try:
            await done.wait()
        finally:
            manager = self.jobs.pop(name, None)
            repository = self.job_repositories.pop(name, None)
        if manager is not None and repository is not None and not self._users(repository) \
                and repository in self.repositories:
            # the last job using the repository is over: release its writer lock so that other
            # processes (an embedded backup, a restore) can use it between jobs. Queued before
            # anything a later job sends it, so that job's first task takes the lock again.
            try:
                await self.repositories[repository].tell(ReleaseLock())
            except BlockferryError:
                pass  # the repository is stopping: it unlocks as it stops

    # -- convenience for embedding ---------------------------------------------------------------

    async def add_repository(self, settings: RepositorySettings, store: RepositoryStore | None = None) -> Repository:
        return await self.ask(AddRepository(settings, store))

    async def add_proxy(self, config: ProxyConfig) -> Proxy:
        return await self.ask(AddProxy(config))

    async def run_job(self, spec: JobSpec, throttles: list[BandwidthLimit] | None = None) -> JobHandle:
        return await self.ask(RunJob(spec, throttles))

    async def status(self) -> ServerStatus:
        return await self.ask(ServerStatusQuery())


@asynccontextmanager
async def running_server(config: ServerConfig | None = None) -> AsyncIterator[BackupServer]:
    """Run a BackupServer for the duration of the block; it stops (draining) on exit."""
    async with anyio.create_task_group() as tg:
        server: BackupServer = await tg.start(BackupServer(config).run)
        try:
            yield server
        finally:
            with anyio.CancelScope(shield=True):
                await server.stop()
