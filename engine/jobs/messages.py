"""Messages between actors, and the session results they produce.

Control messages are tagged msgspec structs; an actor's inbox type is the union it ``match``es on.
The ones that carry in-process objects (a stream, a task context) are marked so in their field
type and never cross the control socket.
"""

from __future__ import annotations

from typing import Any

import msgspec
from blockferry.jobs.config import JobSpec, ProxyConfig, RepositorySettings
from blockferry.repo.format import DiskRecord, Manifest, TaskStats


class Message(msgspec.Struct, frozen=True, tag=True):
    """Base of control messages (``tag``: the class name travels with the message)."""


# -- BackupServer --------------------------------------------------------------------------------


class RunJob(Message, frozen=True):
    spec: JobSpec
    #: bandwidth limits every task of the run waits on (Throttle objects, in-process)
    throttles: Any = None


class ServerStatusQuery(Message, frozen=True):
    pass


class AddRepository(Message, frozen=True):
    settings: RepositorySettings
    store: Any = None  #: an already open RepositoryStore to use (in-process), or None to open it


class AddProxy(Message, frozen=True):
    config: ProxyConfig


class UpdateProxy(Message, frozen=True):
    """Change a proxy in place (its limit applies to the tasks it starts from now on)."""

    config: ProxyConfig


class RemoveProxy(Message, frozen=True):
    """Stop and forget a proxy; ConflictError while it runs tasks."""

    name: str


class UpdateRepository(Message, frozen=True):
    """Change a repository's limits in place; a new URL reopens it (only while no job uses it)."""

    settings: RepositorySettings


class RemoveRepository(Message, frozen=True):
    """Stop and forget a repository; ConflictError while a job uses it."""

    name: str


class ServerStatus(msgspec.Struct, frozen=True, kw_only=True):
    proxies: list[ProxyStatus]
    repositories: list[RepositoryStatus]
    jobs: list[str]
    waiting_tasks: int


# -- JobManager ----------------------------------------------------------------------------------


class JobStatusQuery(Message, frozen=True):
    pass


class CancelJob(Message, frozen=True):
    reason: str = "stopped by request"


# -- Proxy ---------------------------------------------------------------------------------------


class RunSource(Message, frozen=True):
    task: Any  #: TaskContext (in-process)
    out: Any  #: MemoryObjectSendStream of DiskHeader, Batch..., DiskEnd (in-process)


class ProxyStatusQuery(Message, frozen=True):
    pass


class ProxyStatus(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    load: int
    peak: int
    max_tasks: int
    tasks_run: int
    transports: list[str]


# -- Repository ----------------------------------------------------------------------------------


class CheckAvailable(Message, frozen=True):
    pass


class Availability(msgspec.Struct, frozen=True, kw_only=True):
    url: str
    free_bytes: int | None


class OpenTarget(Message, frozen=True):
    task: Any  #: TaskContext (in-process)
    inbox: Any  #: MemoryObjectReceiveStream (in-process)


class FindBase(Message, frozen=True):
    object: str
    disk: str


class CommitPoint(Message, frozen=True):
    manifest: Manifest


class RepositoryStatusQuery(Message, frozen=True):
    pass


class ReleaseLock(Message, frozen=True):
    """No job uses the repository any more: release its writer lock (the next task takes it)."""


class RepositoryStatus(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    url: str
    load: int
    peak: int
    max_tasks: int
    chunks: int


# -- the data stream between movers ---------------------------------------------------------------


class DiskHeader(msgspec.Struct, frozen=True, kw_only=True):
    """First item on a task's stream: what the target needs before the blocks."""

    size: int
    identity: dict[str, str]
    metadata: dict[str, Any]
    change_id: str | None
    from_base: bool
    holes: list[tuple[int, int]]
    reason: str


class DiskEnd(msgspec.Struct, frozen=True, kw_only=True):
    """Last item on a task's stream: the source read everything it planned."""

    stats: TaskStats


# -- results -------------------------------------------------------------------------------------


class DiskResult(msgspec.Struct, kw_only=True):
    name: str
    source: str
    state: str = "pending"  #: pending, waiting, running, done, failed
    proxy: str | None = None
    plan: str = ""
    error: str | None = None
    stats: TaskStats = msgspec.field(default_factory=TaskStats)


class ObjectResult(msgspec.Struct, kw_only=True):
    name: str
    state: str = "pending"  #: pending, running, done, failed
    point: str | None = None
    attempts: int = 0
    error: str | None = None
    disks: list[DiskResult] = msgspec.field(default_factory=list)


class SessionResult(msgspec.Struct, kw_only=True):
    """What a job run did: per object, per disk, and in total."""

    job: str
    state: str = "running"  #: running, success, warning, failed
    started: str = ""
    ended: str | None = None
    duration: float = 0.0
    objects: list[ObjectResult] = msgspec.field(default_factory=list)
    stats: TaskStats = msgspec.field(default_factory=TaskStats)
    warnings: list[str] = msgspec.field(default_factory=list)
    #: points the job's retention removed after the run
    pruned: list[str] = msgspec.field(default_factory=list)
    #: backup copies made after the run: target URL → points copied
    copied: dict[str, list[str]] = msgspec.field(default_factory=dict)
    #: a lifecycle job's run (prune, gc, verify, copy): what it did in one line, and the
    #: operation's own report (PruneReport, GcReport, VerifyReport, CopyReport as plain data)
    summary: str = ""
    report: dict[str, Any] = msgspec.field(default_factory=dict)

    @property
    def points(self) -> list[str]:
        return [o.point for o in self.objects if o.point]


class TaskStatus(msgspec.Struct, frozen=True, kw_only=True):
    object: str
    disk: str
    state: str
    proxy: str | None
    done_bytes: int
    total_bytes: int


class JobStatus(msgspec.Struct, frozen=True, kw_only=True):
    job: str
    state: str
    tasks: list[TaskStatus]


__all__ = [
    "AddProxy", "AddRepository", "ServerStatus", "Availability", "CancelJob", "CheckAvailable", "CommitPoint", "DiskEnd", "DiskHeader", "DiskRecord",
    "DiskResult", "FindBase", "JobStatus", "JobStatusQuery", "Message", "ObjectResult", "OpenTarget",
    "ProxyConfig", "ProxyStatus", "ProxyStatusQuery", "RepositoryStatus", "RepositoryStatusQuery", "RunJob",
    "RunSource", "ServerStatusQuery", "SessionResult", "TaskStatus", "UpdateProxy", "RemoveProxy",
    "UpdateRepository", "RemoveRepository", "ReleaseLock",
]
