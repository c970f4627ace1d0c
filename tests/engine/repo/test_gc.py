"""Garbage collection: frees exactly the unreferenced data, is safe beside a running backup, and
finishes after being killed at any moment."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import blockferry
import pytest
from blockferry import registry
from blockferry.errors import RepositoryError
from blockferry.plugins.local import LocalBackendPlugin
from blockferry.repo import gc
from blockferry.repo import store as store_module
from blockferry.repo.format import INDEX_RECORD, decode_index
from blockferry.repo.retention import RetentionPolicy
from blockferry.repo.store import GC_LOCK_KEY, GC_PLAN_KEY, RepositoryStore

from tests.conftest import KiB, registered, same_file

pytestmark = pytest.mark.anyio

BS = 256 * KiB


def disk_with(path: Path, seeds: Sequence[int]) -> Path:
    """A disk of len(seeds) random blocks, block i made from seeds[i] (equal seeds: equal blocks)."""
    import random

    with open(path, "wb") as f:
        for s in seeds:
            f.write(random.Random(s).randbytes(BS))
    return path


def pack_files(repo: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (repo / "packs").rglob("*") if p.is_file()}


def indexed(repo: Path) -> dict[bytes, str]:
    out: dict[bytes, str] = {}
    for f in (repo / "index").iterdir():
        idx = decode_index(f.read_bytes(), f.name)
        for digest, pno, *_ in INDEX_RECORD.iter_unpack(idx.records):
            out[digest] = idx.packs[pno]
    return out


async def referenced(repo: Path) -> set[bytes]:
    async with blockferry.open_repository(str(repo)) as r:
        refs: set[bytes] = set()
        for p in await r.points():
            refs |= r.store.referenced(await r.point(p.id))
        return refs


async def make_repo(path: Path, pack_size: int = 4 * BS) -> Path:
    await blockferry.init_repository(str(path), block_size=BS, pack_size=pack_size)
    return path


def entries_by_pack(repo: Path) -> dict[str, list[tuple[bytes, int]]]:
    out: dict[str, list[tuple[bytes, int]]] = {}
    for f in (repo / "index").iterdir():
        idx = decode_index(f.read_bytes(), f.name)
        for digest, pno, _off, length, *_ in INDEX_RECORD.iter_unpack(idx.records):
            out.setdefault(idx.packs[pno], []).append((digest, length))
    return out


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
async def test_collection_frees_exactly_the_unreferenced_data(tmp_path: Path, threshold: float) -> None:
    repo = await make_repo(tmp_path / "repo")
    a = disk_with(tmp_path / "a.img", range(0, 12))
    b = disk_with(tmp_path / "b.img", list(range(8, 16)))  # shares 4 blocks with a
    # one block per write: several packs; one lane, so the blocks reach the packs in disk order
    engine = blockferry.EngineSettings(batch_bytes=BS, lanes=1)
    async with blockferry.open_repository(str(repo), engine=engine) as r:
        sa = await r.backup([str(a)], name="a")
        sb = await r.backup([str(b)], name="b")
        await r.delete(sa.points[0])
        live = await referenced(repo)
        # what the rules say must go: packs all dead, and packs at least `threshold` dead
        expect: set[bytes] = set()
        for entries in entries_by_pack(repo).values():
            dead = [(d, n) for d, n in entries if d not in live]
            total = sum(n for _, n in entries)
            if dead and (len(dead) == len(entries) or sum(n for _, n in dead) >= threshold * total):
                continue
            expect |= {d for d, _ in entries}
        expect |= live
        before = pack_files(repo)
        report = await r.gc(rewrite_threshold=threshold)
        assert report.state == "done"
        assert (await r.verify()).healthy
        await r.restore(sb.points[0], tmp_path / "out")
    assert same_file(tmp_path / "out" / "b.img", b)
    idx = indexed(repo)
    after = pack_files(repo)
    assert set(idx) == expect  # exactly the unreferenced data the rules select went, nothing else
    assert set(idx.values()) == set(after)  # no pack without index entries, no entry without pack
    assert report.chunks_removed == 8  # a's own 8 blocks
    assert report.bytes_freed == sum(before.values()) - sum(after.values())
    if threshold < 1.0:
        assert set(idx) == live
    assert not (repo / GC_PLAN_KEY).exists()


async def test_nothing_to_collect(tmp_path: Path) -> None:
    repo = await make_repo(tmp_path / "repo")
    a = disk_with(tmp_path / "a.img", range(4))
    async with blockferry.open_repository(str(repo)) as r:
        await r.backup([str(a)], name="a")
        before = pack_files(repo)
        report = await r.gc()
    assert report.state == "nothing to do" and pack_files(repo) == before


# -- beside a running backup ------------------------------------------------------------------------


class HeldDisk:
    """A file disk read through its async reads only (neither ReadsBlocking nor MapsBlocking),
    which wait at the plugin's gate."""

    def __init__(self, plugin: HeldSource, inner: Any) -> None:
        self._plugin = plugin
        self._inner = inner
        self.url, self.name, self.size = inner.url, inner.name, inner.size
        self.identity, self.metadata, self.change_id = inner.identity, inner.metadata, inner.change_id

    async def data_extents(self) -> Any:
        return await self._inner.data_extents()

    async def read_into(self, offset: int, buffers: Any) -> int:
        self._plugin.reading.set()
        await self._plugin.gate.wait()
        return int(await self._inner.read_into(offset, buffers))

    async def aclose(self) -> None:
        await self._inner.aclose()


class HeldSource:
    """The file source, whose reads wait at a gate: holds a backup in the middle of its run."""

    scheme = "held"

    def __init__(self) -> None:
        self.gate = anyio.Event()
        self.reading = anyio.Event()

    def disk_name(self, url: str) -> str:
        return Path(url.removeprefix("held:")).name

    async def open(self, url: str, options: Any) -> Any:
        from blockferry.plugins.file_source import FileSourcePlugin

        return HeldDisk(self, await FileSourcePlugin().open(url.removeprefix("held:"), {}))


@pytest.fixture
def held() -> AsyncIterator[HeldSource]:
    with registered(registry.SOURCES, "held", HeldSource()) as h:
        yield h


async def test_backup_started_before_the_collection_keeps_its_chunks(tmp_path: Path, held: HeldSource) -> None:
    """The backup dedups against chunks of a deleted point; a collection run while it is in
    progress is deferred (or waits), and every point stays whole."""
    from blockferry.jobs.config import ProxyConfig

    repo = await make_repo(tmp_path / "repo")
    old = disk_with(tmp_path / "old.img", range(8))
    new = disk_with(tmp_path / "new.img", range(8))  # the same data as the deleted point
    async with blockferry.open_repository(str(repo)) as r:
        s = await r.backup([str(old)], name="old")
        await r.delete(s.points[0])
    async with blockferry.open_repository(
            str(repo), proxies=[ProxyConfig(name="p", transports=["file", "held"])]) as writer, \
            blockferry.open_repository(str(repo)) as collector:
        async with anyio.create_task_group() as tg:
            result: list[Any] = []

            async def backup() -> None:
                result.append(await writer.backup([f"held:{new}"], name="new"))

            tg.start_soon(backup)
            with anyio.fail_after(20):
                await held.reading.wait()  # the backup runs, its lock taken before any plan
            deferred = await collector.gc()
            assert deferred.state == "deferred" and "a backup" in deferred.reason
            assert (repo / GC_PLAN_KEY).exists()

            async def release() -> None:
                await anyio.sleep(0.2)
                held.gate.set()

            tg.start_soon(release)
            done = await collector.gc(wait=30)  # waits until the backup has ended, then sweeps
        assert done.state == "done"
    (session,) = result
    assert session.state == "success"
    assert session.objects[0].disks[0].stats.new_bytes == 0  # it relied on the old chunks...
    async with blockferry.open_repository(str(repo)) as r:
        assert (await r.verify()).healthy  # ...which the collection kept
        await r.restore("latest", tmp_path / "out")
    assert same_file(tmp_path / "out" / "new.img", new)


async def test_backup_started_after_the_plan_never_uses_condemned_chunks(tmp_path: Path) -> None:
    repo = await make_repo(tmp_path / "repo")
    old = disk_with(tmp_path / "old.img", range(8))
    async with blockferry.open_repository(str(repo)) as r:
        s = await r.backup([str(old)], name="old")
        await r.delete(s.points[0])
        plan, _ = await gc.mark(r.store)  # a collection marked, then was interrupted
        assert plan is not None and len(plan.condemned) == 8 * 32
    async with blockferry.open_repository(str(repo)) as r:
        s2 = await r.backup([str(old)], name="again")  # the same data
        st = s2.objects[0].disks[0].stats
        assert st.new_bytes == 8 * BS and st.dedup_bytes == 0  # stored again, not deduplicated
        report = await r.gc()
        # the old copies went (the new point has its own), no copy was moved
        assert report.state == "done" and report.chunks_removed == 8 and report.packs_written == 0
        assert report.packs_deleted >= 1 and report.bytes_freed >= 8 * BS
        assert (await r.verify()).healthy
        await r.restore(s2.points[0], tmp_path / "out")
    assert same_file(tmp_path / "out" / "old.img", old)


async def test_a_reader_defers_the_sweep(tmp_path: Path) -> None:
    repo = await make_repo(tmp_path / "repo")
    a = disk_with(tmp_path / "a.img", range(8))
    async with blockferry.open_repository(str(repo)) as r:
        s = await r.backup([str(a)], name="a")
        await r.backup([str(disk_with(tmp_path / "b.img", range(100, 104)))], name="b")
        await r.delete(s.points[0])
        async with r.store.reading("a long restore"):
            report = await r.gc()
        assert report.state == "deferred" and "a long restore" in report.reason
        assert (await r.gc()).state == "done"


# -- killed at any moment ------------------------------------------------------------------------


class Crash(RepositoryError):
    """The simulated death of the collecting process."""


class CrashingBackend:
    """The local backend until the ``crash_at``-th change (put, delete, upload commit); from
    then on every call fails, as if the process had died (nothing runs after a SIGKILL)."""

    def __init__(self, inner: Any, crash_at: int) -> None:
        self._inner = inner
        self.crash_at = crash_at
        self.changes = 0
        self.dead = False
        self.url, self.capabilities = inner.url, inner.capabilities

    def _step(self) -> None:
        if self.dead:
            raise Crash("dead")
        self.changes += 1
        if self.changes == self.crash_at:
            self.dead = True
            raise Crash(f"killed at change {self.changes}")

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr) or name in ("list",):
            return attr

        async def call(*a: Any, **k: Any) -> Any:
            if self.dead:
                raise Crash("dead")
            return await attr(*a, **k)

        return call if name not in ("get_ranges_sync", "is_protected") else attr

    # the local backend's optional capabilities, forwarded explicitly: a runtime-checkable
    # isinstance does not see __getattr__ (Python 3.12 looks attributes up statically)
    def map_sync(self, key: str, size: int) -> Any:
        return self._inner.map_sync(key, size)

    def clean_tmp(self, **kw: Any) -> int:
        return int(self._inner.clean_tmp(**kw))

    async def protect(self, key: str, until: str) -> bool:
        if self.dead:
            raise Crash("dead")
        return bool(await self._inner.protect(key, until))

    async def unprotect(self, key: str) -> bool:
        if self.dead:
            raise Crash("dead")
        return bool(await self._inner.unprotect(key))

    def list(self, prefix: str) -> AsyncIterator[Any]:
        if self.dead:
            raise Crash("dead")
        return self._inner.list(prefix)

    async def put(self, key: str, data: bytes, **kw: Any) -> None:
        self._step()
        await self._inner.put(key, data, **kw)

    async def delete(self, key: str) -> None:
        self._step()
        await self._inner.delete(key)

    async def open_upload(self, key: str) -> Any:
        if self.dead:
            raise Crash("dead")
        upload = await self._inner.open_upload(key)
        backend = self

        class U:
            def __init__(self) -> None:
                self.key = key

            async def write(self, parts: Any) -> int:
                if backend.dead:
                    raise Crash("dead")
                return await upload.write(parts)

            async def commit(self) -> None:
                backend._step()
                await upload.commit()

            async def abort(self) -> None:
                if not backend.dead:
                    await upload.abort()

        return U()


async def build_garbage(root: Path) -> tuple[Path, list[tuple[str, Path]]]:
    repo = await make_repo(root / "repo")
    keep: list[tuple[str, Path]] = []
    async with blockferry.open_repository(str(repo)) as r:
        for i in range(4):
            img = disk_with(root / f"d{i}.img", [i * 100 + k for k in range(6)] + [7, 8])
            s = await r.backup([str(img)], name=f"vm{i}")
            if i % 2:
                keep.append((s.points[0], img))
            else:
                await r.delete(s.points[0])
    return repo, keep


async def test_a_collection_killed_at_any_change_is_finished_by_the_next(tmp_path: Path) -> None:
    # how many changes a whole collection makes
    template, _ = await build_garbage(tmp_path / "template")
    backend = CrashingBackend(await LocalBackendPlugin().open(str(template), {}), crash_at=10 ** 9)
    store = await RepositoryStore.open(backend)
    await store.load_index()
    assert (await gc.collect(store, rewrite_threshold=0.0)).state == "done"
    total = backend.changes
    assert total >= 6
    for k in range(1, total + 1):
        root = tmp_path / f"k{k}"
        shutil.copytree(tmp_path / "template", root, symlinks=True, ignore=shutil.ignore_patterns("repo"))
        repo, keep = await build_garbage(root)
        backend = CrashingBackend(await LocalBackendPlugin().open(str(repo), {}), crash_at=k)
        store = await RepositoryStore.open(backend)
        await store.load_index()
        with pytest.raises(Crash):
            await gc.collect(store, rewrite_threshold=0.0)
        # the dead process's lock stays behind; an operator (or the stale check, for another pid)
        # removes it
        (repo / GC_LOCK_KEY).unlink(missing_ok=True)
        async with blockferry.open_repository(str(repo)) as r:
            assert (await r.verify()).healthy, f"after a crash at change {k}"
            report = await r.gc(rewrite_threshold=0.0)
            assert report.state in ("done", "nothing to do")
            assert (await r.verify()).healthy
            for pid, img in keep:
                out = root / f"out-{pid}"
                await r.restore(pid, out)
                assert same_file(out / img.name, img), f"after a crash at change {k}"
        assert set(indexed(repo)) == await referenced(repo)  # all garbage gone in the end
        assert not (repo / GC_PLAN_KEY).exists()


async def test_prune_then_gc_from_the_cli(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    repo = await make_repo(tmp_path / "repo")
    img = disk_with(tmp_path / "d.img", range(4))
    async with blockferry.open_repository(str(repo)) as r:
        for i in range(3):
            with open(img, "r+b") as f:
                f.write(os.urandom(BS))
            await r.backup([str(img)], name="vm")

    def bf(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "blockferry", *args], capture_output=True, text=True, timeout=60)

    dry = bf("prune", str(repo), "--keep-last", "1", "--dry-run")
    lines = dry.stdout.splitlines()
    assert dry.returncode == 0 and sum(ln.startswith("remove ") for ln in lines) == 2 and "last 1" in dry.stdout
    assert "would remove 2 of 3 points" in dry.stdout
    assert len(json.loads(bf("points", str(repo), "--json").stdout)) == 3  # a dry run removes nothing
    out = json.loads(bf("prune", str(repo), "--keep-last", "1", "--json").stdout)
    assert len(out["removed"]) == 2
    g = json.loads(bf("gc", str(repo), "--json").stdout)
    assert g["state"] == "done" and g["bytes_freed"] > 0
    assert bf("verify", str(repo)).returncode == 0
    assert bf("prune", str(repo)).returncode == 2  # no rule given
    policy = RetentionPolicy(keep_last=1)
    assert policy.describe() == "last 1"


async def test_a_long_open_repository_sees_a_collection_made_by_another_process(tmp_path: Path) -> None:
    """A daemon keeps its repository open between jobs: a collection run meanwhile by another
    process must not leave it deduplicating against chunks that are gone."""
    repo = await make_repo(tmp_path / "repo")
    old = disk_with(tmp_path / "old.img", range(8))
    async with blockferry.open_repository(str(repo)) as daemon:
        s = await daemon.backup([str(old)], name="old")
        async with blockferry.open_repository(str(repo)) as other:
            await other.delete(s.points[0])
            report = await other.gc()
            assert report.state == "done" and report.chunks_removed == 8
        s2 = await daemon.backup([str(old)], name="again")  # the same data, after the collection
        assert s2.objects[0].disks[0].stats.new_bytes == 8 * BS  # stored again, not deduplicated
        assert (await daemon.verify()).healthy
        await daemon.restore(s2.points[0], tmp_path / "out")
    assert same_file(tmp_path / "out" / "old.img", old)


async def test_compaction_merges_the_index_files_as_they_are(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that started after a collection's plan does not hold up its sweep; when that
    writer then compacts the index, it must merge what the sweep left, not its own memory of
    where chunks were before the sweep moved them."""
    monkeypatch.setattr(store_module, "INDEX_COMPACT_AT", 1)
    repo = await make_repo(tmp_path / "repo", pack_size=8 * BS)
    whole = disk_with(tmp_path / "whole.img", range(8))
    half = disk_with(tmp_path / "half.img", range(4))  # the first half of the same blocks
    new = disk_with(tmp_path / "new.img", range(200, 202))
    async with blockferry.open_repository(str(repo)) as r:
        s = await r.backup([str(whole)], name="whole")
        kept = (await r.backup([str(half)], name="half")).points[0]
        await r.delete(s.points[0])  # its pack is now half dead: a collection rewrites it
    async with blockferry.open_repository(str(repo)) as writer:
        await writer.store.load_index()  # knows where the chunks are before the collection
        async with blockferry.open_repository(str(repo)) as other:
            plan, _ = await gc.mark(other.store)
            assert plan is not None and len(plan.rewrite_packs) == 1
            await writer.store.lock("a backup that started after the plan")
            report = await gc.collect(other.store)
            assert report.state == "done" and report.packs_rewritten == 1  # the writer did not hold it up
        s3 = await writer.backup([str(new)], name="new")  # commits, and compacts the index
    assert len(list((repo / "index").iterdir())) == 1
    assert set(entries_by_pack(repo)) == set(pack_files(repo))  # no entry names a deleted pack
    async with blockferry.open_repository(str(repo)) as r:
        assert (await r.verify()).healthy
        await r.restore(kept, tmp_path / "a")
        await r.restore(s3.points[0], tmp_path / "b")
    assert same_file(tmp_path / "a" / "half.img", half) and same_file(tmp_path / "b" / "new.img", new)
