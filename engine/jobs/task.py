"""A task: one disk of one object in one job run, as its movers share it."""

from __future__ import annotations

from typing import Any

import msgspec
from blockferry.datapath.extents import Extent
from blockferry.jobs.config import DiskSpec
from blockferry.registry import scheme_of
from blockferry.repo.format import DiskRecord, TaskStats


class TaskContext(msgspec.Struct, eq=False, kw_only=True):
    """Everything the movers of one task share. Compared by identity (it owns chunk claims)."""

    job: str
    object: str
    disk: str
    spec: DiskSpec
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
    #: the repository's chunk index, which the source mover deduplicates against
    index: Any = None
    #: the source's ``finish(committed)`` hook (change tracking), called after the commit
    finish: Any = None
    #: bandwidth limits this task's data goes through: objects with ``async consume(nbytes)``
    throttles: list[Any] = msgspec.field(default_factory=list)
    error: BaseException | None = None
    attempt: int = 0
    extra: dict[str, Any] = msgspec.field(default_factory=dict)

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
