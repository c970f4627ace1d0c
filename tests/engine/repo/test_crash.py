"""A backup killed at any moment (SIGKILL, no cleanup) leaves a consistent repository: it opens,
verifies clean, lists only whole restore points, and the next backup succeeds (taking over the
dead process's lock) and restores bit-exact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import blockferry
import pytest

from tests.conftest import KiB, MiB, same_file, write_disk

pytestmark = pytest.mark.anyio


def start_backup(repo: Path, img: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "blockferry", "backup", str(repo), str(img), "--name", "vm", "-q"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def wait_for(repo: Path, what: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> bool:
    """Poll until the backup reaches a stage; False if it finished first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if what == "started" and (repo / "locks" / "writer").exists():
            return True
        if what == "upload" and (repo / "tmp").is_dir() and any((repo / "tmp").iterdir()):
            return True
        if what == "pack" and any(p.is_file() for p in (repo / "packs").rglob("*")):
            return True
        if what == "index" and any((repo / "index").glob("*")):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.0005)
    raise AssertionError(f"backup never reached {what}")


@pytest.fixture(scope="module")
def big_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("disk")
    return write_disk(d / "big.img", 96 * MiB, [(0, "random", 40 * MiB), (48 * MiB, "text", 40 * MiB)], seed=42)


@pytest.mark.parametrize("stage", ["started", "upload", "pack", "index"])
async def test_killed_backup_leaves_a_consistent_repository(tmp_path: Path, big_disk: Path, stage: str) -> None:
    repo = tmp_path / "repo"
    await blockferry.init_repository(str(repo), block_size=256 * KiB)
    proc = start_backup(repo, big_disk)
    try:
        reached = wait_for(repo, stage, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert reached, f"the backup finished before reaching {stage}"

    async with blockferry.open_repository(str(repo)) as r:
        report = await r.verify()
        assert report.healthy
        points = await r.points()
        assert len(points) <= 1  # a whole point, or none
        for p in points:
            await r.restore(p.id, tmp_path / f"restore-{p.id}")
            assert same_file(tmp_path / f"restore-{p.id}" / "big.img", big_disk)
        # the next backup succeeds: the dead writer's lock is recognised as stale
        s = await r.backup([str(big_disk)], name="vm")
        assert s.state == "success"
        await r.restore(s.points[0], tmp_path / "after")
        assert (await r.verify()).healthy
    assert same_file(tmp_path / "after" / "big.img", big_disk)
    # what the killed process left in tmp/ was cleaned when the lock was taken over
    assert not [p for p in (repo / "tmp").iterdir() if not p.name.startswith(f"{os.getpid()}-")]
