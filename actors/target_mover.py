"""TargetMover: one task's write side, run by a repository.

Receives the disk header, then batches: new chunks go into packs (the repository's index is
checked again, so two tasks racing on the same block store it once), and every block's chunk id
goes into the disk map. At the end it seals its pack and waits until the chunks it referenced
but another task was storing are stored; then it hands back the disk's record.
"""

from __future__ import annotations

from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream
from blockferry.datapath.blocks import CLAIMED, Batch
from blockferry.errors import BlockferryError, ChunkLostError, SourceError, plain_errors
from blockferry.jobs.messages import CancelMove, DiskEnd, DiskHeader, MoverInbox, RepositoryStatusQuery
from blockferry.jobs.task import TaskContext
from blockferry.repo.format import DIGEST_SIZE, DiskRecord
from blockferry.repo.store import RepositoryStore
from blockferry.runtime.actor import Actor, Completion, Decision, SupervisionPolicy
from blockferry.runtime.resources import Runtime


class UpstreamEndedError(BlockferryError):
    """The source stopped sending before the end of the disk (its own error is the one to
    report)."""

    transient = True


class TargetMover(Actor[MoverInbox]):
    supervision = SupervisionPolicy(max_restarts=0, then=Decision.STOP)

    def __init__(self, task: TaskContext, inbox: MemoryObjectReceiveStream[Any], store: RepositoryStore,
                 runtime: Runtime, done: Completion[DiskRecord]) -> None:
        super().__init__(f"target:{task.id}", mailbox_size=runtime.settings.mailbox_size)
        self.task = task
        self.inbox = inbox
        self.store = store
        self.runtime = runtime
        self.done = done
        self.written = 0
        self.busy = 0.0
        self._scope: anyio.CancelScope | None = None
        self._foreign: set[bytes] = set()
        self.log = self.log.bind(**task.log_context)

    async def on_start(self) -> None:
        self.start_soon(self._work)

    async def handle(self, msg: MoverInbox) -> Any:
        match msg:
            case RepositoryStatusQuery():
                return self.task
            case CancelMove():
                if self._scope is not None:
                    self._scope.cancel()
                return None
        raise BlockferryError(f"{self.name}: unexpected message {type(msg).__name__}")

    def _drain(self) -> None:
        """Free the in-flight tokens of batches still queued, then close the inbox (a mover
        that stops early must not strand the memory budget)."""
        while True:
            try:
                left = self.inbox.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            if isinstance(left, Batch):
                left.release()
        self.inbox.close()

    async def _work(self) -> None:
        try:
            await self._write()
        except anyio.get_cancelled_exc_class():
            # cancelled from outside: the job waiting for the move learns it ended now
            if not self.done.done:
                self.done.set_error(BlockferryError(f"{self.task.id}: cancelled"))
            raise
        finally:
            self._drain()
        if not self.done.done:
            self.done.set_error(BlockferryError(f"{self.task.id}: cancelled"))
        self.request_stop()

    async def _write(self) -> None:
        with anyio.CancelScope() as self._scope:
            # packs this task fills are sealed (uploaded) in this group while it goes on
            with plain_errors():
                async with anyio.create_task_group() as seals:
                    writer = self.store.writer(seals.start_soon)
                    try:
                        record = await self._receive(writer)
                    finally:
                        # chunks already written are good data other tasks may use: keep them
                        with anyio.CancelScope(shield=True):
                            await writer.finish()
            self.written, self.busy = writer.written, writer.busy
            lost = await self.store.index.wait_stored(self._foreign)
            if lost:
                raise ChunkLostError(f"{self.task.id}: {len(lost)} block(s) another task was storing were not stored")
            record.stats.written_bytes = self.written
            record.stats.target_busy = self.busy
            self.done.set_result(record)

    async def _receive(self, writer: Any) -> DiskRecord:
        task = self.task
        async with self.inbox:
            try:
                header = await self.inbox.receive()
            except anyio.EndOfStream:
                raise UpstreamEndedError(f"{task.id}: the source sent nothing") from None
            if not isinstance(header, DiskHeader):
                raise SourceError(f"{task.id}: protocol error, expected a disk header")
            nblocks = -(-header.size // task.block_size)
            size = nblocks * DIGEST_SIZE
            if header.from_base and task.base is not None:
                base = task.base.blocks
                blocks = bytearray(base[:size]) if len(base) >= size else bytearray(base) + bytes(size - len(base))
            else:
                blocks = bytearray(size)
            for s, c in header.holes:
                blocks[s * DIGEST_SIZE:(s + c) * DIGEST_SIZE] = bytes(c * DIGEST_SIZE)
            end: DiskEnd | None = None
            try:
                async for item in self.inbox:
                    if isinstance(item, Batch):
                        try:
                            new = [(b.digest, b.payload, b.raw_len, b.flags) for b in item.blocks
                                   if b.payload is not None]
                            if new:
                                await writer.add(new)
                            for b in item.blocks:
                                i = b.index * DIGEST_SIZE
                                blocks[i:i + DIGEST_SIZE] = b.digest
                                if b.kind == CLAIMED:
                                    self._foreign.add(b.digest)
                        finally:
                            item.release()
                    elif isinstance(item, DiskEnd):
                        end = item
            finally:
                self._drain()
            if end is None:
                raise UpstreamEndedError(f"{task.id}: the source stopped before the end of the disk")
        return DiskRecord(
            name=task.disk, size=header.size, source=task.url, identity=header.identity, metadata=header.metadata,
            change_id=header.change_id, base=task.base_point if header.from_base else None,
            hinted=header.from_base, stats=end.stats, blocks=bytes(blocks),
        )
