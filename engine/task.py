"""A task (one disk of one object in one job run) and the runtime resources tasks share."""

from __future__ import annotations

import os
from typing import Any

import anyio
import msgspec

from .blocks import BufferPool
from .config import DiskSpec, EngineSettings
from .format import DiskRecord, TaskStats
from .hints import Extent
from .registry import scheme_of


class Runtime:
    """Shared by every actor of a server: the worker-thread limiters and the engine settings.

    ``cpu`` bounds threads that hash and compress (one per core by default); ``io`` bounds
    threads doing repository I/O, so writes never queue behind compression.
    """

    def __init__(self, settings: EngineSettings | None = None) -> None:
        self.settings = settings or EngineSettings()
        self.cpu = anyio.CapacityLimiter(self.settings.cpu_threads or os.cpu_count() or 1)
        self.io = anyio.CapacityLimiter(self.settings.io_threads)
        #: a token per batch between reading and writing (see EngineSettings.inflight_batches)
        self.inflight = anyio.Semaphore(self.settings.inflight_batches)
        self._pools: dict[tuple[int, int], BufferPool] = {}

    def pool(self, block_size: int) -> BufferPool:
        per_set = max(1, self.settings.batch_bytes // block_size)
        key = (block_size, per_set)
        p = self._pools.get(key)
        if p is None:
            p = self._pools[key] = BufferPool(block_size, per_set)
        return p


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
