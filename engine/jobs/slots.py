"""The resource scheduler: a task runs only while it holds a proxy slot and a repository slot.

Requests are served first come, first served, as far as capacity allows: a request that cannot
be served yet (its repository is full, or no proxy that reaches its source has a free slot) does
not hold back a later one that can. Among the proxies that reach a source, the one with the
fewest running tasks is chosen (ties: the lower load ratio, then configuration order).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import msgspec
from blockferry.errors import ConfigError, ConflictError
from blockferry.jobs.config import ProxyConfig, validated
from blockferry.jobs.messages import ProxyInbox
from blockferry.jobs.task import TaskContext
from blockferry.runtime.actor import Actor


class Slots(msgspec.Struct, eq=False):
    """A capacity: ``load`` of ``limit`` in use; ``peak`` the most ever in use."""

    name: str
    limit: int
    load: int = 0
    peak: int = 0

    def __post_init__(self) -> None:
        _check_limit(self.name, self.limit)

    def take(self) -> None:
        self.load += 1
        self.peak = max(self.peak, self.load)

    def give(self) -> None:
        self.load -= 1

    @property
    def free(self) -> bool:
        return self.load < self.limit


def _check_limit(name: str, limit: int) -> None:
    """A limit below one task would leave every request waiting for a slot that never frees."""
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ConfigError(f"{name}: a task limit must be 1 or more, not {limit!r}")


class ProxyEntry(msgspec.Struct, eq=False):
    config: ProxyConfig
    actor: Actor[ProxyInbox]
    slots: Slots


class Ticket(msgspec.Struct, eq=False):
    task: TaskContext
    repository: str
    job_slots: Slots | None
    granted: anyio.Event = msgspec.field(default_factory=anyio.Event)
    proxy: ProxyEntry | None = None
    error: BaseException | None = None
    released: bool = False


class ResourceScheduler:
    def __init__(self) -> None:
        self.proxies: list[ProxyEntry] = []
        self.repositories: dict[str, Slots] = {}
        self._queue: list[Ticket] = []

    def __repr__(self) -> str:
        p = ", ".join(f"{e.config.name}={e.slots.load}/{e.slots.limit}" for e in self.proxies)
        r = ", ".join(f"{s.name}={s.load}/{s.limit}" for s in self.repositories.values())
        return f"<ResourceScheduler proxies[{p}] repositories[{r}] waiting={len(self._queue)}>"

    def add_proxy(self, config: ProxyConfig, actor: Actor[ProxyInbox]) -> None:
        validated(config)
        self.proxies.append(ProxyEntry(config, actor, Slots(config.name, config.max_tasks)))
        self._dispatch()

    def add_repository(self, name: str, max_tasks: int) -> None:
        if name not in self.repositories:
            self.repositories[name] = Slots(name, max_tasks)
        self._dispatch()

    def update_proxy(self, config: ProxyConfig) -> None:
        """New limits and reach for a proxy; tasks it runs keep their slots."""
        validated(config)
        entry = next(p for p in self.proxies if p.config.name == config.name)
        entry.config = config
        entry.slots.limit = config.max_tasks
        self._dispatch()

    def update_repository(self, name: str, max_tasks: int) -> None:
        _check_limit(name, max_tasks)
        self.repositories[name].limit = max_tasks
        self._dispatch()

    def remove_proxy(self, name: str) -> None:
        entry = next((p for p in self.proxies if p.config.name == name), None)
        if entry is not None:
            if entry.slots.load:
                raise ConflictError(f"proxy {name} is running {entry.slots.load} task(s)")
            self.proxies.remove(entry)
        self._dispatch()

    def remove_repository(self, name: str) -> None:
        slots = self.repositories.get(name)
        if slots is not None:
            if slots.load or any(t.repository == name for t in self._queue):
                raise ConflictError(f"repository {name} has tasks running or waiting")
            del self.repositories[name]

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def request(self, task: TaskContext, repository: str, job_slots: Slots | None = None) -> Ticket:
        """Queue a request for slots (synchronously, so requests keep the caller's order)."""
        if repository not in self.repositories:
            raise ConfigError(f"unknown repository {repository!r}")
        ticket = Ticket(task, repository, job_slots)
        task.state = "waiting"
        self._queue.append(ticket)
        self._dispatch()
        return ticket

    @asynccontextmanager
    async def hold(self, ticket: Ticket) -> AsyncIterator[ProxyEntry]:
        """Wait for the ticket's slots, hold them for the body, release them after."""
        try:
            await ticket.granted.wait()
            if ticket.error is not None:
                raise ticket.error
            assert ticket.proxy is not None
            yield ticket.proxy
        finally:
            self.release(ticket)

    def release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        if ticket in self._queue:
            self._queue.remove(ticket)
        elif ticket.proxy is not None:
            ticket.proxy.slots.give()
            self.repositories[ticket.repository].give()
            if ticket.job_slots is not None:
                ticket.job_slots.give()
        self._dispatch()

    def _dispatch(self) -> None:
        for ticket in list(self._queue):
            task = ticket.task
            reachable = [p for p in self.proxies if p.config.can_reach(task.url, task.scheme)]
            if not reachable:
                # (with none at all, waiting would hang the job with nothing to say why)
                ticket.error = ConfigError(
                    f"no proxy can reach {task.url} (transport {task.scheme})" if self.proxies else
                    f"no proxy is configured to read {task.url} (add one: blockferry proxy add NAME)")
                self._queue.remove(ticket)
                ticket.granted.set()
                continue
            repo = self.repositories[ticket.repository]
            if not repo.free or (ticket.job_slots is not None and not ticket.job_slots.free):
                continue
            free = [p for p in reachable if p.slots.free]
            if not free:
                continue
            order = {id(p): i for i, p in enumerate(self.proxies)}
            chosen = min(free, key=lambda p: (p.slots.load, p.slots.load / p.slots.limit, order[id(p)]))
            chosen.slots.take()
            repo.take()
            if ticket.job_slots is not None:
                ticket.job_slots.take()
            ticket.proxy = chosen
            self._queue.remove(ticket)
            task.state = "running"
            task.proxy = chosen.config.name
            ticket.granted.set()
