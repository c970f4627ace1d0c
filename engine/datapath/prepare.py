"""Compressing an incremental's hinted blocks while a remote repository opens.

A fresh process needs about half a second to open an S3 repository before it can classify a
single block: aiobotocore's imports and service models (on one core), then a handful of requests.
The other core has nothing to do meanwhile. With changed-extent hints the blocks to read are known
before the repository is, so :func:`prepare_chunks` compresses them on that core into a
:class:`~blockferry.datapath.blocks.PreparedChunks`, and the backup's lanes take the compressed chunks by
hash instead of compressing again (they still read and hash every block).

Nothing here can make a backup wrong: a chunk's compressed form depends only on its bytes (named
by the hash) and the zstd level. The repository's settings are not known yet, so the default
block size and compression are assumed; a repository with other settings finds no prepared chunk
and has lost only the idle core's time. Preparing stops when the lanes start, when the memory
budget (``EngineSettings.prepare_bytes``) is full, or when every hinted block is done, and it
never fails a backup: a source it cannot open or a hint file it cannot read is left to the
backup's own checks, which report them properly.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AsyncExitStack
from typing import Any

import anyio
import anyio.to_thread
from blockferry.datapath.blocks import NEW, BlockProcessor, PreparedChunks
from blockferry.datapath.extents import intersect, to_blocks
from blockferry.datapath.hints import load_hints
from blockferry.datapath.plan import Run, batches
from blockferry.datapath.source import MapsBlocking, ReadsBlocking
from blockferry.log import get_logger
from blockferry.registry import scheme_of, source_plugin
from blockferry.repo.format import FLAG_ZSTD
from blockferry.repo.index import ChunkIndex
from blockferry.runtime.buffers import BufferPool

log = get_logger()

#: bytes of blocks per worker-thread hop. Each hop needs the event loop's thread, which waits for
#: the GIL while the imports hold it. By hand on the benchmark's incremental (198 hinted blocks in
#: runs of a few blocks), hops of 2 MiB had prepared 80-88 blocks when the lanes started, hops of
#: up to 8 MiB across runs 84-111, and the command ended 0.1-0.3 s sooner. The lanes, once
#: started, take what the hop in flight prepares, so a larger hop wastes nothing.
_PREPARE_HOP_BYTES = 8 << 20


async def prepare_chunks(chunks: PreparedChunks, hints: Mapping[str, str], block_size: int) -> None:
    """Compress the blocks that ``hints`` (source → changed-extent file) name into ``chunks``,
    one worker thread at a time, round-robin over the sources, until ``chunks.stopped``, the
    budget is full, or all are done."""
    try:
        async with AsyncExitStack() as stack:
            work: list[tuple[BlockProcessor, Iterator[list[Run]]]] = []
            index = ChunkIndex()  # private: a block seen twice is compressed once
            owner = object()
            for source, hint_file in hints.items():
                if scheme_of(source) != "file":  # a VM's disks are reached another way
                    continue
                try:
                    item = await _setup(stack, source, hint_file, block_size, chunks.level, index, owner)
                except Exception as exc:  # the backup's own checks report it properly
                    log.debug("prepare_skipped", source=source, error=str(exc))
                    continue
                if item is not None:
                    work.append(item)
            while work:
                for item in list(work):
                    if chunks.stopped or chunks.full:
                        return
                    processor, todo = item
                    hop = next(todo, None)
                    if hop is None:
                        work.remove(item)
                        continue
                    await anyio.to_thread.run_sync(_prepare_hop, chunks, processor, hop)
    except Exception as exc:  # a source that fails now fails the backup properly; this was a head start
        log.debug("prepare_stopped", error=str(exc))
    finally:
        log.debug("prepared", chunks=chunks.prepared, held_bytes=chunks.held, stopped=chunks.stopped)


async def _setup(stack: AsyncExitStack, source: str, hint_file: str, block_size: int, level: int,
                 index: ChunkIndex, owner: object) -> tuple[BlockProcessor, Iterator[list[Run]]] | None:
    """The source opened (closed with ``stack``) and its hinted blocks that hold data, in batches."""
    extents = load_hints(hint_file)
    disk = await source_plugin(source).open(source, {})
    stack.push_async_callback(disk.aclose)
    nblocks = -(-disk.size // block_size)
    runs = to_blocks(extents, block_size, nblocks)
    data = await disk.data_extents()
    if data is not None:
        runs = intersect(runs, to_blocks(data, block_size, nblocks))
    read = disk.read_blocking if isinstance(disk, ReadsBlocking) else None
    mapped = disk.map_blocking if isinstance(disk, MapsBlocking) else None
    if not runs or (read is None and mapped is None):
        return None
    per = max(1, _PREPARE_HOP_BYTES // block_size)
    processor = BlockProcessor(url=source, size=disk.size, block_size=block_size, level=level, index=index,
                               owner=owner, claimed=set(), read=read, map=mapped, pool=BufferPool(block_size, per))
    return processor, _hops(runs, per)


def _hops(runs: list[Run], per: int) -> Iterator[list[Run]]:
    """Runs grouped into hops of at most ``per`` blocks (hints are often many short runs)."""
    hop: list[Run] = []
    room = per
    for first, n in batches(runs, per):
        if n > room:
            yield hop
            hop, room = [], per
        hop.append((first, n))
        room -= n
    if hop:
        yield hop


def _prepare_hop(chunks: PreparedChunks, processor: BlockProcessor, hop: list[Run]) -> None:
    for first, n in hop:
        for b in processor.process(first, n).blocks:
            if b.kind == NEW:
                chunks.add(b.digest, b.payload if b.flags & FLAG_ZSTD else None)


def wants_preparing(url: str, hints: Mapping[str, Any] | None, budget: int) -> bool:
    """Worth it only where opening the repository leaves a core idle: not a local directory,
    which opens in a few milliseconds."""
    return bool(hints) and budget > 0 and scheme_of(url) != "file"
