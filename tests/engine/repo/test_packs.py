"""Packs that an add fills are sealed while the adding task goes on (engine/repo/packs.py PackWriter,
``spawn``), at most MAX_SEALING at once; without ``spawn`` the add seals before it returns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import blockferry
import pytest
from blockferry.plugins.local import LocalBackendPlugin
from blockferry.repo.packs import MAX_SEALING, PackWriter
from blockferry.repo.store import RepositoryStore

pytestmark = pytest.mark.anyio

MiB = 1 << 20


class GatedBackend:
    """A real local backend whose pack uploads commit only once ``gate`` is set."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.gate = anyio.Event()
        self.committing = 0  #: commits waiting at the gate now
        self.committed: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def open_upload(self, key: str) -> Any:
        upload = await self._inner.open_upload(key)
        backend = self

        class Gated:
            def __getattr__(self, name: str) -> Any:
                return getattr(upload, name)

            async def commit(self) -> None:
                backend.committing += 1
                try:
                    await backend.gate.wait()
                finally:
                    backend.committing -= 1
                await upload.commit()
                backend.committed.append(key)

        return Gated()


async def gated_store(tmp_path: Path) -> tuple[RepositoryStore, GatedBackend]:
    repo = str(tmp_path / "repo")
    await blockferry.init_repository(repo, compression="none", pack_size=MiB)
    backend = GatedBackend(await LocalBackendPlugin().open(repo, {}))
    store = await RepositoryStore.open(backend)  # type: ignore[arg-type]
    await store.load_index()
    return store, backend


async def until(check: Any) -> None:
    """Wait (up to 5 s) until ``check()`` holds; uploads write in worker threads, which
    ``wait_all_tasks_blocked`` does not wait for on every backend."""
    with anyio.fail_after(5):
        while not check():
            await anyio.sleep(0.01)


def pack_of_chunks(n: int, seed: int) -> list[tuple[bytes, bytes, int, int]]:
    """Chunks that fill one 1 MiB pack (the digests need only be distinct here)."""
    return [(bytes([seed, i]) * 16, bytes([i]) * (MiB // 2), MiB // 2, 0) for i in range(n)]


async def test_a_filled_pack_is_sealed_while_the_task_goes_on_and_at_most_max_at_once(tmp_path: Path) -> None:
    store, backend = await gated_store(tmp_path)
    async with anyio.create_task_group() as seals:
        writer = store.writer(seals.start_soon)
        assert isinstance(writer, PackWriter)
        for p in range(MAX_SEALING):
            with anyio.fail_after(5):  # returns although the pack's commit waits at the gate
                await writer.add(pack_of_chunks(2, p))
        await until(lambda: backend.committing == MAX_SEALING)
        assert backend.committed == []
        # one pack more: it must wait until the oldest being sealed is done
        returned = anyio.Event()

        async def one_more() -> None:
            await writer.add(pack_of_chunks(2, 99))
            returned.set()

        seals.start_soon(one_more)
        await anyio.sleep(0.2)
        assert not returned.is_set() and backend.committing == MAX_SEALING
        backend.gate.set()
        with anyio.fail_after(5):
            await returned.wait()
        await writer.finish()
    assert len(backend.committed) == MAX_SEALING + 1
    # every chunk is in a sealed pack the index can find
    for p in (*range(MAX_SEALING), 99):
        for digest, *_ in pack_of_chunks(2, p):
            assert store.index.lookup(digest) is not None


async def test_without_spawn_the_add_that_fills_a_pack_seals_it_first(tmp_path: Path) -> None:
    store, backend = await gated_store(tmp_path)
    writer = store.writer()
    returned = anyio.Event()

    async def fill() -> None:
        await writer.add(pack_of_chunks(2, 1))
        returned.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(fill)
        await until(lambda: backend.committing == 1)
        assert not returned.is_set()
        backend.gate.set()
    assert returned.is_set() and len(backend.committed) == 1


async def test_a_failed_seal_fails_the_task_that_spawned_it_and_forgets_its_chunks(tmp_path: Path) -> None:
    store, backend = await gated_store(tmp_path)

    async def broken_commit() -> None:
        raise OSError("disk on fire")

    original = backend.open_upload

    async def open_broken(key: str) -> Any:
        upload = await original(key)
        upload.commit = broken_commit
        return upload

    backend.open_upload = open_broken  # type: ignore[method-assign]
    chunks = pack_of_chunks(2, 7)
    with pytest.raises(BaseException) as info:
        async with anyio.create_task_group() as seals:
            writer = store.writer(seals.start_soon)
            await writer.add(chunks)
            await anyio.sleep(5)  # the failing seal cancels this
    assert "disk on fire" in repr(info.value)
    assert all(store.index.lookup(d) is None for d, *_ in chunks)
