"""A task: one disk of one object in one job run, as its movers share it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec
from blockferry.datapath.extents import Extent
from blockferry.jobs.config import DiskSpec
from blockferry.registry import scheme_of
from blockferry.repo.format import DiskRecord, TaskStats
from blockferry.repo.index import ChunkIndex
from blockferry.runtime.throttle import BandwidthLimit

#: a source's hook that learns whether its read made it into a point (change tracking)
FinishHook = Callable[[bool], Awaitable[None]]


class TaskContext(msgspec.Struct, eq=False, kw_only=True):
    """Everything the movers of one task share. Compared by identity (it owns chunk claims)."""

    job: str
    object: str
    disk: str
    spec: DiskSpec
    #: the daemon's session of the job's run (None outside the daemon), for log lines
    session: int | None = None
    block_size: int
    level: int | None
    hints: list[Extent] | None = None
    base: DiskRecord | None = None
    base_point: str | None = None
    #: runs of the base's blocks whose chunks have no good copy (read again, to heal)
    heal: list[tuple[int, int]] = msgspec.field(default_factory=list)
    state: str = "pending"
    proxy: str | None = None
    plan: str = ""
    total_bytes: int = 0
    done_bytes: int = 0
    stats: TaskStats = msgspec.field(default_factory=TaskStats)
    #: digests this task claimed (it must store them or release the claims)
    claimed: set[bytes] = msgspec.field(default_factory=set)
    #: the repository's chunk index, which the source mover deduplicates against (the
    #: Repository actor sets it when it opens the task's target)
    index: ChunkIndex | None = None
    #: the source's ``finish(committed)`` hook (change tracking), called after the commit
    finish: FinishHook | None = None
    #: bandwidth limits this task's data goes through, in order
    throttles: list[BandwidthLimit] = msgspec.field(default_factory=list)
    error: BaseException | None = None
    attempt: int = 0

    @property
    def log_context(self) -> dict[str, str | int]:
        """What every log line about this task names."""
        out: dict[str, str | int] = {"job": self.job, "object": self.object, "disk": self.disk}
        if self.session is not None:
            out["session"] = self.session
        return out

    @property
    def id(self) -> str:
        return f"{self.job}/{self.object}/{self.disk}"

    @property
    def url(self) -> str:
        return self.spec.source

    @property
    def scheme(self) -> str:
        return scheme_of(self.spec.source)

    def __repr__(self) -> str:
        return f"<Task {self.id} {self.state} {self.done_bytes}/{self.total_bytes}>"
