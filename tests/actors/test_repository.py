"""The repository actor: the backend it opens for a repository is closed when it stops, and when
the repository cannot be opened after all (a daemon adding and removing repositories must not
keep their connections); lifecycle runs and copies are messages it handles on its own store."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import blockferry
import msgspec
import pytest
import zstandard
from blockferry import registry
from blockferry.actors.repository import copy_points
from blockferry.actors.server import running_server
from blockferry.errors import BlockferryError
from blockferry.jobs.catalog import LifecycleSpec
from blockferry.jobs.config import DiskSpec, JobSpec, ObjectSpec, RepositorySettings
from blockferry.jobs.messages import CopyPoints, FindRepository, RunLifecycle
from blockferry.plugins.local import LocalBackendPlugin
from blockferry.repo.retention import RetentionPolicy

from tests.conftest import KiB, MiB, mixed_disk, registered

pytestmark = pytest.mark.anyio


class CountingLocal:
    """The local backend plugin, counting the backends it opened that are not closed yet."""

    scheme = "file"

    def __init__(self) -> None:
        self.opened = 0
        self.open_now = 0

    async def open(self, url: str, options: Mapping[str, Any]) -> Any:
        backend = await LocalBackendPlugin().open(url, options)
        self.opened += 1
        self.open_now += 1
        close = backend.aclose

        async def aclose() -> None:
            self.open_now -= 1
            await close()

        backend.aclose = aclose
        return backend


@pytest.fixture
def counting() -> Iterator[CountingLocal]:
    with registered(registry.BACKENDS, "file", CountingLocal()) as plugin:
        yield plugin


async def test_the_backend_is_closed_when_the_server_stops(tmp_path: Path, counting: CountingLocal) -> None:
    repo = str(tmp_path / "repo")
    await blockferry.init_repository(repo, block_size=256 * KiB)
    img = mixed_disk(tmp_path / "d.img", 2 * MiB, seed=3)
    spec = JobSpec(name="j", repository="main", objects=[ObjectSpec(name="vm", disks=[DiskSpec(source=str(img))])])
    before = counting.opened
    async with running_server() as server:
        await server.add_repository(RepositorySettings(name="main", url=repo))
        session = await (await server.run_job(spec)).result()
        assert session.state == "success"
        assert counting.opened > before and counting.open_now == 1  # the actor's own, still open
    assert counting.open_now == 0


async def test_the_backend_is_closed_when_the_repository_cannot_be_opened(
        tmp_path: Path, counting: CountingLocal) -> None:
    empty = tmp_path / "not-a-repository"
    empty.mkdir()
    async with running_server() as server:
        with pytest.raises(BlockferryError):
            await server.add_repository(RepositorySettings(name="main", url=str(empty)))
    assert counting.opened == 1 and counting.open_now == 0


async def test_the_backend_is_closed_when_the_index_cannot_be_loaded(tmp_path: Path, counting: CountingLocal) -> None:
    """The store opens, then its index turns out unreadable (a format this build does not know;
    a damaged index file no longer stops a store, see tests/engine/repo/test_damage.py): the
    actor fails for good and closes the store and the backend it had opened."""
    repo = tmp_path / "repo"
    await blockferry.init_repository(str(repo), block_size=256 * KiB)
    img = mixed_disk(tmp_path / "d.img", 2 * MiB, seed=4)
    async with blockferry.open_repository(str(repo)) as r:
        assert (await r.backup([str(img)], name="vm")).state == "success"
    (index,) = (repo / "index").iterdir()
    index.write_bytes(zstandard.ZstdCompressor().compress(msgspec.msgpack.encode({"version": 99, "packs": [], "records": b""})))
    async with running_server() as server:
        with pytest.raises(BlockferryError, match="index"):
            await server.add_repository(RepositorySettings(name="main", url=str(repo)))
        assert counting.opened >= 1 and counting.open_now == 0
    assert counting.open_now == 0


async def three_points(tmp_path: Path) -> tuple[str, list[str]]:
    """A repository with three points of object ``vm`` (each of new content); (its URL, the
    points oldest first)."""
    repo = str(tmp_path / "repo")
    await blockferry.init_repository(repo, block_size=256 * KiB)
    points = []
    async with blockferry.open_repository(repo) as r:
        for seed in (1, 2, 3):
            img = mixed_disk(tmp_path / "vm.img", 2 * MiB, seed=seed)
            points.append((await r.backup([str(img)], name="vm")).points[0])
    return repo, points


async def test_the_repository_actor_runs_a_lifecycle_run_on_its_store_when_asked(tmp_path: Path) -> None:
    """A prune job's run is a message to the repository's actor: the server gives the actor's
    reference, the actor prunes its own store and answers with the outcome and the session."""
    repo, points = await three_points(tmp_path)
    steps: list[tuple[int, int]] = []
    async with running_server() as server:
        await server.add_repository(RepositorySettings(name="main", url=repo))
        assert await server.ask(FindRepository("elsewhere")) is None
        actor = await server.ask(FindRepository("main"))
        spec = LifecycleSpec(name="tidy", type="prune", repository="main", retention=RetentionPolicy(keep_last=1))
        outcome, result = await actor.ask_work(RunLifecycle(spec, "tidy", "2026-01-05T21:00:00+00:00"))
        assert (outcome.state, outcome.note) == ("success", None)
        assert (result.job, result.started) == ("tidy", "2026-01-05T21:00:00+00:00")
        assert sorted(result.pruned) == sorted(points[:2])
        assert result.summary.startswith("removed 2 of 3 point(s), kept 1")
        # a copy is a message to the same actor: the one point left goes to a new repository
        copy = str(tmp_path / "copy")
        await blockferry.init_repository(copy, block_size=256 * KiB)
        order = CopyPoints(to=copy, objects=["vm"], latest=True, progress=lambda *step: steps.append(step))
        report = await copy_points(actor, order, timeout=10)
        assert report.points == [points[2]] and steps[-1] == (1, 1)
    async with blockferry.open_repository(repo) as r:
        assert [p.id for p in await r.points()] == [points[2]]
    async with blockferry.open_repository(copy) as r:
        assert [p.id for p in await r.points()] == [points[2]]
