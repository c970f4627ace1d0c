"""SourceMover: one task's read side, run by a proxy.

Opens the source through its plugin, plans which blocks to read (holes and, on incrementals with
hints, unchanged blocks are never read), and sends batches downstream from ``lanes`` parallel
lanes. Each lane reads, zero-checks, hashes, deduplicates and compresses a batch in one worker
thread hop, then sends it on the bounded stream: when the target is slow, ``send`` waits and the
lanes stop reading.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import anyio.to_thread
from anyio.streams.memory import MemoryObjectSendStream

from blockferry.actor import Actor, Completion, Decision, SupervisionPolicy
from blockferry.blocks import Batch, BlockProcessor
from blockferry.errors import BlockferryError, SourceError
from blockferry.format import TaskStats
from blockferry.hints import check_within
from blockferry.messages import DiskEnd, DiskHeader, ProxyStatusQuery
from blockferry.plan import batches, count, make_plan
from blockferry.registry import source_plugin
from blockferry.task import Runtime, TaskContext


class DownstreamClosedError(BlockferryError):
    """The target stopped receiving (its own error is the one to report)."""

    transient = True


class SourceMover(Actor[Any]):
    supervision = SupervisionPolicy(max_restarts=0, then=Decision.STOP)

    def __init__(self, task: TaskContext, out: MemoryObjectSendStream[Any], runtime: Runtime, done: Completion[TaskStats]) -> None:
        super().__init__(f"source:{task.id}", mailbox_size=runtime.settings.mailbox_size)
        self.task = task
        self.out = out
        self.runtime = runtime
        self.done = done
        self.stats = TaskStats(lanes=runtime.settings.lanes)
        self._scope: anyio.CancelScope | None = None
        self.log = self.log.bind(job=task.job, object=task.object, disk=task.disk)

    async def on_start(self) -> None:
        self.start_soon(self._work)

    async def handle(self, msg: Any) -> Any:
        match msg:
            case ProxyStatusQuery():
                return self.task
        raise BlockferryError(f"{self.name}: unexpected message {type(msg).__name__}")

    def cancel(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    async def _work(self) -> None:
        with anyio.CancelScope() as self._scope:
            async with self.out:
                started = anyio.current_time()
                try:
                    await self._move()
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    raise DownstreamClosedError(f"{self.task.id}: the target stopped receiving") from None
                self.stats.duration = anyio.current_time() - started
            self.done.set_result(self.stats)
        if not self.done.done:
            self.done.set_error(BlockferryError(f"{self.task.id}: cancelled"))
        self.request_stop()

    async def _move(self) -> None:
        task, settings = self.task, self.runtime.settings
        plugin = source_plugin(task.url)
        disk = await plugin.open(task.url, task.spec.options)
        try:
            hints, tracking = task.hints, ""
            if hints is not None:
                check_within(hints, disk.size, task.spec.hints or task.url)
            elif hasattr(disk, "changed_extents"):
                if task.base is not None:
                    hints, tracking = await disk.changed_extents(task.base)
                else:
                    tracking = "no earlier point of this disk to track changes from"
            task.finish = getattr(disk, "finish", None)
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
            processor = BlockProcessor(
                url=task.url, size=disk.size, block_size=bs, level=task.level, index=task.index,
                owner=task, claimed=task.claimed, read=disk.read_blocking, pool=self.runtime.pool(bs),
                map=getattr(disk, "map_blocking", None), prepared=getattr(task.index, "prepared", None),
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
        cpu, inflight = self.runtime.cpu, self.runtime.inflight
        st, task = self.stats, self.task
        for first, n in todo:  # lanes share the iterator; next() never runs concurrently
            await inflight.acquire()
            try:
                batch = await self._process(first, n, processor, disk, cpu)
            except BaseException:
                inflight.release()
                raise
            batch.token = inflight
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
