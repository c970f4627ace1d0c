"""Messages between actors, and the session results they produce.

Control messages are tagged msgspec structs; an actor's inbox type (``ServerInbox``,
``JobInbox``...) is the union it ``match``es on. The ones that carry in-process objects (a stream,
a task context, a callback, an open store) say so in their field types and never cross the
control socket.

Work that takes long (a retention, a copy, a lifecycle run on a repository) is asked for with a
message whose reply is a :class:`~blockferry.runtime.actor.Running`: the asker awaits its
``outcome()``, while the actor doing it goes on handling its mailbox.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from blockferry.datapath.blocks import Batch
from blockferry.jobs.catalog import JobConfig, LifecycleSpec, SourceConfig
from blockferry.jobs.config import JobSpec, ProxyConfig, RepositorySettings
from blockferry.jobs.task import TaskContext
from blockferry.repo.format import DiskRecord, Manifest, TaskStats
from blockferry.repo.retention import RetentionPolicy
from blockferry.repo.store import RepositoryStore
from blockferry.runtime.throttle import BandwidthLimit


class Message(msgspec.Struct, frozen=True, tag=True):
    """Base of control messages (``tag``: the class name travels with the message)."""


# -- BackupServer --------------------------------------------------------------------------------


class RunJob(Message, frozen=True):
    """Start a run of a backup job; replies with a JobHandle."""

    spec: JobSpec
    #: bandwidth limits every task of the run waits on (in-process)
    throttles: list[BandwidthLimit] | None = None
    #: the daemon's session of this run: every log line of the run names it
    session: int | None = None


class ServerStatusQuery(Message, frozen=True):
    pass


class AddRepository(Message, frozen=True):
    settings: RepositorySettings
    store: RepositoryStore | None = None  #: an already open store to use (in-process), or None to open it


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


class FindRepository(Message, frozen=True):
    """The Repository actor named so (to ask it for work on its store), or None if it is not open."""

    name: str


class InventoryQuery(Message, frozen=True):
    """What the server has and what uses it (before a configuration change removes some)."""


class ServerStatus(msgspec.Struct, frozen=True, kw_only=True):
    proxies: list[ProxyStatus]
    repositories: list[RepositoryStatus]
    jobs: list[str]
    waiting_tasks: int


class Inventory(msgspec.Struct, frozen=True, kw_only=True):
    #: open repositories: name -> the running jobs that use it
    repositories: dict[str, list[str]]
    #: proxies: name -> tasks holding one of its slots
    proxies: dict[str, int]


# -- JobManager ----------------------------------------------------------------------------------


class JobStatusQuery(Message, frozen=True):
    pass


class CancelJob(Message, frozen=True):
    reason: str = "stopped by request"


class SessionQuery(Message, frozen=True):
    """A copy of the run's session as it is now (for snapshots and ``session.show``)."""


# -- Proxy ---------------------------------------------------------------------------------------


class RunSource(Message, frozen=True):
    """Start a source mover; replies with (the mover, a Completion of its TaskStats)."""

    task: TaskContext  #: in-process
    out: MemoryObjectSendStream[DataItem]  #: in-process


class ProxyStatusQuery(Message, frozen=True):
    pass


# -- movers --------------------------------------------------------------------------------------


class CancelMove(Message, frozen=True):
    """Stop moving this task's data (the task ended early: an error, a cancellation)."""


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
    """Start a target mover; replies with (the mover, a Completion of its DiskRecord). Sets the
    task's chunk index (what its source deduplicates against)."""

    task: TaskContext  #: in-process
    inbox: MemoryObjectReceiveStream[DataItem]  #: in-process


class FindBase(Message, frozen=True):
    object: str
    disk: str


class CommitPoint(Message, frozen=True):
    manifest: Manifest


class RepositoryStatusQuery(Message, frozen=True):
    pass


class ReleaseLock(Message, frozen=True):
    """No job uses the repository any more: release its writer lock (the next task takes it)."""


class DescribeRepository(Message, frozen=True):
    """The repository's RepositoryConfig (block size, compression, immutability)."""


class ApplyRetention(Message, frozen=True):
    """Remove the points ``policy`` does not keep (of ``objects`` only, if given); replies with a
    Running of the PruneReport."""

    policy: RetentionPolicy
    objects: list[str] | None = None


class CopyPoints(Message, frozen=True):
    """Copy points to the repository at ``to``, then apply ``retention`` there; replies with a
    Running of the CopyReport. The points are ``points`` if given, else those
    :func:`~blockferry.repo.lifecycle.points_to_copy` picks (of ``objects``, ``latest`` only).

    Every backup copy comes here: a backup job's immediate ones, the scheduler's periodic ones and
    a ``copy`` lifecycle job's."""

    to: str
    points: list[str] | None = None
    objects: list[str] | None = None
    latest: bool = False
    retention: RetentionPolicy | None = None
    #: called with (points done, points in all) as the copy goes (in-process)
    progress: Callable[[int, int], None] | None = None


class RunLifecycle(Message, frozen=True):
    """One run of a lifecycle job (prune, gc, verify, copy) on this repository; replies with a
    Running of (Outcome, SessionResult)."""

    spec: LifecycleSpec
    job: str
    started: str
    #: told each step as the run goes (in-process)
    say: Callable[[str], None] | None = None


class RepositoryStatus(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    url: str
    load: int
    peak: int
    max_tasks: int
    chunks: int


# -- Scheduler -----------------------------------------------------------------------------------


class SetJobs(Message, frozen=True):
    """The configured jobs and sources changed (or are first known)."""

    jobs: list[JobConfig]
    sources: list[SourceConfig]


class RunNow(Message, frozen=True):
    job: str
    trigger: str = "manual"


class StopRun(Message, frozen=True):
    job: str
    reason: str = "stopped by request"


class StopAll(Message, frozen=True):
    """Stop every run and start no more; replies with a Completion set once none runs."""

    reason: str


class Tick(Message, frozen=True):
    pass


class RunEnded(Message, frozen=True):
    job: str
    result: SessionResult | None
    error: str | None = None
    #: a lifecycle run's final state and note (a backup run's come from its result)
    state: str | None = None
    note: str | None = None


class SchedulerStatusQuery(Message, frozen=True):
    pass


class SessionProgressQuery(Message, frozen=True):
    """A running session's progress and result so far; None if that session is not running."""

    session: int


class RunInfo(msgspec.Struct, kw_only=True):
    session: int
    job: str
    trigger: str
    started: str
    stop_reason: str | None
    window_closes: str | None
    progress: dict[str, Any] | None


class NextRun(msgspec.Struct, kw_only=True):
    job: str
    schedule: str
    due: str | None  #: None for chained jobs
    enabled: bool


class SchedulerStatus(msgspec.Struct, kw_only=True):
    now: str
    running: list[RunInfo]
    next_runs: list[NextRun]
    stopping: bool


class SessionProgress(msgspec.Struct, kw_only=True):
    progress: dict[str, Any] | None
    #: a backup run's session so far (None for a lifecycle run)
    result: SessionResult | None


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


class Outcome(msgspec.Struct, kw_only=True):
    """How a lifecycle run went: its session state (success, warning, failed) and note."""

    state: str = "success"
    note: str | None = None


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


# -- inboxes: what each role's actor handles, and what flows between movers ---------------------

ServerInbox: TypeAlias = (
    RunJob | ServerStatusQuery | AddRepository | AddProxy | UpdateProxy | RemoveProxy | UpdateRepository
    | RemoveRepository | FindRepository | InventoryQuery
)
JobInbox: TypeAlias = JobStatusQuery | SessionQuery | CancelJob
ProxyInbox: TypeAlias = RunSource | ProxyStatusQuery | UpdateProxy
RepositoryInbox: TypeAlias = (
    CheckAvailable | OpenTarget | FindBase | CommitPoint | RepositoryStatusQuery | ReleaseLock | UpdateRepository
    | DescribeRepository | ApplyRetention | CopyPoints | RunLifecycle
)
#: a source mover answers ProxyStatusQuery, a target mover RepositoryStatusQuery (with their task)
MoverInbox: TypeAlias = CancelMove | ProxyStatusQuery | RepositoryStatusQuery
SchedulerInbox: TypeAlias = (
    SetJobs | RunNow | StopRun | StopAll | Tick | RunEnded | SchedulerStatusQuery | SessionProgressQuery
)
#: what a source mover sends its target mover: a header, batches, an end
DataItem: TypeAlias = DiskHeader | Batch | DiskEnd


__all__ = [
    "AddProxy", "AddRepository", "ApplyRetention", "Availability", "CancelJob", "CancelMove", "CheckAvailable",
    "CommitPoint", "CopyPoints", "DataItem", "DescribeRepository", "DiskEnd", "DiskHeader", "DiskRecord",
    "DiskResult", "FindBase", "FindRepository", "Inventory", "InventoryQuery", "JobInbox", "JobStatus",
    "JobStatusQuery", "Message", "MoverInbox", "NextRun", "ObjectResult", "OpenTarget", "Outcome", "ProxyConfig",
    "ProxyInbox", "ProxyStatus", "ProxyStatusQuery", "ReleaseLock", "RemoveProxy", "RemoveRepository",
    "RepositoryInbox", "RepositoryStatus", "RepositoryStatusQuery", "RunEnded", "RunInfo", "RunJob", "RunLifecycle",
    "RunNow", "RunSource", "SchedulerInbox", "SchedulerStatus", "SchedulerStatusQuery", "ServerInbox",
    "ServerStatus", "ServerStatusQuery", "SessionProgress", "SessionProgressQuery", "SessionQuery", "SessionResult",
    "SetJobs", "StopAll", "StopRun", "TaskStatus", "Tick", "UpdateProxy", "UpdateRepository",
]
