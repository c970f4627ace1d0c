"""The job manager and the resource limits, observed through instrumented plugins: a source that
counts how many are open at once and can be held, and a repository backend that can be slowed."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import blockferry
import msgspec
import pytest
from blockferry import registry
from blockferry.actors.server import running_server
from blockferry.jobs.config import (
    CopyTarget,
    DiskSpec,
    JobSpec,
    ObjectSpec,
    ProxyConfig,
    RepositorySettings,
    ServerConfig,
)
from blockferry.plugins.file_source import FileSourcePlugin
from blockferry.plugins.local import LocalBackendPlugin
from blockferry.processes import process_start
from blockferry.repo.locks import LockInfo
from blockferry.repo.retention import RetentionPolicy
from blockferry.repo.store import LOCK_KEY
from blockferry.runtime.settings import EngineSettings

from tests.conftest import KiB, MiB, mixed_disk, registered, same_file, write_disk

pytestmark = pytest.mark.anyio

BS = 256 * KiB


class ProbeDisk:
    """A file disk read through async reads only (neither ReadsBlocking nor MapsBlocking), that
    records concurrency and can be held."""

    def __init__(self, plugin: ProbeSource, inner: Any) -> None:
        self._plugin = plugin
        self._inner = inner
        self.url, self.name, self.size = inner.url, inner.name, inner.size
        self.identity, self.metadata, self.change_id = inner.identity, inner.metadata, None

    async def data_extents(self) -> Any:
        return await self._inner.data_extents()

    async def read_into(self, offset: int, buffers: Sequence[Any]) -> int:
        await self._plugin.gate.wait()
        n = await self._inner.read_into(offset, buffers)
        self._plugin.read_bytes += n
        return n

    async def aclose(self) -> None:
        self._plugin.open_now -= 1
        await self._inner.aclose()


class ProbeSource:
    """Source plugin ``probe:PATH``: the file at PATH, instrumented."""

    scheme = "probe"

    def __init__(self) -> None:
        self.opened: list[str] = []
        self.open_now = 0
        self.peak = 0
        self.read_bytes = 0
        self.gate = anyio.Event()
        self.gate.set()

    def disk_name(self, url: str) -> str:
        return Path(url.removeprefix("probe:")).name

    async def open(self, url: str, options: Mapping[str, Any]) -> ProbeDisk:
        inner = await FileSourcePlugin().open(url.removeprefix("probe:"), {})
        self.opened.append(url)
        self.open_now += 1
        self.peak = max(self.peak, self.open_now)
        await anyio.sleep(0.01)  # long enough for the other tasks to start if limits allowed
        return ProbeDisk(self, inner)


class SlowUpload:
    def __init__(self, backend: SlowBackend, inner: Any) -> None:
        self._backend, self._inner, self.key = backend, inner, inner.key

    async def write(self, parts: Sequence[Any]) -> int:
        b = self._backend
        await anyio.sleep(b.delay)
        n = await self._inner.write(parts)
        b.written += n
        b.lag.append(b.probe.read_bytes - b.written)
        return n

    async def commit(self) -> None:
        await self._inner.commit()

    async def abort(self) -> None:
        await self._inner.abort()


class SlowBackend:
    """The local backend with uploads slowed by ``delay`` seconds per write."""

    def __init__(self, inner: Any, probe: ProbeSource, delay: float) -> None:
        self._inner = inner
        self.probe = probe
        self.delay = delay
        self.written = 0
        self.lag: list[int] = []
        self.url, self.capabilities = inner.url, inner.capabilities

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def open_upload(self, key: str) -> SlowUpload:
        return SlowUpload(self, await self._inner.open_upload(key))

    def list(self, prefix: str) -> AsyncIterator[Any]:
        return self._inner.list(prefix)


@pytest.fixture
def probe() -> Any:
    with registered(registry.SOURCES, "probe", ProbeSource()) as p:
        yield p


async def make_repo(tmp_path: Path) -> str:
    repo = str(tmp_path / "repo")
    await blockferry.init_repository(repo, block_size=BS)
    return repo


def disks(tmp_path: Path, n: int, size: int = 2 * MiB) -> list[Path]:
    return [mixed_disk(tmp_path / f"d{i}.img", size, seed=i) for i in range(n)]


def job(name: str, objects: list[tuple[str, list[str]]], **kw: Any) -> JobSpec:
    return JobSpec(name=name, repository="main",
                   objects=[ObjectSpec(name=o, disks=[DiskSpec(source=s) for s in srcs]) for o, srcs in objects], **kw)


PROBE = ["file", "probe"]


async def test_a_job_applies_its_retention_then_makes_its_immediate_copies(tmp_path: Path) -> None:
    """After its run, a job has the repository's actor prune its objects and copy the new points
    (each copy with its own retention); a periodic target is left to the scheduler."""
    repo = await make_repo(tmp_path)
    copy, periodic = str(tmp_path / "copy"), str(tmp_path / "periodic")
    for url in (copy, periodic):
        await blockferry.init_repository(url, block_size=BS)
    keep_one = RetentionPolicy(keep_last=1)
    spec = job("j", [("vm", [str(tmp_path / "vm.img")])], retention=keep_one,
               copy_to=[CopyTarget(url=copy, retention=keep_one), CopyTarget(url=periodic, every_hours=1)])
    sessions = []
    async with running_server() as server:
        await server.add_repository(RepositorySettings(name="main", url=repo))
        for seed in (1, 2):
            mixed_disk(tmp_path / "vm.img", 2 * MiB, seed=seed)
            sessions.append(await (await server.run_job(spec)).result())
    first, second = sessions
    assert [s.state for s in sessions] == ["success", "success"] and not first.warnings
    assert first.pruned == [] and second.pruned == first.points  # the job's retention, in its repository
    assert first.copied == {copy: first.points} and second.copied == {copy: second.points}
    for url, points in ((repo, second.points), (copy, second.points), (periodic, [])):
        async with blockferry.open_repository(url) as r:
            assert [p.id for p in await r.points()] == points, url


async def test_limits_are_never_exceeded(tmp_path: Path, probe: ProbeSource) -> None:
    repo = await make_repo(tmp_path)
    imgs = disks(tmp_path, 8)
    cfg = ServerConfig(proxies=[ProxyConfig(name="p1", max_tasks=2, transports=PROBE),
                                ProxyConfig(name="p2", max_tasks=2, transports=PROBE)])
    async with running_server(cfg) as server:
        await server.add_repository(RepositorySettings(name="main", url=repo, max_tasks=3))
        handle = await server.run_job(job("j", [(f"vm{i}", [f"probe:{img}"]) for i, img in enumerate(imgs)]))
        session = await handle.result()
        status = await server.status()
    assert session.state == "success" and len(session.points) == 8
    proxies = {p.name: p for p in status.proxies}
    assert all(p.peak <= 2 for p in proxies.values())
    assert proxies["p1"].tasks_run > 0 and proxies["p2"].tasks_run > 0  # both proxies used
    assert status.repositories[0].peak <= 3
    assert probe.peak <= 3  # never more sources open than the repository allows tasks
    assert probe.peak >= 2  # and the limits did allow parallel work


async def test_job_limit(tmp_path: Path, probe: ProbeSource) -> None:
    repo = await make_repo(tmp_path)
    imgs = disks(tmp_path, 4)
    cfg = ServerConfig(proxies=[ProxyConfig(name="p", max_tasks=4, transports=PROBE)])
    async with running_server(cfg) as server:
        await server.add_repository(RepositorySettings(name="main", url=repo, max_tasks=4))
        handle = await server.run_job(job("j", [("vm", [f"probe:{i}" for i in imgs])], max_tasks=1))
        session = await handle.result()
    assert session.state == "success" and probe.peak == 1


async def test_waiting_tasks_show_as_waiting_and_objects_start_in_order(tmp_path: Path, probe: ProbeSource) -> None:
    repo = await make_repo(tmp_path)
    imgs = disks(tmp_path, 3)
    probe.gate = anyio.Event()  # reads wait until the test lets them go
    cfg = ServerConfig(proxies=[ProxyConfig(name="p", max_tasks=1, transports=PROBE)])
    async with running_server(cfg) as server:
        await server.add_repository(RepositorySettings(name="main", url=repo))
        handle = await server.run_job(job("j", [(f"vm{i}", [f"probe:{img}"]) for i, img in enumerate(imgs)]))
        with anyio.fail_after(10):
            while not probe.opened:
                await anyio.sleep(0.01)
        status = handle.manager.status()
        assert [t.state for t in status.tasks] == ["running", "waiting", "waiting"]
        assert status.tasks[0].proxy == "p"
        probe.gate.set()
        session = await handle.result()
    assert session.state == "success"
    assert probe.opened == [f"probe:{img}" for img in imgs]  # in the order the job lists them


@pytest.mark.parametrize("reason", ["free space", "locked", "unreachable", "writable"])
async def test_unavailable_repository_fails_the_task_before_any_source_opens(
        tmp_path: Path, probe: ProbeSource, reason: str) -> None:
    repo = await make_repo(tmp_path)
    (img,) = disks(tmp_path, 1)
    settings = RepositorySettings(name="main", url=repo, min_free_bytes=(1 << 62) if reason == "free space" else 0)
    sleeper = None
    if reason == "locked":  # a live process of this host holds the writer lock
        sleeper = subprocess.Popen(["sleep", "60"])
        info = LockInfo(host=socket.gethostname(), pid=sleeper.pid, pid_start=process_start(sleeper.pid),
                        created="2026-01-01T00:00:00+00:00", purpose="backup")
        (Path(repo) / "locks").mkdir()
        (Path(repo) / LOCK_KEY).write_bytes(msgspec.json.encode(info))
    try:
        cfg = ServerConfig(proxies=[ProxyConfig(name="p", transports=PROBE)])
        async with running_server(cfg) as server:
            r = await server.add_repository(settings)
            if reason == "unreachable":
                os.rename(repo, repo + ".moved")
            if reason == "writable":
                async def refuse() -> None:
                    raise blockferry.RepositoryError("read-only filesystem")
                r.store.backend.check_writable = refuse
            handle = await server.run_job(job("j", [("vm", [f"probe:{img}"])], retries=0))
            session = await handle.result()
    finally:
        if sleeper:
            sleeper.kill()
            sleeper.wait()
    assert session.state == "failed"
    error = session.objects[0].error or ""
    expect = {"free space": f"main at {repo} has ", "locked": f"pid {sleeper.pid if sleeper else 0}",
              "unreachable": "not reachable", "writable": "not writable"}[reason]
    assert expect in error
    assert probe.opened == []  # no source was opened


async def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    repo = await make_repo(tmp_path)
    (img,) = disks(tmp_path, 1)
    dead = subprocess.Popen(["true"])
    dead.wait()
    info = LockInfo(host=socket.gethostname(), pid=dead.pid, pid_start="1", created="2026-01-01T00:00:00+00:00",
                    purpose="backup")
    (Path(repo) / "locks").mkdir()
    (Path(repo) / LOCK_KEY).write_bytes(msgspec.json.encode(info))
    async with blockferry.open_repository(repo) as r:
        s = await r.backup([str(img)], name="vm")
    assert s.state == "success"
    assert not (Path(repo) / LOCK_KEY).exists()  # released after the backup


async def test_slow_repository_slows_the_reader(tmp_path: Path, probe: ProbeSource) -> None:
    """Backpressure: with a slow repository the source never reads more than the bounded
    pipeline can hold ahead of what was written."""
    repo = await make_repo(tmp_path)
    img = write_disk(tmp_path / "big.img", 24 * MiB, [(0, "random", 24 * MiB)])
    inner = await LocalBackendPlugin().open(repo, {})
    slow = SlowBackend(inner, probe, delay=0.02)
    engine = EngineSettings(batch_bytes=4 * BS, stream_batches=2, lanes=2)
    store = await blockferry.repo.store.RepositoryStore.open(slow)
    cfg = ServerConfig(proxies=[ProxyConfig(name="p", transports=PROBE)], engine=engine)
    async with running_server(cfg) as server:
        await server.add_repository(RepositorySettings(name="main", url=repo), store)
        handle = await server.run_job(job("j", [("vm", [f"probe:{img}"])]))
        session = await handle.result()
    assert session.state == "success"
    # stream (2 batches) + one batch per lane being processed + one being written + one read
    bound = (engine.stream_batches + engine.lanes + 2) * engine.batch_bytes
    assert max(slow.lag) <= bound, (max(slow.lag), bound)
    assert probe.read_bytes == 24 * MiB
    async with blockferry.open_repository(repo) as r:
        await r.restore("latest", tmp_path / "out")
    assert same_file(tmp_path / "out" / "big.img", img)


async def test_unreachable_source_is_a_clear_error(tmp_path: Path, probe: ProbeSource) -> None:
    repo = await make_repo(tmp_path)
    (img,) = disks(tmp_path, 1)
    cfg = ServerConfig(proxies=[ProxyConfig(name="p", transports=["file"], reach=[str(tmp_path / "elsewhere")])])
    async with running_server(cfg) as server:
        await server.add_repository(RepositorySettings(name="main", url=repo))
        session = await (await server.run_job(job("j", [("vm", [str(img)])], retries=0))).result()
    assert session.state == "failed"
    assert "no proxy can reach" in (session.objects[0].error or "")


async def test_a_failed_object_does_not_stop_the_others(tmp_path: Path) -> None:
    repo = await make_repo(tmp_path)
    a, b = disks(tmp_path, 2)
    async with running_server() as server:
        await server.add_repository(RepositorySettings(name="main", url=repo))
        spec = job("j", [("good", [str(a)]), ("bad", [str(tmp_path / "missing.img")]), ("good2", [str(b)])],
                   retries=0)
        session = await (await server.run_job(spec)).result()
    states = {o.name: o.state for o in session.objects}
    assert states == {"good": "done", "bad": "failed", "good2": "done"}
    assert session.state == "failed"
    assert "missing.img" in (session.objects[1].error or "")
    async with blockferry.open_repository(repo) as r:
        assert {p.object for p in await r.points()} == {"good", "good2"}


async def test_inflight_budget_bounds_memory_across_tasks(tmp_path: Path, probe: ProbeSource) -> None:
    """However many tasks run, no more than ``inflight_batches`` batches are read and not yet
    written at any moment."""
    repo = await make_repo(tmp_path)
    imgs = [write_disk(tmp_path / f"r{i}.img", 8 * MiB, [(0, "random", 8 * MiB)], seed=i) for i in range(4)]
    inner = await LocalBackendPlugin().open(repo, {})
    slow = SlowBackend(inner, probe, delay=0.01)
    engine = EngineSettings(batch_bytes=4 * BS, stream_batches=4, lanes=2, inflight_batches=3)
    store = await blockferry.repo.store.RepositoryStore.open(slow)
    cfg = ServerConfig(proxies=[ProxyConfig(name="p", max_tasks=4, transports=PROBE)], engine=engine)
    async with running_server(cfg) as server:
        await server.add_repository(RepositorySettings(name="main", url=repo, max_tasks=4), store)
        session = await (await server.run_job(job("j", [(f"vm{i}", [f"probe:{p}"]) for i, p in enumerate(imgs)]))).result()
        assert server.runtime.inflight.value == 3  # every token came back
    assert session.state == "success"
    assert probe.peak == 4  # the four tasks did run together
    assert max(slow.lag) <= engine.inflight_batches * engine.batch_bytes, max(slow.lag)


class FailingUpload(SlowUpload):
    async def write(self, parts: Sequence[Any]) -> int:
        self._backend.writes += 1
        if self._backend.writes > 3:
            raise blockferry.RepositoryError("disk on fire")
        return await super().write(parts)


async def test_tokens_come_back_when_a_task_fails(tmp_path: Path, probe: ProbeSource) -> None:
    repo = await make_repo(tmp_path)
    imgs = [write_disk(tmp_path / f"r{i}.img", 8 * MiB, [(0, "random", 8 * MiB)], seed=i) for i in range(2)]
    inner = await LocalBackendPlugin().open(repo, {})
    slow = SlowBackend(inner, probe, delay=0.0)
    slow.writes = 0

    async def open_upload(key: str) -> FailingUpload:
        return FailingUpload(slow, await inner.open_upload(key))

    slow.open_upload = open_upload  # type: ignore[method-assign]
    engine = EngineSettings(batch_bytes=2 * BS, inflight_batches=4)
    store = await blockferry.repo.store.RepositoryStore.open(slow)
    cfg = ServerConfig(proxies=[ProxyConfig(name="p", transports=PROBE)], engine=engine)
    async with running_server(cfg) as server:
        await server.add_repository(RepositorySettings(name="main", url=repo), store)
        session = await (await server.run_job(job("j", [("vm", [f"probe:{p}" for p in imgs])], retries=0))).result()
        assert session.state == "failed" and "disk on fire" in (session.objects[0].error or "")
        assert server.runtime.inflight.value == 4
        assert store.index.claims == {}  # no claim outlives its task
