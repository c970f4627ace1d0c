"""A task (one disk of one object in one job run) and the runtime resources tasks share."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import anyio
from blockferry.runtime.buffers import BufferPool
from blockferry.runtime.settings import EngineSettings


class InflightBudget:
    """The batches allowed between reading and writing (``EngineSettings.inflight_batches``).

    Taken by tasks on the event loop (``await acquire()``) and by lane worker threads
    (``acquire_blocking``), given back on the loop (``release``: the target, once a batch is
    written) or, by a thread whose batch failed, with ``release_from_thread``. anyio's
    Semaphore can only be taken on the loop, and a thread taking it through the loop would pay
    the round trip the lane threads exist to avoid (actors/source_mover.py), hence a thread
    condition with an event to wake the tasks waiting on the loop."""

    def __init__(self, n: int) -> None:
        self._free = n
        self._cond = threading.Condition(threading.Lock())
        self._freed: anyio.Event | None = None

    @property
    def value(self) -> int:
        """Tokens free now."""
        return self._free

    def _take(self) -> bool:
        with self._cond:
            if self._free:
                self._free -= 1
                return True
            return False

    async def acquire(self) -> None:
        while not self._take():
            if self._freed is None:
                self._freed = anyio.Event()
            await self._freed.wait()

    def acquire_blocking(self, timeout: float) -> bool:
        """In a worker thread: take a token, waiting at most ``timeout`` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._free > 0, timeout):
                return False
            self._free -= 1
            return True

    def _give(self) -> None:
        with self._cond:
            self._free += 1
            self._cond.notify()

    def release(self) -> None:
        """On the event loop's thread."""
        self._give()
        self._wake()

    def release_from_thread(self, call_soon: Callable[..., object]) -> None:
        """From a worker thread; ``call_soon`` schedules a call on the loop without waiting."""
        self._give()
        call_soon(self._wake)

    def _wake(self) -> None:
        freed, self._freed = self._freed, None
        if freed is not None:
            freed.set()


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
        self.inflight = InflightBudget(self.settings.inflight_batches)
        self._pools: dict[tuple[int, int], BufferPool] = {}

    def pool(self, block_size: int) -> BufferPool:
        per_set = max(1, self.settings.batch_bytes // block_size)
        key = (block_size, per_set)
        p = self._pools.get(key)
        if p is None:
            p = self._pools[key] = BufferPool(block_size, per_set)
        return p


