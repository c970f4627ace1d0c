"""The store on its own, over a real local backend: chunks written through a pack writer and a
point committed are what a fresh process finds; the commit refuses a point whose chunks are not
stored; the writer lock keeps a second writer out; points resolve by id prefix."""

from __future__ import annotations

import os
from pathlib import Path

import blake3
import blockferry
import pytest
from blockferry.errors import ChunkLostError, NotFoundError, RepositoryLockedError
from blockferry.plugins.local import LocalBackendPlugin
from blockferry.repo.chunks import decode_chunk
from blockferry.repo.format import HOLE, DiskRecord, Manifest, new_point_id, utc_now
from blockferry.repo.store import RepositoryStore

pytestmark = pytest.mark.anyio

BS = 256 << 10


async def open_store(repo: Path) -> RepositoryStore:
    store = await RepositoryStore.open(await LocalBackendPlugin().open(str(repo), {}))
    await store.load_index()
    return store


def point(blocks: list[bytes], size: int) -> Manifest:
    disk = DiskRecord(name="vda", size=size, source="vda.img", blocks=b"".join(blocks))
    return Manifest(id=new_point_id(), object="vm", created=utc_now(), block_size=BS, disks=[disk])


async def test_a_committed_point_and_its_chunks_are_what_a_fresh_store_finds(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    await blockferry.init_repository(str(repo), block_size=BS, compression="none")
    blocks = [os.urandom(BS) for _ in range(3)]
    digests = [blake3.blake3(b).digest() for b in blocks]
    store = await open_store(repo)
    await store.lock("test")
    writer = store.writer()
    await writer.add([(d, b, BS, 0) for d, b in zip(digests, blocks)])
    await writer.close()
    m = point([digests[0], HOLE, digests[1], digests[2]], 4 * BS)
    await store.commit(m)
    await store.unlock()
    await store.close()

    again = await open_store(repo)
    try:
        assert await again.point_ids() == [m.id]
        assert await again.resolve_point(m.id[:6]) == m.id
        assert (await again.manifest(m.id)).disks[0].blocks == m.disks[0].blocks
        assert len(again.index) == 3
        for d, b in zip(digests, blocks):
            pack, offset, length, raw_len, flags = again.locate(d) or (None, 0, 0, 0, 0)
            assert pack is not None
            stored = await again.backend.get(pack, offset, length)
            assert decode_chunk(stored, raw_len, flags, d) == b
        with pytest.raises(NotFoundError):
            await again.resolve_point("ffffffffffff")
    finally:
        await again.close()


async def test_a_point_whose_chunks_were_never_stored_is_not_committed(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    await blockferry.init_repository(str(repo), block_size=BS, compression="none")
    store = await open_store(repo)
    try:
        await store.lock("test")
        with pytest.raises(ChunkLostError):
            await store.commit(point([blake3.blake3(b"never written").digest()], BS))
        assert await store.point_ids() == []
    finally:
        await store.close()


async def test_the_writer_lock_keeps_a_second_writer_out_until_released(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    await blockferry.init_repository(str(repo), block_size=BS)
    first, second = await open_store(repo), await open_store(repo)
    try:
        await first.lock("backup")
        with pytest.raises(RepositoryLockedError):
            await second.lock("backup")
        await first.unlock()
        await second.lock("backup")
        assert second.locked
    finally:
        await first.close()
        await second.close()
