"""A backup that fills the repository's filesystem, on a real (small) tmpfs: it fails with the
"no space left" error itself, without retries that would only report the free space then, and
the packs it wrote are gone when it ends, so the next backup works without a gc."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import blockferry
import pytest
from blockferry.actors.server import running_server
from blockferry.errors import NoSpaceError
from blockferry.jobs.config import DiskSpec, JobSpec, ObjectSpec, ProxyConfig, RepositorySettings, ServerConfig
from blockferry.repo.store import RepositoryStore

from tests.conftest import KiB, MiB, same_file, write_disk

pytestmark = pytest.mark.anyio


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def files(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


async def backup(repo: Path, disk: Path, *, retries: int = 2) -> object:
    """A backup as the daemon runs it: the repository's availability check wants 2 MiB free."""
    backend = await blockferry.registry.backend_plugin(str(repo)).open(str(repo), {})
    try:
        store = await RepositoryStore.open(backend)
        cfg = ServerConfig(proxies=[ProxyConfig(name="local")])
        async with running_server(cfg) as server:
            await server.add_repository(RepositorySettings(name="small", url=str(repo), min_free_bytes=2 * MiB),
                                        store)
            handle = await server.run_job(JobSpec(name="j", repository="small", retries=retries, retry_delay=0.01,
                                                  objects=[ObjectSpec(name="vm", disks=[DiskSpec(source=str(disk))])]))
            result = await handle.result()
        await store.close()
        return result
    finally:
        await backend.aclose()


async def test_a_full_filesystem_fails_with_its_own_error_and_leaves_no_packs(tmp_path: Path, small_fs: Path) -> None:
    repo = small_fs / "repo"
    await blockferry.init_repository(str(repo), block_size=256 * KiB, pack_size=512 * KiB)
    before = files(repo)
    big = write_disk(tmp_path / "big.img", 12 * MiB, [(0, "random", 12 * MiB)], seed=1)
    result = await backup(repo, big)
    obj = result.objects[0]  # type: ignore[attr-defined]
    assert result.state == "failed" and obj.attempts == 1, obj  # type: ignore[attr-defined]
    assert "no space left" in (obj.error or "") and "free" not in (obj.error or "").replace("space left", ""), obj.error
    # what the failed backup wrote is gone: the filesystem is as empty as before
    assert files(repo) == before
    assert shutil.disk_usage(small_fs).free > 5 * MiB
    # and the next backup works at once, no gc needed
    small = write_disk(tmp_path / "small.img", 2 * MiB, [(0, "random", 2 * MiB)], seed=2)
    result = await backup(repo, small)
    assert result.state == "success", result.objects[0].error  # type: ignore[attr-defined]
    async with blockferry.open_repository(str(repo)) as r:
        (point,) = await r.points()
        await r.restore(point.id, tmp_path / "out")
        assert (await r.verify()).healthy
    assert same_file(tmp_path / "out" / "small.img", small)


def test_enospc_and_quota_are_no_space_errors() -> None:
    import errno

    from blockferry.plugins.local import _translate

    for code in (errno.ENOSPC, errno.EDQUOT):
        err = _translate(OSError(code, os.strerror(code)), "writing packs/ab/abc")
        assert isinstance(err, NoSpaceError) and not err.transient and "no space left" in str(err)
