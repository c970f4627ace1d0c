"""Restore a point's disk into a VM disk: a qcow2 image, a raw image, or any NBD target.

qcow2 images are written through a ``qemu-nbd`` this module starts (and always stops), so that
QEMU's own code lays out the clusters; raw files and block devices go through the file restore
path (:func:`blockferry.restore.files.restore_disk`). Everything NBD-side uses
:mod:`blockferry.nbd.client`: each window of blocks is read from the repository (chunks checked
against their ids, through the same cache as ``blockferry serve``) and written with several
requests in flight; holes of a fresh image are skipped, holes of an existing target are zeroed
(``WRITE_ZEROES``, punching when the target can). A damaged chunk stops the restore with its
offset, or with ``allow_damaged`` is written as zeros and reported.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
from blockferry.errors import ConfigError, SourceError, plain_errors
from blockferry.log import get_logger
from blockferry.nbd.client import NBDClient, is_nbd_url, wait_until_listening
from blockferry.repo.format import DiskRecord, Manifest
from blockferry.repo.store import RepositoryStore
from blockferry.restore.files import RestoreResult, restore_disk
from blockferry.restore.serve import ChunkCache, PointDisk
from blockferry.runtime.resources import Runtime

log = get_logger(component="restore_image")

#: bytes read from the repository and written to the target per request window
WINDOW = 4 << 20
LANES = 4


def image_format(path: Path) -> str | None:
    """``qcow2``/``raw``/... of an existing image (None if it does not exist)."""
    if not path.exists():
        return None
    if not path.is_file():
        return "raw"  # a block device
    try:
        out = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(path)], capture_output=True, check=True)
    except FileNotFoundError:
        raise ConfigError("qemu-img is needed to restore into a qcow2 image (install qemu-utils)") from None
    except subprocess.CalledProcessError as exc:
        raise ConfigError(f"{path}: not an image qemu-img can read ({exc.stderr.decode(errors='replace').strip()})") from None
    fmt: str = msgspec.json.decode(out.stdout)["format"]
    return fmt


async def restore_to_nbd(store: RepositoryStore, manifest: Manifest, record: DiskRecord, url: str, *,
                         runtime: Runtime, fresh: bool = False, allow_damaged: bool = False,
                         label: str | None = None) -> RestoreResult:
    """Write ``record`` of ``manifest`` onto the NBD export at ``url``. ``fresh``: the target
    reads as zeros already (a new image), so holes are not written."""
    t0 = time.monotonic()
    client = await NBDClient.connect(url, error=SourceError, max_inflight=16)
    res = RestoreResult(point=manifest.id, disk=record.name, path=label or url, size=record.size)
    try:
        if client.info.read_only:
            raise ConfigError(f"{url}: the NBD export is read-only")
        if client.size < record.size:
            raise ConfigError(f"{url}: the target holds {client.size} bytes, the disk {record.size}")
        cache = ChunkCache(store, runtime, capacity=LANES * WINDOW * 2)
        disk = PointDisk(manifest, record, cache)
        window = max(WINDOW // manifest.block_size, 1) * manifest.block_size
        offsets = iter(range(0, record.size, window))

        async def lane() -> None:
            for off in offsets:  # lanes share the iterator
                n = min(window, record.size - off)
                for pos, ln, data in await disk.read(off, n):
                    if isinstance(data, BaseException):
                        if not allow_damaged:
                            raise data
                        res.damaged_ranges.append((pos, ln))
                        data = None
                    if data is None:
                        res.hole_bytes += ln
                        if not fresh:
                            await client.write_zeroes(pos, ln)
                    else:
                        await client.write(pos, data)
                        res.data_bytes += ln

        with plain_errors():  # the caller gets the CorruptionError, not the lanes' group
            async with anyio.create_task_group() as tg:
                for _ in range(LANES):
                    tg.start_soon(lane)
        await client.flush()
    finally:
        await client.aclose()
    res.damaged_ranges.sort()
    res.duration = time.monotonic() - t0
    log.info("restored_to_nbd", point=manifest.id, disk=record.name, target=res.path, data_bytes=res.data_bytes,
             damaged=len(res.damaged_ranges))
    return res


async def restore_to_qcow2(store: RepositoryStore, manifest: Manifest, record: DiskRecord, path: Path, *,
                           runtime: Runtime, allow_damaged: bool = False) -> RestoreResult:
    """Write the disk into the qcow2 image ``path`` (created at the disk's size if missing; an
    existing one must be at least that large and is overwritten)."""
    fresh = not path.exists()
    if fresh:
        await _run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(record.size)])
    work = Path(tempfile.mkdtemp(prefix="bf-rst-", dir="/tmp" if os.path.isdir("/tmp") else None))
    sock = work / "nbd.sock"
    proc = await anyio.open_process(["qemu-nbd", "--persistent", "--format=qcow2", "--cache=writeback", "--discard=unmap",
                                     "--socket", str(sock), str(path)])
    try:
        if not await wait_until_listening(str(sock), proc):
            raise ConfigError(f"{path}: qemu-nbd did not start (is a VM using the image?)")
        return await restore_to_nbd(store, manifest, record, f"nbd+unix:///?socket={sock}", runtime=runtime,
                                    fresh=fresh, allow_damaged=allow_damaged, label=str(path))
    except BaseException:
        if fresh:
            with anyio.CancelScope(shield=True):
                await _stop(proc)
            path.unlink(missing_ok=True)  # never leave half a new image behind
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await _stop(proc)
        shutil.rmtree(work, ignore_errors=True)


async def _stop(proc: Any) -> None:
    if proc.returncode is None:
        proc.terminate()
        with anyio.move_on_after(20) as scope:
            await proc.wait()
        if scope.cancelled_caught:
            proc.kill()
            await proc.wait()
    await proc.aclose()


async def _run(argv: list[str]) -> None:
    try:
        p = await anyio.run_process(argv, check=False)
    except OSError as exc:
        raise ConfigError(f"cannot run {argv[0]} ({exc.strerror}); install qemu-utils") from exc
    if p.returncode:
        raise ConfigError(f"{' '.join(argv[:3])} failed: {p.stderr.decode(errors='replace').strip()}")


async def restore_image(repo: Any, point: str, target: str, *, disk: str | None = None, fmt: str | None = None,
                        allow_damaged: bool = False) -> RestoreResult:
    """``blockferry restore-image``: one disk of ``point`` onto ``target``, an NBD URL or an image
    path (its format from the file, or ``fmt`` / the ``.qcow2`` suffix for a new one)."""
    m, record = await repo.point_disk(point, disk)
    async with repo.store.reading("restore"):
        await repo.store.load_index()
        await repo.store.find_unindexed(repo.store.referenced(m))
        await repo.store.prepare_read([m], repo.archive_progress)
        if is_nbd_url(target):
            return await restore_to_nbd(repo.store, m, record, target, runtime=repo.runtime,
                                        allow_damaged=allow_damaged)
        path = Path(target)
        kind = image_format(path) or fmt or ("qcow2" if path.suffix == ".qcow2" else "raw")
        if kind == "qcow2":
            return await restore_to_qcow2(repo.store, m, record, path, runtime=repo.runtime,
                                          allow_damaged=allow_damaged)
        if kind != "raw":
            raise ConfigError(f"{path}: a {kind} image; restore into qcow2, raw, a block device or an NBD URL")
        if not path.exists():
            path.touch()
            os.truncate(path, record.size)
        return await restore_disk(repo.store, m, record, path, runtime=repo.runtime, into_existing=True,
                                  allow_damaged=allow_damaged)


__all__ = ["restore_image", "restore_to_nbd", "restore_to_qcow2"]
