"""The source mover's lanes for sources read in blocking calls (image files): a worker thread per
lane takes the lane's batches itself (``_ThreadLane``). Real image files, a real local repository."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anyio
import blockferry
import pytest
from blockferry.actors.server import running_server
from blockferry.actors.source_mover import _ThreadLane
from blockferry.datapath.blocks import BlockProcessor
from blockferry.errors import SourceChangedError
from blockferry.jobs.config import DiskSpec, JobSpec, ObjectSpec, ProxyConfig, RepositorySettings, ServerConfig
from blockferry.plugins.file_source import FileDisk, MappedFileDisk
from blockferry.runtime.settings import EngineSettings

from tests.actors.test_job import BS, job, make_repo
from tests.conftest import MiB, same_file, write_disk

pytestmark = pytest.mark.anyio


def count_bursts(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record what every burst of every thread lane returned (True: the lane's end)."""
    ended: list[bool] = []
    burst = _ThreadLane._burst

    def counting(self: _ThreadLane, post: Any) -> bool:
        r = burst(self, post)
        ended.append(r)
        return r

    monkeypatch.setattr(_ThreadLane, "_burst", counting)
    return ended


async def test_each_lane_hops_to_its_thread_once_not_once_per_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = await make_repo(tmp_path)
    img = write_disk(tmp_path / "a.img", 8 * MiB, [(0, "random", 3 * MiB), (4 * MiB, "text", 4 * MiB)], seed=3)
    monkeypatch.setattr(_ThreadLane, "IDLE", 60.0)  # a burst ends only with the lane
    bursts = count_bursts(monkeypatch)
    engine = EngineSettings(batch_bytes=2 * BS, lanes=2)  # 16 batches (the hole among them)
    cfg = ServerConfig(proxies=[ProxyConfig(name="p")], engine=engine)
    async with running_server(cfg) as server:
        await server.add_repository(RepositorySettings(name="main", url=repo))
        session = await (await server.run_job(job("j", [("vm", [str(img)])]))).result()
        assert server.runtime.inflight.value == engine.inflight_batches  # every token came back
    assert session.state == "success"
    assert bursts == [True, True]  # two lanes, one thread hop each, for all the batches
    async with blockferry.open_repository(repo) as r:
        await r.restore("latest", tmp_path / "out")
    assert same_file(tmp_path / "out" / "a.img", img)


class Gate:
    """A bandwidth limit that lets nothing through until opened."""

    def __init__(self) -> None:
        self.entered = anyio.Event()
        self.open = anyio.Event()

    async def consume(self, nbytes: int) -> None:
        self.entered.set()
        await self.open.wait()


async def test_a_held_lane_gives_its_cpu_slot_to_other_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With one CPU thread, a task whose batches cannot go on (its bandwidth limit holds them)
    must not keep the thread: another job's task gets it and finishes first."""
    repo = await make_repo(tmp_path)
    held_img = write_disk(tmp_path / "held.img", 8 * MiB, [(0, "random", 8 * MiB)], seed=1)
    free_img = write_disk(tmp_path / "free.img", 8 * MiB, [(0, "random", 8 * MiB)], seed=2)
    bursts = count_bursts(monkeypatch)
    engine = EngineSettings(batch_bytes=2 * BS, lanes=2, cpu_threads=1, inflight_batches=8)
    cfg = ServerConfig(proxies=[ProxyConfig(name="p", max_tasks=2)], engine=engine)
    gate = Gate()
    with anyio.fail_after(60):
        async with running_server(cfg) as server:
            await server.add_repository(RepositorySettings(name="main", url=repo, max_tasks=2))
            held = await server.run_job(job("held", [("vm1", [str(held_img)])]), throttles=[gate])
            await gate.entered.wait()
            free = await server.run_job(job("free", [("vm2", [str(free_img)])]))
            free_session = await free.result()  # would wait for the gate if the held lane kept the thread
            assert free_session.state == "success"
            gate.open.set()
            held_session = await held.result()
            assert held_session.state == "success"
            assert server.runtime.inflight.value == engine.inflight_batches
    assert False in bursts  # a burst did end for want of batches
    async with blockferry.open_repository(repo) as r:
        await r.restore("latest", tmp_path / "out")
    assert same_file(tmp_path / "out" / "held.img", held_img)


async def test_a_batch_failing_in_the_thread_fails_the_task_and_returns_every_token(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = await make_repo(tmp_path)
    img = write_disk(tmp_path / "a.img", 8 * MiB, [(0, "random", 8 * MiB)], seed=4)
    calls = 0
    lock = threading.Lock()
    process = BlockProcessor.process

    def failing(self: BlockProcessor, first: int, count: int, bufs: Any = None) -> Any:
        nonlocal calls
        with lock:
            calls += 1
            n = calls
        if n == 5:
            raise SourceChangedError(f"{self.url}: changed under the test")
        return process(self, first, count, bufs)

    monkeypatch.setattr(BlockProcessor, "process", failing)
    engine = EngineSettings(batch_bytes=2 * BS, lanes=2, inflight_batches=4)
    cfg = ServerConfig(proxies=[ProxyConfig(name="p")], engine=engine)
    with anyio.fail_after(60):
        async with running_server(cfg) as server:
            await server.add_repository(RepositorySettings(name="main", url=repo))
            session = await (await server.run_job(job("j", [("vm", [str(img)])], retries=0))).result()
            assert server.runtime.inflight.value == 4
    assert session.state == "failed"
    assert "changed under the test" in (session.objects[0].error or "")
    assert calls < 16  # the other lane stopped instead of reading the rest of the disk


@pytest.mark.parametrize("options,used", [({}, "map_blocking"), ({"mmap": "false"}, "read_blocking")])
async def test_the_mover_reads_through_the_capabilities_the_disk_offers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: dict[str, Any], used: str) -> None:
    """An image file offers MapsBlocking (the mover maps each batch), with ``mmap=false`` only
    ReadsBlocking (the mover reads each batch with preadv); neither goes through ``read_into``."""
    repo = await make_repo(tmp_path)
    img = write_disk(tmp_path / "a.img", 4 * MiB, [(0, "random", MiB), (2 * MiB, "text", 2 * MiB)], seed=5)
    calls = {"map_blocking": 0, "read_blocking": 0, "read_into": 0}
    for cls, name in [(MappedFileDisk, "map_blocking"), (FileDisk, "read_blocking"), (FileDisk, "read_into")]:
        real = getattr(cls, name)

        def counted(*a: Any, _real: Any = real, _name: str = name) -> Any:
            calls[_name] += 1
            return _real(*a)

        monkeypatch.setattr(cls, name, counted)
    cfg = ServerConfig(proxies=[ProxyConfig(name="p")])
    spec = JobSpec(name="j", repository="main",
                   objects=[ObjectSpec(name="vm", disks=[DiskSpec(source=str(img), options=options)])])
    async with running_server(cfg) as server:
        await server.add_repository(RepositorySettings(name="main", url=repo))
        session = await (await server.run_job(spec)).result()
    assert session.state == "success"
    assert calls[used] > 0
    assert {k: v for k, v in calls.items() if k != used} == {k: 0 for k in calls if k != used}, calls
