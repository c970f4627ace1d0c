"""SourceMover: one task's read side, run by a proxy.

Opens the source through its plugin, plans which blocks to read (holes and, on incrementals with
hints, unchanged blocks are never read), and sends batches downstream from ``lanes`` parallel
lanes. A batch is read, zero-checked, hashed, deduplicated and compressed in a worker thread, then
sent on the bounded stream: when the target is slow, ``send`` waits and the lanes stop reading.

Sources that read in a blocking call (image files, block devices) get a worker thread per lane
that takes the lane's batches itself (:class:`_ThreadLane`): the event loop keeps a short queue
of batches filled ahead and the thread hands each finished batch back without waiting, so no
batch waits for a round trip through the loop. Sources that read asynchronously (NBD) read on
the loop and hop to a thread per batch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
from anyio.streams.memory import MemoryObjectSendStream
from blockferry.datapath.blocks import Batch, BlockProcessor
from blockferry.datapath.hints import check_within
from blockferry.datapath.plan import batches, count, make_plan
from blockferry.datapath.source import ChangeTracking, MapsBlocking, ReadsBlocking
from blockferry.errors import BlockferryError, SourceError
from blockferry.jobs.messages import CancelMove, DiskEnd, DiskHeader, MoverInbox, ProxyStatusQuery
from blockferry.jobs.task import TaskContext
from blockferry.registry import source_plugin
from blockferry.repo.format import TaskStats
from blockferry.runtime.actor import Actor, Completion, Decision, SupervisionPolicy
from blockferry.runtime.resources import Runtime


class DownstreamClosedError(BlockferryError):
    """The target stopped receiving (its own error is the one to report)."""

    transient = True


class SourceMover(Actor[MoverInbox]):
    supervision = SupervisionPolicy(max_restarts=0, then=Decision.STOP)

    def __init__(self, task: TaskContext, out: MemoryObjectSendStream[Any], runtime: Runtime, done: Completion[TaskStats]) -> None:
        super().__init__(f"source:{task.id}", mailbox_size=runtime.settings.mailbox_size)
        self.task = task
        self.out = out
        self.runtime = runtime
        self.done = done
        self.stats = TaskStats(lanes=runtime.settings.lanes)
        self._scope: anyio.CancelScope | None = None
        self.log = self.log.bind(**task.log_context)

    async def on_start(self) -> None:
        self.start_soon(self._work)

    async def handle(self, msg: MoverInbox) -> Any:
        match msg:
            case ProxyStatusQuery():
                return self.task
            case CancelMove():
                if self._scope is not None:
                    self._scope.cancel()
                return None
        raise BlockferryError(f"{self.name}: unexpected message {type(msg).__name__}")

    async def _work(self) -> None:
        try:
            with anyio.CancelScope() as self._scope:
                async with self.out:
                    started = anyio.current_time()
                    try:
                        await self._move()
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        raise DownstreamClosedError(f"{self.task.id}: the target stopped receiving") from None
                    self.stats.duration = anyio.current_time() - started
                self.done.set_result(self.stats)
        except anyio.get_cancelled_exc_class():
            # cancelled from outside (the whole server stopping): whoever waits for the move (the
            # job, shielded) learns it ended now, not at its timeout (a failure is set by the host)
            if not self.done.done:
                self.done.set_error(BlockferryError(f"{self.task.id}: cancelled"))
            raise
        if not self.done.done:
            self.done.set_error(BlockferryError(f"{self.task.id}: cancelled"))
        self.request_stop()

    async def _move(self) -> None:
        task, settings = self.task, self.runtime.settings
        plugin = source_plugin(task.url)
        disk = await plugin.open(task.url, task.spec.options)
        try:
            hints, tracking = task.hints, ""
            tracks = isinstance(disk, ChangeTracking)
            if hints is not None:
                check_within(hints, disk.size, task.spec.hints or task.url)
            elif tracks:
                if task.base is not None:
                    hints, tracking = await disk.changed_extents(task.base)
                else:
                    tracking = "no earlier point of this disk to track changes from"
            task.finish = disk.finish if tracks else None
            data = await disk.data_extents()
            plan = make_plan(size=disk.size, block_size=task.block_size, data=data, hints=hints,
                             base=task.base, base_point=task.base_point, must_read=task.heal)
            if tracking:
                plan.reason = f"{plan.reason} ({tracking})" if hints is not None else f"full read: {tracking}"
            task.plan = plan.reason
            bs = task.block_size
            st = self.stats
            st.disk_size = disk.size
            task.total_bytes = disk.size
            read_blocks = count(plan.read)
            st.unchanged_bytes = plan.unchanged_blocks * bs
            skipped = disk.size - min(disk.size, read_blocks * bs) - st.unchanged_bytes
            st.zero_bytes = max(0, skipped)  # holes never read (and hinted blocks now holes)
            task.done_bytes = disk.size - min(disk.size, read_blocks * bs)
            self.log.info("task_plan", reason=plan.reason, read_blocks=read_blocks, blocks=plan.nblocks)
            await self.out.send(DiskHeader(
                size=disk.size, identity=disk.identity, metadata=disk.metadata, change_id=disk.change_id,
                from_base=plan.from_base, holes=plan.holes, reason=plan.reason,
            ))
            assert task.index is not None  # the repository set it when it opened the target
            processor = BlockProcessor(
                url=task.url, size=disk.size, block_size=bs, level=task.level, index=task.index,
                owner=task, claimed=task.claimed, pool=self.runtime.pool(bs),
                # the disk's capabilities, resolved once per task (never per block)
                read=disk.read_blocking if isinstance(disk, ReadsBlocking) else None,
                map=disk.map_blocking if isinstance(disk, MapsBlocking) else None,
                prepared=task.index.prepared,
            )
            if processor.prepared is not None:
                processor.prepared.stopped = True  # the lanes take the cores from here
            todo = batches(plan.read, max(1, settings.batch_bytes // bs))
            async with anyio.create_task_group() as tg:
                for _ in range(settings.lanes):
                    tg.start_soon(self._lane, todo, processor, disk)
            await self.out.send(DiskEnd(stats=st))
            self.log.info("source_done", read_bytes=st.read_bytes, new_bytes=st.new_bytes, dedup_bytes=st.dedup_bytes)
        finally:
            with anyio.CancelScope(shield=True):
                await disk.aclose()

    async def _lane(self, todo: Iterator[tuple[int, int]], processor: BlockProcessor, disk: Any) -> None:
        if processor.read is not None or processor.map is not None:
            await _ThreadLane(self, todo, processor).run()
            return
        cpu, inflight = self.runtime.cpu, self.runtime.inflight
        for first, n in todo:  # lanes share the iterator; next() never runs concurrently
            await inflight.acquire()
            try:
                batch = await self._process(first, n, processor, disk, cpu)
            except BaseException:
                inflight.release()
                raise
            batch.token = inflight
            await self._forward(batch, n)

    async def _forward(self, batch: Batch, n: int) -> None:
        """Count a processed batch (of ``n`` blocks, holding an in-flight token) and send it on."""
        st, task = self.stats, self.task
        st.read_bytes += batch.read_bytes
        st.zero_bytes += batch.zero_bytes
        st.new_bytes += batch.new_bytes
        st.dedup_bytes += batch.dedup_bytes
        st.compressed_bytes += batch.compressed_bytes
        st.blocks_read += n
        st.source_busy += batch.read_time
        st.proxy_busy += batch.proc_time
        task.done_bytes += sum(b.raw_len for b in batch.blocks)
        try:
            for throttle in task.throttles:  # bandwidth limits: wait for the batch's bytes
                await throttle.consume(batch.read_bytes)
            await self.out.send(batch)
        except BaseException:
            batch.release()
            raise

    async def _process(self, first: int, n: int, processor: BlockProcessor, disk: Any, cpu: Any) -> Batch:
        """One batch in a worker thread; a source without blocking reads is read here first."""
        if processor.read is not None or processor.map is not None:
            batch: Batch = await anyio.to_thread.run_sync(processor.process, first, n, limiter=cpu)
            return batch
        st, task = self.stats, self.task
        bufs = processor.pool.get()
        try:
            t0 = anyio.current_time()
            views = processor.views(first, n, bufs)
            got = await disk.read_into(first * task.block_size, views)
            if got != sum(len(v) for v in views):
                raise SourceError(f"{task.url}: short read at offset {first * task.block_size}")
            st.source_busy += anyio.current_time() - t0
            st.read_bytes += got
            return await anyio.to_thread.run_sync(processor.process, first, n, bufs, limiter=cpu)
        finally:
            processor.pool.put(bufs)


def call_soon_from_thread() -> Callable[..., object]:
    """The current event loop's way to have ``fn(*args)`` run on it, called from another thread
    without waiting: asyncio's ``call_soon_threadsafe``, trio's ``TrioToken.run_sync_soon``.
    anyio's ``from_thread.run_sync`` waits for the call to finish, which is the round trip a
    thread lane exists to avoid; underneath it uses these two."""
    native = anyio.lowlevel.current_token().native_token
    soon = getattr(native, "run_sync_soon", None) or getattr(native, "call_soon_threadsafe", None)
    if soon is None:
        raise BlockferryError(f"no way to call into the event loop {native!r} from a thread")
    return soon  # type: ignore[no-any-return]


class _ThreadLane:
    """One lane of a source read in blocking calls: a worker thread takes the lane's batches
    from a short queue and hands each processed batch back to the loop without waiting.

    On the loop, ``_feed`` keeps up to ``AHEAD`` of the lane's batches between queued and
    forwarded, and ``_forward`` counts the processed batches and sends them on. The thread takes
    each batch's in-flight token itself, right before reading it, so a lane waiting for a CPU
    slot holds none of the budget. It runs in bursts, each holding a CPU slot: a burst ends when
    the queue has been empty for ``IDLE`` seconds (the target is slow, or a bandwidth limit holds
    the lane), so an idle lane gives its slot to other tasks, and a burst starts again once a
    batch is queued. A thread round trip through anyio costs about 250 µs of CPU and 0.3–5 ms of
    waiting on the reference VM (docs/performance.md), which per-batch hops paid every 8 MiB.
    """

    AHEAD = 2
    IDLE = 0.02

    def __init__(self, mover: SourceMover, todo: Iterator[tuple[int, int]], processor: BlockProcessor) -> None:
        self.mover = mover
        self.todo = todo
        self.processor = processor
        self.budget = mover.runtime.inflight
        self.work: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self.send, self.recv = anyio.create_memory_object_stream[tuple[Batch, int]](self.AHEAD)
        self.slots = anyio.Semaphore(self.AHEAD)
        self.stop = threading.Event()
        self.queued = anyio.Event()
        #: tokens the thread took (it alone counts up); batches queued and forwarded (the loop)
        self.taken = self.fed = self.forwarded = 0

    async def run(self) -> None:
        post = call_soon_from_thread()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch)
                tg.start_soon(self._feed)
                tg.start_soon(self._bursts, post)
                await self._forward()
                tg.cancel_scope.cancel()  # only the watch is left
        finally:
            # the thread is done: tokens of batches it processed that were never sent on
            for _ in range(self.taken - self.forwarded):
                self.budget.release()
        if self.forwarded != self.fed:
            raise BlockferryError(f"{self.mover.task.id}: a lane lost {self.fed - self.forwarded} batch(es)")

    async def _watch(self) -> None:
        """Tell the thread to stop as soon as the lane is cancelled (the loop waits for the
        thread's current batch, not for the batches queued behind it)."""
        try:
            await anyio.sleep_forever()
        finally:
            self.stop.set()
            self.work.put(None)  # a thread waiting for a batch wakes at once

    async def _feed(self) -> None:
        for item in self.todo:  # lanes share the iterator; next() runs on the loop only
            await self.slots.acquire()
            self.fed += 1
            self.work.put(item)
            self.queued.set()
        self.work.put(None)
        self.queued.set()

    async def _bursts(self, post: Callable[..., object]) -> None:
        try:
            while True:
                while self.work.empty():  # only this lane's feeder adds, on this thread
                    self.queued = anyio.Event()
                    await self.queued.wait()
                if await anyio.to_thread.run_sync(self._burst, post, limiter=self.mover.runtime.cpu):
                    return
        finally:
            # the thread's hand-backs were scheduled before its return was: all are delivered
            self.send.close()

    def _burst(self, post: Callable[..., object]) -> bool:
        """In the worker thread: process queued batches until the end or a stop (True), or
        until the queue stays empty for IDLE seconds (False)."""
        process, work, deliver, budget, stop = self.processor.process, self.work, self._deliver, self.budget, self.stop
        while not stop.is_set():
            try:
                item = work.get(timeout=self.IDLE)
            except queue.Empty:
                return False
            if item is None:
                return True
            while not budget.acquire_blocking(self.IDLE):
                if stop.is_set():
                    return True
            try:
                batch = process(*item)
            except BaseException:
                budget.release_from_thread(post)
                raise
            self.taken += 1
            post(deliver, batch, item[1])
        return True

    def _deliver(self, batch: Batch, n: int) -> None:
        """On the loop, from the thread. Never raises (a trio callback must not)."""
        try:
            self.send.send_nowait((batch, n))
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            # the lane stopped (WouldBlock cannot happen: AHEAD bounds it); the batch is never
            # forwarded, so run() gives its token back and fails the lane if it had not stopped
            pass

    async def _forward(self) -> None:
        async with self.recv:
            async for batch, n in self.recv:
                self.forwarded += 1
                batch.token = self.budget
                self.slots.release()
                await self.mover._forward(batch, n)
