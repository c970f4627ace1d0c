"""Storage system ``rbd``: Ceph RBD images as volumes, RBD snapshots as storage snapshots.

URL: ``rbd://POOL[?conf=/etc/ceph/ceph.conf&id=admin]`` (``conf`` and ``id`` may also be given
as options, and ``timeout``: seconds before an unanswering cluster counts as unreachable, 60 by
default); volumes are ``POOL/IMAGE``.

Everything goes through the ``rbd`` command (``ceph-common``), run with :func:`anyio.run_process`:
blockferry's virtualenv cannot import Debian's ``python3-rbd`` bindings (they are built for the
system Python and live only in its site-packages), the CLI prints JSON for everything used here,
and a command that hangs on an unreachable cluster is bounded by ``client_mount_timeout`` and a
cancel scope, where a librbd call in a thread could not be cancelled.

Snapshots of several images: **per-image snapshots taken concurrently**, not RBD group
snapshots. Ceph 16.2 (pacific, the version here) has ``rbd group snap create``, which quiesces
I/O on every image of the group and snapshots them atomically, but the image snapshots it makes
live in the group namespace (``.group.N_ID_ID``) and cannot be named by ``rbd diff``,
``rbd export`` or QEMU's rbd driver in this version (both answer "No such file or directory";
tried on the test cluster), so they can be neither diffed nor read. Concurrent ``rbd snap create``
calls put the snapshots a few milliseconds apart; the spread is recorded with the snapshots.
Each snapshot alone is crash-consistent.

A snapshot is exposed to the proxy as a read-only NBD export: ``qemu-nbd`` with QEMU's rbd
driver (package ``qemu-block-extra``) on a private Unix socket, read by the engine's NBD client.
``rbd export`` streams a whole image and cannot read chosen extents; ``rbd-nbd`` and krbd need the
kernel's nbd/rbd modules, which containers and test machines often lack.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import anyio
import msgspec
from anyio.abc import Process
from blockferry.datapath.extents import merge
from blockferry.datapath.source import Extent
from blockferry.datapath.storage import Exposure, Snapshot, Volume, is_retained, is_temporary
from blockferry.errors import ConfigError, NotFoundError, SourceError
from blockferry.log import get_logger
from blockferry.nbd.client import NBDAddress, wait_until_listening

log = get_logger(component="rbd")

DEFAULT_CONF = "/etc/ceph/ceph.conf"
#: seconds a command may take before the cluster counts as unreachable
TIMEOUT = 60.0
_SETPRIV = shutil.which("setpriv")


class _DiffEntry(msgspec.Struct):
    offset: int
    length: int
    exists: str | bool = "true"


class _Snap(msgspec.Struct):
    name: str
    size: int = 0
    timestamp: str = ""


class _Listed(msgspec.Struct):
    image: str
    size: int = 0
    format: int = 2
    snapshot: str | None = None


def parse_url(url: str, options: Mapping[str, Any]) -> tuple[str, str | None, str, str | None]:
    """``rbd://POOL[/IMAGE][?conf=..&id=..]`` → (pool, image or None, conf, id or None)."""
    parts = urlsplit(url)
    if parts.scheme != "rbd" or not parts.netloc:
        raise ConfigError(f"{url}: an RBD URL is rbd://POOL/IMAGE (or rbd://POOL for the storage system)")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    pool = unquote(parts.netloc)
    image = unquote(parts.path.strip("/")) or None
    if image is not None and ("/" in image or "@" in image):
        raise ConfigError(f"{url}: the image name may contain neither '/' nor '@'")
    conf = str(options.get("conf") or query.get("conf") or DEFAULT_CONF)
    user = options.get("id") or query.get("id")
    return pool, image, conf, str(user) if user else None


def _timestamp(text: str) -> str | None:
    """``Mon Dec  7 19:51:14 2026`` (the cluster's local time, as ``rbd snap ls`` prints it)."""
    try:
        return dt.datetime.strptime(" ".join(text.split()), "%a %b %d %H:%M:%S %Y").isoformat()
    except ValueError:
        return None


class RbdStorage:
    """One pool of one Ceph cluster, reached with the ``rbd`` command."""

    def __init__(self, url: str, pool: str, conf: str, user: str | None, *, timeout: float = TIMEOUT) -> None:
        self.url = url
        self.pool = pool
        self.conf = conf
        self.user = user
        self.timeout = timeout
        self._exposed: dict[str, tuple[Process, Path]] = {}

    def __repr__(self) -> str:
        return f"<RbdStorage {self.pool} conf={self.conf}>"

    async def rbd(self, *args: str) -> bytes:
        """Run ``rbd ARGS`` against this cluster; SourceError with rbd's message if it fails."""
        argv = ["rbd", "-c", self.conf, *(["--id", self.user] if self.user else []),
                f"--client_mount_timeout={int(self.timeout)}", *args]
        proc = None
        try:
            with anyio.move_on_after(self.timeout * 1.5):
                proc = await anyio.run_process(argv, check=False)
        except OSError as exc:
            raise SourceError(f"rbd pool {self.pool}: cannot run rbd ({exc.strerror}); install ceph-common") from exc
        if proc is None:
            raise SourceError(f"rbd pool {self.pool}: the cluster did not answer within {self.timeout * 1.5:.0f} s "
                              f"(rbd {' '.join(args)})")
        if proc.returncode:
            lines = [ln for ln in proc.stderr.decode(errors="replace").splitlines() if ln.startswith("rbd:")]
            msg = lines[-1] if lines else proc.stderr.decode(errors="replace").strip()[-300:]
            if "No such file or directory" in msg:
                raise NotFoundError(f"rbd pool {self.pool}: {msg} (rbd {' '.join(args)})")
            words = [a for a in args[:2] if not a.startswith("-")]
            raise SourceError(f"rbd pool {self.pool}: rbd {' '.join(words)} of {args[-1]} failed: {msg or proc.returncode}")
        return proc.stdout

    def _spec(self, volume: str, snap: str | None = None) -> str:
        pool, _, image = volume.partition("/")
        if pool != self.pool or not image:
            raise ConfigError(f"volume {volume!r} is not in pool {self.pool}")
        return f"{volume}@{snap}" if snap else volume

    # -- the contract --------------------------------------------------------------------------------

    async def volumes_of(self, urls: Sequence[str]) -> list[str | None]:
        known = {v.id for v in await self.volumes()}
        out: list[str | None] = []
        for url in urls:
            if not url.startswith("rbd:"):
                out.append(None)
                continue
            pool, image, _, _ = parse_url(url, {})
            vid = f"{pool}/{image}"
            out.append(vid if image and vid in known else None)
        return out

    async def volume(self, volume: str) -> Volume:
        info = json.loads(await self.rbd("info", "--format", "json", self._spec(volume)))
        return Volume(id=volume, size=int(info["size"]),
                      metadata={"format": info.get("format"), "object_size": info.get("object_size"),
                                "features": info.get("features", [])})

    async def snapshot(self, volumes: Sequence[str], name: str) -> list[Snapshot]:
        if not (is_temporary(name) or is_retained(name)):
            raise ConfigError(f"{name!r} is not a blockferry snapshot name")
        taken: list[Snapshot] = []
        try:
            async with anyio.create_task_group() as tg:
                async def one(volume: str) -> None:
                    await self.rbd("snap", "create", "--no-progress", self._spec(volume, name))
                    taken.append(Snapshot(volume=volume, name=name))

                for v in volumes:
                    tg.start_soon(one, v)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.remove(taken)
            raise
        order = {v: i for i, v in enumerate(volumes)}
        return sorted(taken, key=lambda s: order[s.volume])

    async def changed_extents(self, snapshot: Snapshot, base: str | None) -> list[Extent] | None:
        if base is not None and base not in {s.name for s in await self.snapshots(snapshot.volume)}:
            return None
        args = ["diff", "--format", "json", *(["--from-snap", base] if base else []),
                self._spec(snapshot.volume, snapshot.name)]
        try:
            entries = msgspec.json.decode(await self.rbd(*args), type=list[_DiffEntry])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise SourceError(f"rbd diff of {snapshot.volume}@{snapshot.name}: unexpected output ({exc})") from None
        return merge((e.offset, e.length) for e in entries)

    async def expose(self, snapshot: Snapshot) -> Exposure:
        pool, _, image = snapshot.volume.partition("/")
        work = Path(tempfile.mkdtemp(prefix="bf-rbd-"))
        sock = str(work / "nbd.sock")
        # QEMU's json: filename names pool, image and snapshot without the escaping of rbd:P/I@S:conf=...
        target = {"driver": "raw", "file": {"driver": "rbd", "pool": pool, "image": image,
                                             "snapshot": snapshot.name, "conf": self.conf,
                                             **({"user": self.user} if self.user else {})}}
        argv = ["qemu-nbd", "--read-only", "--persistent", "--shared=16", "--socket", sock,
                "--export-name", image, "json:" + json.dumps(target)]
        if _SETPRIV:
            # the export dies with this process: a run killed with SIGKILL leaves no qemu-nbd
            # holding the snapshot (util-linux's setpriv sets the parent-death signal, then execs)
            argv = [_SETPRIV, "--pdeathsig", "TERM", *argv]
        try:
            proc = await anyio.open_process(argv)
        except OSError as exc:
            shutil.rmtree(work, ignore_errors=True)
            raise SourceError(f"{snapshot.volume}: cannot run qemu-nbd ({exc.strerror}); install qemu-utils "
                              "and qemu-block-extra") from exc
        if not await wait_until_listening(sock, proc, timeout=self.timeout):
            err = b""
            if proc.returncode is not None and proc.stderr is not None:
                try:
                    err = await proc.stderr.receive()
                except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                    pass
            with anyio.CancelScope(shield=True):
                await self._stop(proc, work)
            raise SourceError(f"{snapshot.volume}@{snapshot.name}: qemu-nbd did not export the snapshot "
                              f"({err.decode(errors='replace').strip() or 'timeout'}; is qemu-block-extra installed?)")
        handle = str(proc.pid)
        self._exposed[handle] = (proc, work)
        return Exposure(snapshot=snapshot, url=NBDAddress(path=sock).uri(image), handle=handle)

    async def withdraw(self, exposure: Exposure) -> None:
        entry = self._exposed.pop(exposure.handle, None)
        if entry is not None:
            await self._stop(*entry)

    @staticmethod
    async def _stop(proc: Process, work: Path) -> None:
        with anyio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.terminate()
                with anyio.move_on_after(10):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            await proc.aclose()
            shutil.rmtree(work, ignore_errors=True)

    async def remove(self, snapshots: Sequence[Snapshot]) -> None:
        for s in snapshots:
            if not (is_temporary(s.name) or is_retained(s.name)):
                raise ConfigError(f"{s.volume}@{s.name} is not a blockferry snapshot: not removed")
            try:
                await self.rbd("snap", "rm", "--no-progress", self._spec(s.volume, s.name))
            except NotFoundError:
                continue
            log.info("snapshot_removed", volume=s.volume, snapshot=s.name)

    async def rename(self, snapshot: Snapshot, name: str) -> Snapshot:
        await self.rbd("snap", "rename", self._spec(snapshot.volume, snapshot.name), self._spec(snapshot.volume, name))
        return msgspec.structs.replace(snapshot, name=name)

    async def volumes(self) -> list[Volume]:
        listed = msgspec.json.decode(await self.rbd("ls", "-l", "--format", "json", self.pool), type=list[_Listed])
        return [Volume(id=f"{self.pool}/{e.image}", size=e.size, metadata={"format": e.format})
                for e in listed if e.snapshot is None]

    async def snapshots(self, volume: str) -> list[Snapshot]:
        snaps = msgspec.json.decode(await self.rbd("snap", "ls", "--format", "json", self._spec(volume)),
                                    type=list[_Snap])
        return [Snapshot(volume=volume, name=s.name, size=s.size, created=_timestamp(s.timestamp)) for s in snaps]

    async def aclose(self) -> None:
        for handle in list(self._exposed):
            proc, work = self._exposed.pop(handle)
            await self._stop(proc, work)


class RbdStoragePlugin:
    scheme = "rbd"

    async def open(self, url: str, options: Mapping[str, Any]) -> RbdStorage:
        pool, image, conf, user = parse_url(url, options)
        if image is not None:
            raise ConfigError(f"{url}: a storage system is rbd://POOL (a volume is rbd://POOL/IMAGE)")
        if not Path(conf).is_file():
            raise ConfigError(f"{url}: the Ceph configuration {conf} does not exist (give ?conf=PATH)")
        try:
            timeout = float(options.get("timeout", TIMEOUT))
        except (TypeError, ValueError):
            raise ConfigError(f"{url}: timeout takes seconds, not {options.get('timeout')!r}") from None
        if not 1 <= timeout <= 3600:
            raise ConfigError(f"{url}: timeout takes 1 to 3600 seconds, not {timeout:g}")
        return RbdStorage(url, pool, conf, user, timeout=timeout)
