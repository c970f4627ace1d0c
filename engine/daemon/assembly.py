"""The daemon: a BackupServer, a Scheduler, the state database and the control socket, together.

:class:`Daemon` is usable in-process (tests, an application that wants the socket too) and is
what ``blockferry daemon`` runs. Its life:

1. take the locks (``daemon.lock`` in the state directory and ``SOCKET.lock`` beside the socket:
   a second daemon on either refuses to start; ``flock`` locks vanish with their process, so a
   daemon killed with -9 leaves nothing to clean up);
2. open ``state.db`` (migrating it), mark sessions left ``running`` by a dead daemon as failed,
   merge the seed TOML file (if any) into the stored configuration;
3. start the BackupServer with the configured proxies and repositories, the Scheduler (which
   reports runs missed while the daemon was down and runs at most one per job), then the socket;
4. on SIGTERM/SIGINT (or :meth:`Daemon.shutdown`): stop accepting clients, stop every running
   job (a job stops between restore points: no half point; slots are released as tasks end),
   record the sessions as stopped, stop the actors, exit. SIGHUP (or the ``config.reload``
   request) re-reads the seed file and applies it.

Configuration changes (``repo.add``, ``job.set``, ``config.apply``...) go through one path,
:meth:`Daemon.change`: the whole new configuration is validated, then applied to the running
actors (new repositories are opened first, so an unreachable one refuses the change), then
stored in one transaction. One change at a time.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import anyio
import msgspec
from blockferry import __version__
from blockferry.actors.scheduler import Scheduler
from blockferry.actors.server import BackupServer
from blockferry.api import init_repository
from blockferry.daemon.client import default_paths, default_socket
from blockferry.daemon.control import AccessPolicy, ControlServer, resolve_group
from blockferry.daemon.protocol import (
    ApplyParams,
    ClockParams,
    NameParams,
    SessionListParams,
    SessionShowParams,
    SetParams,
    SettingsParams,
    StopParams,
    UnknownMethodError,
)
from blockferry.errors import BlockferryError, ConfigError, ConflictError, FieldError, NotFoundError, plain_errors
from blockferry.jobs.calendars import Clock, ManualClock, SystemClock
from blockferry.jobs.catalog import (
    KINDS,
    Catalog,
    JobConfig,
    Settings,
    catalog_from_data,
    catalog_to_data,
    check,
    convert,
    item_from_data,
    item_to_data,
    load_toml,
    parse_sizes,
    repository_from_data,
)
from blockferry.jobs.config import RepositorySettings, ServerConfig
from blockferry.jobs.messages import (
    Inventory,
    InventoryQuery,
    RemoveProxy,
    RemoveRepository,
    RunNow,
    SchedulerStatus,
    SchedulerStatusQuery,
    SessionProgress,
    SessionProgressQuery,
    SetJobs,
    StopAll,
    StopRun,
    UpdateProxy,
    UpdateRepository,
)
from blockferry.jobs.statedb import StateDB
from blockferry.log import LEVELS, configure, get_logger
from blockferry.registry import backend_plugin
from blockferry.repo.format import stats_dict
from blockferry.repo.store import CONFIG_KEY
from blockferry.runtime.events import EventBus
from blockferry.runtime.settings import EngineSettings
from blockferry.runtime.throttle import Throttle

log = get_logger(actor="daemon")


class DaemonOptions(msgspec.Struct, kw_only=True):
    socket: Path
    state_dir: Path
    #: TOML file merged into the stored configuration at start and on reload
    seed: Path | None = None
    allowed_users: list[str] = msgspec.field(default_factory=list)
    allowed_groups: list[str] = msgspec.field(default_factory=list)
    #: group owning the socket (mode 0660 then), so its members can connect
    socket_group: str | None = None
    max_clients: int = 64
    #: connections of one user at once (root and the daemon's user have a pool of their own)
    max_clients_per_user: int = 16
    #: seconds a connection may stay without a request in progress or a subscription
    idle_timeout: float = 600.0
    #: seconds within which a frame begun must arrive whole
    frame_timeout: float = 10.0
    engine: EngineSettings = msgspec.field(default_factory=EngineSettings)
    #: seconds between progress events of a running session
    progress_interval: float = 0.5
    #: seconds a stopping job may take at shutdown before it is cancelled
    stop_timeout: float = 60.0


class LockedError(ConflictError):
    """Another daemon holds this state directory or socket."""


def _lock(path: Path, what: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise LockedError(f"another blockferry daemon (pid {holder}) is using {what} {path.parent if what == 'state directory' else path.with_suffix('')}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class _Tee:
    """A file for structlog's PrintLogger that writes each line to several files."""

    def __init__(self, *files: TextIO) -> None:
        self.files = files

    def write(self, text: str) -> None:
        for f in self.files:
            try:
                f.write(text)
            except (OSError, ValueError):
                pass

    def flush(self) -> None:
        for f in self.files:
            try:
                f.flush()
            except (OSError, ValueError):
                pass


def configure_logging(log_file: Path, *, level: str, stderr: bool, bus: EventBus,
                      extra: list[Any] | None = None) -> TextIO:
    """structlog JSON lines to ``log_file`` (and stderr in the foreground), each also offered to
    ``log`` subscribers; ``extra`` processors run first. Returns the open log file. (A job run's
    lines name its session: the scheduler gives it to the run, whose actors bind it.)"""
    f = open(log_file, "a", buffering=1)
    configure(level=level if level in LEVELS else "info", json=True, file=_Tee(f, sys.stderr) if stderr else f,
              extra=[*(extra or ()), bus.log_processor], cache=False)  # type: ignore[arg-type]
    return f


class Daemon:
    """Everything ``blockferry daemon`` runs; see the module docstring."""

    def __init__(self, options: DaemonOptions, *, clock: Clock | None = None, bus: EventBus | None = None) -> None:
        self.options = options
        self.clock = clock or SystemClock()
        self.bus = bus or EventBus()
        self.catalog = Catalog()
        self.throttle = Throttle(0, name="global")
        self.started = time.time()
        self._change_lock = anyio.Lock()
        self._stop = anyio.Event()
        #: set once :meth:`run` has returned (stopped or failed)
        self.stopped = anyio.Event()
        self._fds: list[int] = []
        self.server: Any = None
        self.scheduler: Any = None
        self.control: ControlServer | None = None
        self.db: StateDB | None = None
        self.unavailable: dict[str, str] = {}  #: repositories that could not be opened: why

    def __repr__(self) -> str:
        return f"<Daemon {self.options.socket} state={self.options.state_dir}>"

    def shutdown(self) -> None:
        """Ask the daemon to stop (what SIGTERM does): running jobs stop cleanly, then
        :meth:`run` returns. Cancelling :meth:`run` instead is abrupt (the actors are cancelled
        where they are; sessions left running are marked failed at the next start)."""
        self._stop.set()

    async def run(self, *, handle_signals: bool = False,
                  task_status: anyio.abc.TaskStatus[Any] = anyio.TASK_STATUS_IGNORED) -> None:
        o = self.options
        o.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        o.socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fds = [_lock(o.state_dir / "daemon.lock", "state directory"),
                     _lock(o.socket.with_name(o.socket.name + ".lock"), "socket")]
        try:
            if o.socket.exists() or o.socket.is_symlink():
                o.socket.unlink()  # a stale socket of a dead daemon: we hold its lock
            self.db = await StateDB.open(o.state_dir / "state.db")
            failed = await self.db.fail_running("the daemon stopped while the session ran (it was killed or crashed)",
                                                self.clock.now().isoformat())
            for sid in failed:
                log.warning("session_failed_at_start", session=sid)
            self.catalog = await self.db.load_catalog()
            if o.seed is not None:
                seeded, _ = self._merge(self.catalog, load_toml(o.seed))
                await self.db.save_catalog(seeded)
                self.catalog = seeded
            self.throttle.set_rate(self.catalog.settings.throttle)
            access = AccessPolicy(o.allowed_users, o.allowed_groups)
            group = resolve_group(o.socket_group) if o.socket_group else None
            with plain_errors():  # a start-up refusal is raised as itself, not in a group
                await self._serve(access=access, group=group, handle_signals=handle_signals,
                                  failed=failed, task_status=task_status)
        finally:
            with anyio.CancelScope(shield=True):
                if self.db is not None:
                    await self.db.close()
            for fd in self._fds:
                os.close(fd)
            self.stopped.set()
            log.info("daemon_stopped")

    async def _serve(self, *, access: AccessPolicy, group: int | None, handle_signals: bool, failed: list[int],
                     task_status: anyio.abc.TaskStatus[Any]) -> None:
        o = self.options
        assert self.db is not None
        async with anyio.create_task_group() as tg:
            self.server = await tg.start(BackupServer(ServerConfig(proxies=[], repositories=[],
                                                                   engine=o.engine)).run)
            for p in self.catalog.proxies:
                await self.server.add_proxy(p)
            for r in self.catalog.repositories:
                await self._open_repository(r, quiet=True)
            self.scheduler = Scheduler(server=self.server, db=self.db, bus=self.bus, clock=self.clock,
                                       throttle=self.throttle, jobs=self.catalog.jobs,
                                       sources=self.catalog.sources, progress_interval=o.progress_interval,
                                       prepare=self._prepare)
            await tg.start(self.scheduler.run)
            self.control = ControlServer(o.socket, handler=self._handle, bus=self.bus, access=access,
                                         mode=0o660 if group is not None else 0o600, group=group,
                                         max_clients=o.max_clients, max_clients_per_user=o.max_clients_per_user,
                                         idle_timeout=o.idle_timeout, frame_timeout=o.frame_timeout,
                                         server_name=f"blockferry {__version__}")
            await tg.start(self.control.run)
            if handle_signals:
                tg.start_soon(self._signals)
            log.info("daemon_started", socket=str(o.socket), state_dir=str(o.state_dir), pid=os.getpid(),
                     jobs=len(self.catalog.jobs), sessions_failed=len(failed))
            task_status.started(self)
            await self._stop.wait()
            log.info("daemon_stopping")
            self.control.close()
            idle = await self.scheduler.ask(StopAll("the daemon is shutting down"))
            with anyio.move_on_after(o.stop_timeout):
                await idle.wait()
            await self.scheduler.stop()
            await self.server.stop()
            tg.cancel_scope.cancel()

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    try:
                        await self.reload()
                    except BlockferryError as exc:
                        log.warning("reload_refused", error=str(exc))
                else:
                    log.info("signal_received", signal=signal.Signals(signum).name)
                    self.shutdown()

    # -- configuration ---------------------------------------------------------------------------

    def _merge(self, cat: Catalog, data: dict[str, Any]) -> tuple[Catalog, dict[str, Any]]:
        """``cat`` with the items of ``data`` added or replacing those of the same name."""
        new, inits = catalog_from_data(data)
        lists = {}
        for kind in KINDS.values():
            items = {i.name: i for i in getattr(cat, kind.attr)}
            for i in getattr(new, kind.attr):
                items[i.name] = i
            lists[kind.attr] = list(items.values())
        settings = new.settings if "settings" in data else cat.settings
        merged = Catalog(**lists, settings=settings)
        check(merged)
        return merged, inits

    async def reload(self) -> dict[str, Any]:
        """Re-read the seed file (if any) and the database, and apply them."""
        async def mutate(cat: Catalog) -> Catalog:
            assert self.db is not None
            stored = await self.db.load_catalog()
            if self.options.seed is not None:
                stored, _ = self._merge(stored, load_toml(self.options.seed))
            return stored
        await self.change(mutate)
        log.info("config_reloaded", seed=str(self.options.seed) if self.options.seed else None)
        return {"reloaded": True}

    async def change(self, mutate: Callable[[Catalog], Any], inits: dict[str, Any] | None = None) -> Catalog:
        """Validate ``mutate(current)`` as a whole, apply it to the actors, store it. Nothing
        changes if any step refuses."""
        assert self.db is not None
        async with self._change_lock:
            old = self.catalog
            new = mutate(old)
            if hasattr(new, "__await__"):
                new = await new
            check(new)
            await self._apply(old, new, inits or {})
            await self.db.save_catalog(new)
            self.catalog = new
            self.throttle.set_rate(new.settings.throttle)
            await self.scheduler.ask(SetJobs(new.jobs, new.sources))
            return new

    async def _apply(self, old: Catalog, new: Catalog, inits: dict[str, Any]) -> None:
        old_repos = {r.name: r for r in old.repositories}
        new_repos = {r.name: r for r in new.repositories}
        old_proxies = {p.name: p for p in old.proxies}
        new_proxies = {p.name: p for p in new.proxies}
        # refusals first, before anything is touched
        have: Inventory = await self.server.ask(InventoryQuery())
        for name, r in old_repos.items():
            if (name not in new_repos or new_repos[name].url != r.url) and name in have.repositories:
                users = have.repositories[name]
                if users:
                    raise ConflictError(f"repository {name} is in use by running job(s) {', '.join(users)}")
        for name in old_proxies.keys() - new_proxies.keys():
            if have.proxies.get(name):
                raise ConflictError(f"proxy {name} is running tasks; stop them or wait")
        # open what is new (may refuse: unreachable, not a repository)
        opened: list[str] = []
        replaced: list[RepositorySettings] = []
        try:
            for name, r in new_repos.items():
                if name not in old_repos or old_repos[name].url != r.url:
                    if name in inits and inits[name].create:
                        await self._create_repository(r, inits[name])
                    if name in have.repositories:
                        await self.server.ask(RemoveRepository(name))
                        replaced.append(old_repos[name])
                    await self._open_repository(r, quiet=False)
                    opened.append(name)
        except BaseException:
            with anyio.CancelScope(shield=True):
                for name in opened:
                    try:
                        await self.server.ask(RemoveRepository(name))
                    except BlockferryError:
                        pass
                for before in replaced:  # back to where it was
                    await self._open_repository(before, quiet=True)
            raise
        for name, r in new_repos.items():
            if name in old_repos and old_repos[name].url == r.url and old_repos[name] != r \
                    and name in have.repositories:
                await self.server.ask(UpdateRepository(r))
        for name in old_repos.keys() - new_repos.keys():
            self.unavailable.pop(name, None)
            if name in have.repositories:
                await self.server.ask(RemoveRepository(name))
        for name, p in new_proxies.items():
            if name not in old_proxies:
                await self.server.add_proxy(p)
            elif old_proxies[name] != p:
                await self.server.ask(UpdateProxy(p))
        for name in old_proxies.keys() - new_proxies.keys():
            await self.server.ask(RemoveProxy(name))

    async def _create_repository(self, r: RepositorySettings, init: Any) -> None:
        try:
            backend = await backend_plugin(r.url).open(r.url, dict(r.options))
        except BlockferryError:
            exists = False  # init_repository says what is wrong with the location
        else:
            try:
                exists = await backend.exists(CONFIG_KEY)
            except BlockferryError:
                exists = False
            finally:
                await backend.aclose()
        if not exists:
            await init_repository(r.url, block_size=init.block_size, compression=init.compression,
                                  backend_options=r.options)
            log.info("repository_created", repository=r.name, url=r.url)

    async def _open_repository(self, r: RepositorySettings, *, quiet: bool) -> None:
        try:
            with plain_errors():
                await self.server.add_repository(r)
            self.unavailable.pop(r.name, None)
        except BlockferryError as exc:
            if not quiet:
                raise FieldError("url", f"cannot open repository {r.name} at {r.url}: {exc}") from exc
            self.unavailable[r.name] = str(exc)
            log.warning("repository_unavailable", repository=r.name, url=r.url, error=str(exc))

    async def _prepare(self, job: JobConfig) -> None:
        """Before a run: a repository that could not be opened at start gets another try."""
        name = job.spec.repository
        if name in self.unavailable:
            r = next(r for r in self.catalog.repositories if r.name == name)
            await self._open_repository(r, quiet=False)

    # -- requests ----------------------------------------------------------------------------------

    async def _handle(self, conn: Any, method: str, params: dict[str, Any]) -> Any:
        fn = _METHODS.get(method)
        if fn is None:
            raise UnknownMethodError(f"unknown method {method!r} (see docs/protocol.md)")
        if not isinstance(params, dict):
            raise FieldError("params", "expected a map")
        return await fn(self, params)

    async def m_status(self, params: dict[str, Any]) -> dict[str, Any]:
        convert(params, _Empty)
        st = await self.server.status()
        sched = await self.scheduler.ask(SchedulerStatusQuery())
        return {"version": __version__, "pid": os.getpid(), "uptime": time.time() - self.started,
                "socket": str(self.options.socket), "state_dir": str(self.options.state_dir),
                "server": msgspec.to_builtins(st), "scheduler": msgspec.to_builtins(sched),
                "unavailable": dict(self.unavailable), "throttle": msgspec.to_builtins(self.throttle.statistics()),
                "events": self.bus.statistics(), "clients": self.control.statistics() if self.control else {}}

    async def m_config_get(self, params: dict[str, Any]) -> dict[str, Any]:
        convert(params, _Empty)
        return catalog_to_data(self.catalog)

    async def m_config_apply(self, params: dict[str, Any]) -> dict[str, Any]:
        p = convert(params, ApplyParams)
        if p.replace:
            cat, inits = catalog_from_data(p.config)
            await self.change(lambda _: cat, inits)
        else:
            _, inits = catalog_from_data(p.config)
            await self.change(lambda c: self._merge(c, p.config)[0], inits)
        return catalog_to_data(self.catalog)

    async def m_config_reload(self, params: dict[str, Any]) -> dict[str, Any]:
        convert(params, _Empty)
        return await self.reload()

    async def m_settings_set(self, params: dict[str, Any]) -> dict[str, Any]:
        p = convert(params, SettingsParams)
        data = {**msgspec.to_builtins(self.catalog.settings), **p.changes}
        settings = item_settings(data)
        await self.change(lambda c: msgspec.structs.replace(c, settings=settings))
        return msgspec.to_builtins(self.catalog.settings)

    async def m_clock_advance(self, params: dict[str, Any]) -> dict[str, Any]:
        """Move a manual clock (a daemon started with --manual-clock, for tests and demos)."""
        p = convert(params, ClockParams)
        if not isinstance(self.clock, ManualClock):
            raise ConfigError("the daemon runs on the system clock; start it with --manual-clock to move time")
        if p.seconds is not None:
            self.clock.advance(p.seconds)
        if p.time is not None:
            try:
                self.clock.set(dt.datetime.fromisoformat(p.time))
            except ValueError:
                raise FieldError("time", f"not an ISO 8601 time: {p.time!r}") from None
        return {"now": self.clock.now().isoformat()}

    # items: repo, proxy, source, job

    async def _item_add(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        k = KINDS[kind]
        inits: dict[str, Any] = {}
        if kind == "repo":
            item, init = repository_from_data(params)
            inits[item.name] = init
        else:
            item = item_from_data(kind, params)
        def mutate(c: Catalog) -> Catalog:
            items = getattr(c, k.attr)
            if any(i.name == item.name for i in items):
                raise ConflictError(f"a {k.noun} named {item.name!r} exists (change it with {kind}.set)")
            return msgspec.structs.replace(c, **{k.attr: [*items, item]})
        try:
            await self.change(mutate, inits)
        except FieldError as exc:  # name the field of the item, not its place in the catalog
            prefix = f"{k.attr}[{len(getattr(self.catalog, k.attr))}]"
            if exc.field.startswith(prefix):
                raise FieldError(exc.field[len(prefix):].lstrip("."), exc.reason) from None
            raise
        return item_to_data(item)

    async def _item_set(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        k = KINDS[kind]
        p = convert(params, SetParams)
        current = self._find(kind, p.name)
        if "name" in p.changes and p.changes["name"] != p.name:
            raise FieldError("changes.name", "a name cannot change; remove and add instead")
        item = item_from_data(kind, {**item_to_data(current), **p.changes})
        await self.change(lambda c: msgspec.structs.replace(
            c, **{k.attr: [item if i.name == p.name else i for i in getattr(c, k.attr)]}))
        return item_to_data(item)

    async def _item_remove(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        k = KINDS[kind]
        p = convert(params, NameParams)
        self._find(kind, p.name)
        if kind == "job" and await self._running(p.name) is not None:
            raise ConflictError(f"job {p.name} is running; stop it first")
        if kind == "source":  # a bare name would silently become a relative file path
            users = [j.name for j in self.catalog.jobs for o in (j.backup.objects if j.backup else [])
                     for d in o.disks if d.source == p.name]
            if users:
                raise ConflictError(f"source {p.name} is used by job(s) {', '.join(sorted(set(users)))}")
        await self.change(lambda c: msgspec.structs.replace(
            c, **{k.attr: [i for i in getattr(c, k.attr) if i.name != p.name]}))
        return {"removed": p.name}

    async def _item_list(self, kind: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        convert(params, _Empty)
        items = [item_to_data(i) for i in getattr(self.catalog, KINDS[kind].attr)]
        if kind == "repo":
            for d in items:
                d["available"] = d["name"] not in self.unavailable
                if d["name"] in self.unavailable:
                    d["error"] = self.unavailable[d["name"]]
        if kind == "job":
            sched: SchedulerStatus = await self.scheduler.ask(SchedulerStatusQuery())
            due = {n.job: n.due for n in sched.next_runs}
            running = {r.job: r.session for r in sched.running}
            for d in items:
                d["running"] = running.get(d["name"])
                d["next_run"] = due.get(d["name"])
        return items

    async def _item_show(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        p = convert(params, NameParams)
        data = item_to_data(self._find(kind, p.name))
        if kind == "job":
            data["running"] = await self._running(p.name)
            data["sessions"] = msgspec.to_builtins(await self.db.sessions(job=p.name, limit=10))  # type: ignore[union-attr]
        return data

    async def _running(self, job: str) -> int | None:
        """The session of ``job``'s run, if it runs now (asked of the scheduler)."""
        sched: SchedulerStatus = await self.scheduler.ask(SchedulerStatusQuery())
        return next((r.session for r in sched.running if r.job == job), None)

    def _find(self, kind: str, name: str) -> Any:
        k = KINDS[kind]
        for i in getattr(self.catalog, k.attr):
            if i.name == name:
                return i
        raise NotFoundError(f"no {k.noun} named {name!r}")

    async def m_job_run(self, params: dict[str, Any]) -> dict[str, Any]:
        p = convert(params, NameParams)
        sid = await self.scheduler.ask(RunNow(p.name, "manual"))
        return {"session": sid}

    async def m_job_stop(self, params: dict[str, Any]) -> dict[str, Any]:
        p = convert(params, StopParams)
        sid = await self.scheduler.ask(StopRun(p.name, p.reason))
        return {"session": sid}

    async def m_session_list(self, params: dict[str, Any]) -> list[Any]:
        p = convert(params, SessionListParams)
        assert self.db is not None
        return msgspec.to_builtins(await self.db.sessions(job=p.job, state=p.state, limit=p.limit))

    async def m_session_show(self, params: dict[str, Any]) -> dict[str, Any]:
        p = convert(params, SessionShowParams)
        assert self.db is not None
        rec = await self.db.session(p.id)
        out: dict[str, Any] = msgspec.to_builtins(rec)
        running: SessionProgress | None = await self.scheduler.ask(SessionProgressQuery(rec.id))
        if running is not None:
            out["progress"] = running.progress
            if running.result is not None:
                out["result"] = msgspec.to_builtins(running.result)
        if rec.result is not None and rec.state != "running":
            out["result"]["stats"] = stats_dict(rec.result.stats)  # with rate and bottleneck
        return out


class _Empty(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


def item_settings(data: dict[str, Any]) -> Any:
    return convert(parse_sizes(data, ""), Settings)


def _kind_methods() -> dict[str, Callable[..., Any]]:
    out: dict[str, Callable[..., Any]] = {}
    for kind in KINDS:
        for verb in ("add", "set", "remove", "list", "show"):
            fn = getattr(Daemon, f"_item_{verb}")
            out[f"{kind}.{verb}"] = (lambda f, k: lambda self, params: f(self, k, params))(fn, kind)
    return out


_METHODS: dict[str, Callable[..., Any]] = {
    "status": Daemon.m_status,
    "config.get": Daemon.m_config_get,
    "config.apply": Daemon.m_config_apply,
    "config.reload": Daemon.m_config_reload,
    "settings.set": Daemon.m_settings_set,
    "clock.advance": Daemon.m_clock_advance,
    "job.run": Daemon.m_job_run,
    "job.stop": Daemon.m_job_stop,
    "session.list": Daemon.m_session_list,
    "session.show": Daemon.m_session_show,
    **_kind_methods(),
}
#: every request method (``subscribe`` and ``unsubscribe`` are the control server's own)
METHODS = sorted([*_METHODS, "subscribe", "unsubscribe"])

__all__ = ["Daemon", "DaemonOptions", "LockedError", "METHODS", "configure_logging", "default_paths",
           "default_socket"]
