"""Source ``qemu``: disks of running QEMU/KVM VMs (through QMP) and images of stopped ones (through
``qemu-nbd``), read over NBD, with QEMU's persistent dirty bitmaps as changed block tracking.

URLs
----
``qemu:PATH[?agent=GA_SOCKET][#DISK]``

* ``PATH`` a Unix socket: a running VM's QMP monitor. ``DISK`` picks the disk by its device id
  (``-device ...,id=vda``), drive name or node name; it may be left out when the VM has one disk.
  ``agent`` is the host side of the VM's guest-agent channel, used to quiesce the guest.
* ``PATH`` a file: a stopped VM's qcow2 or raw image (the format is found with ``qemu-img info``).

Running VM (pull mode, what libvirt does): each backup *fleeces* the disk, i.e. a temporary qcow2
overlay backed by the disk node plus ``blockdev-backup sync=none`` (QEMU copies a block into the
overlay before the guest overwrites it), so the overlay reads as the disk at that instant. The
overlay is exported read-only by QEMU's own NBD server on a private Unix socket and read with
:mod:`blockferry.nbd.client`. Extents that ``base:allocation`` reports as zero are never read.
Teardown runs in the order QEMU needs (export, NBD server, backup job, overlay node, overlay
file), also when the backup fails or is cancelled; every step is tried even if one fails.

Changed block tracking: each backup adds a new persistent bitmap ``blockferry-<id>`` atomically
with the fleece; the point records it as ``change_id = "qemu-bitmap:<name>"``. The next backup
merges the bitmap its base point recorded into a temporary bitmap on the overlay, exports it as
``qemu:dirty-bitmap:blockferry-merged`` and reads only dirty extents. Only once the point is
committed (:meth:`QemuDisk.finish`) is the old bitmap removed; a failed backup removes the new
one instead, so the old one stays right. A missing, disabled or inconsistent bitmap (a VM killed
without saving it), or a base that names another bitmap, gives a full read with the reason.

Stopped VMs: ``qemu-nbd`` is started and stopped by the plugin; for qcow2 images the same
bitmaps are used (``qemu-img bitmap``), so a chain may go on across VM stops and starts.

Guest quiescing: with ``agent=``, ``guest-fsfreeze-freeze`` runs right before the fleece starts
and ``guest-fsfreeze-thaw`` right after (always, with a timeout, even if the fleece failed);
``metadata["consistency"]`` says ``application`` or ``crash`` and why.

Limits: the disks of one VM are fleeced one after the other (one instant per disk, not one for
the VM); one backup chain per disk (two repositories backing up the same VM would remove each
other's bitmaps and fall back to full reads).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import anyio
import msgspec
from blockferry.datapath.source import Buffer, Extent
from blockferry.errors import ConfigError, SourceError
from blockferry.log import get_logger
from blockferry.nbd.client import STATE_DIRTY, STATE_ZERO, NBDAddress, NBDClient, wait_until_listening
from blockferry.plugins.qemu.qmp import GuestAgent, QMPClient, QMPError

if TYPE_CHECKING:
    from blockferry.repo.format import DiskRecord

log = get_logger(component="qemu")

BITMAP_PREFIX = "blockferry-"
CHANGE_PREFIX = "qemu-bitmap:"
MERGED = "blockferry-merged"  #: the temporary bitmap on the fleece node that the export carries
FREEZE_TIMEOUT = 10.0  #: seconds the guest agent gets to freeze or thaw


def split_url(url: str) -> tuple[Path, str | None, dict[str, str]]:
    """``qemu:PATH[?k=v][#DISK]`` → (path, disk, options)."""
    rest = url.split(":", 1)[1] if url.startswith("qemu:") else url
    if rest.startswith("//"):
        rest = rest[2:]
    rest, _, disk = rest.partition("#")
    rest, _, query = rest.partition("?")
    if not rest:
        raise ConfigError(f"{url}: expected qemu:PATH (a QMP socket or a qcow2/raw image)")
    opts = {k: v[-1] for k, v in parse_qs(query).items()}
    return Path(rest), disk or None, opts


def _bitmap_of(change_id: str | None) -> str | None:
    if change_id and change_id.startswith(CHANGE_PREFIX):
        return change_id[len(CHANGE_PREFIX):]
    return None


def _workdir() -> Path:
    # Unix socket paths are limited to 107 bytes: keep the directory short
    return Path(tempfile.mkdtemp(prefix="bf-qemu-", dir="/tmp" if os.path.isdir("/tmp") else None))


async def _run(*argv: str, what: str) -> bytes:
    try:
        proc = await anyio.run_process(list(argv), check=False)
    except OSError as exc:
        raise SourceError(f"{what}: cannot run {argv[0]} ({exc.strerror}); install qemu-utils") from exc
    if proc.returncode:
        msg = proc.stderr.decode(errors="replace").strip().splitlines()
        raise SourceError(f"{what}: {argv[0]} {argv[1]} failed: {msg[-1] if msg else proc.returncode}")
    return proc.stdout


class QemuDisk:
    """One disk of a running VM or one stopped image, between :meth:`QemuSourcePlugin.open` and
    :meth:`aclose` (then :meth:`finish`). The fleece or export starts lazily, at the first of
    :meth:`changed_extents`, :meth:`data_extents` or a read, so opening only to check a source
    changes nothing. It reads over NBD (asynchronously: no ReadsBlocking) and tracks changes
    (:class:`~blockferry.datapath.source.ChangeTracking`)."""

    def __init__(self, url: str, path: Path, name: str, size: int, *, running: bool, node: str = "",
                 driver: str = "", image_format: str = "", agent: str | None = None, cbt: bool = True,
                 freeze_timeout: float = FREEZE_TIMEOUT) -> None:
        self.url = url
        self.path = path
        self.name = name
        self.size = size
        self.running = running
        self.node = node
        self.driver = driver
        self.image_format = image_format
        self.agent = agent
        self.freeze_timeout = freeze_timeout
        #: qcow2 only: a persistent bitmap needs a format that stores it
        self.tracking = cbt and (driver == "qcow2" if running else image_format == "qcow2")
        self.new_bitmap: str | None = f"{BITMAP_PREFIX}{secrets.token_hex(6)}" if self.tracking else None
        self.change_id: str | None = f"{CHANGE_PREFIX}{self.new_bitmap}" if self.new_bitmap else None
        self.identity = {"qmp": str(path), "disk": name} if running else {"path": str(path)}
        self.metadata: dict[str, Any] = {
            "kind": "qemu-vm" if running else "qemu-image",
            "format": driver or image_format,
            "bitmap": self.new_bitmap,
            "consistency": "crash" if running else "stopped",
        }
        if running:
            self.metadata["node"] = node
        self.base_bitmap: str | None = None  #: the bitmap merged into this read (incrementals)
        self.tracking_reason = ""
        self.client: NBDClient | None = None
        self._started = False
        self._start_lock = anyio.Lock()
        self._work: Path | None = None
        self._proc: Any = None  # qemu-nbd of an offline image
        self._teardown: list[tuple[str, Any]] = []  # running VM: what to undo, last first
        self._finished = False

    def __repr__(self) -> str:
        state = "started" if self._started else "idle"
        return f"<QemuDisk {self.path}#{self.name} size={self.size} {state} bitmap={self.new_bitmap}>"

    # -- change tracking -----------------------------------------------------------------------------

    async def _bitmaps(self) -> dict[str, dict[str, Any]]:
        """The disk's bitmaps by name: ``{"recording", "persistent", "inconsistent", "granularity"}``."""
        if self.running:
            async with await QMPClient.connect(str(self.path)) as qmp:
                nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
            for n in nodes:
                if n.get("node-name") == self.node:
                    return {b["name"]: {"recording": b.get("recording", True), "persistent": b.get("persistent", False),
                                        "inconsistent": b.get("inconsistent", False),
                                        "granularity": b.get("granularity", 0)} for b in n.get("dirty-bitmaps", [])
                        if b.get("name")}
            return {}
        info = await self._image_info()
        out = {}
        for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", []):
            flags = b.get("flags", [])
            out[b["name"]] = {"recording": "auto" in flags, "persistent": True, "inconsistent": "in-use" in flags,
                              "granularity": b.get("granularity", 0)}
        return out

    async def _image_info(self) -> dict[str, Any]:
        raw = await _run("qemu-img", "info", "--output=json", "-U", str(self.path), what=str(self.path))
        return msgspec.json.decode(raw)

    async def _remove_bitmaps(self, names: Sequence[str]) -> None:
        if not names:
            return
        if self.running:
            async with await QMPClient.connect(str(self.path)) as qmp:
                for name in names:
                    try:
                        await qmp.execute("block-dirty-bitmap-remove", {"node": self.node, "name": name})
                    except QMPError as exc:
                        log.warning("bitmap_remove_failed", disk=self.name, bitmap=name, error=str(exc))
        else:
            for name in names:
                await _run("qemu-img", "bitmap", "--remove", str(self.path), name, what=str(self.path))
        log.info("bitmaps_removed", disk=self.name, bitmaps=list(names))

    async def changed_extents(self, base: DiskRecord) -> tuple[list[Extent] | None, str]:
        """Dirty extents since ``base`` from the bitmap it recorded, or None and why not."""
        wanted = _bitmap_of(base.change_id)
        if not self.tracking:
            reason = f"{self.driver or self.image_format} disks keep no persistent dirty bitmap"
        elif wanted is None:
            reason = "the base point recorded no QEMU dirty bitmap"
        else:
            have = await self._bitmaps()
            b = have.get(wanted)
            if b is None:
                reason = (f"dirty bitmap {wanted} of the base point is missing (rotated by a later backup, "
                          "a point deleted, or the disk replaced)")
            elif b["inconsistent"]:
                reason = f"dirty bitmap {wanted} is inconsistent (QEMU stopped without saving it)"
            elif not b["recording"]:
                reason = f"dirty bitmap {wanted} is disabled"
            else:
                reason = ""
                self.base_bitmap = wanted
        if self.base_bitmap is None:
            self.tracking_reason = reason
            self.metadata["tracking"] = reason
            log.info("cbt_full_read", disk=self.name, reason=reason)
            return None, reason
        await self._start()
        assert self.client is not None
        ctx = f"qemu:dirty-bitmap:{MERGED if self.running else self.base_bitmap}"
        dirty = [(o, n) for o, n, f in await self.client.block_status(ctx) if f & STATE_DIRTY]
        self.metadata["base_bitmap"] = self.base_bitmap
        reason = f"QEMU dirty bitmap {self.base_bitmap}: {sum(n for _, n in dirty)} bytes dirty"
        return dirty, reason

    async def finish(self, committed: bool) -> None:
        """Rotate: keep the new bitmap and drop the base's once committed; else drop the new one."""
        if self._finished or not self._started or self.new_bitmap is None:
            return
        self._finished = True
        drop = [self.base_bitmap] if committed and self.base_bitmap else ([] if committed else [self.new_bitmap])
        try:
            await self._remove_bitmaps([d for d in drop if d])
        except Exception as exc:  # the next backup sees a stray bitmap and removes it
            log.warning("bitmap_rotation_failed", disk=self.name, error=repr(exc))

    # -- reading -------------------------------------------------------------------------------------

    async def _start(self) -> None:
        async with self._start_lock:
            if self._started:
                return
            self._started = True
            self._work = _workdir()
            try:
                if self.running:
                    await self._start_fleece()
                else:
                    await self._start_qemu_nbd()
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._stop()
                raise

    async def _stray(self) -> list[str]:
        """Our bitmaps other than the base's and the new one (left by a backup that died)."""
        if not self.tracking:
            return []
        keep = {self.base_bitmap, self.new_bitmap}
        return [n for n in await self._bitmaps() if n.startswith(BITMAP_PREFIX) and n not in keep and n != MERGED]

    async def _start_fleece(self) -> None:
        assert self._work is not None
        await self._remove_bitmaps(await self._stray())
        fleece_file = self._work / "fleece.qcow2"
        sock = _vm_nbd_socket(self.path)
        tag = secrets.token_hex(4)
        fleece, job, export = f"bf-fleece-{tag}", f"bf-job-{tag}", f"bf-exp-{tag}"
        await _run("qemu-img", "create", "-q", "-f", "qcow2", str(fleece_file), str(self.size), what=str(fleece_file))
        self._teardown.append(("file", fleece_file))
        # QMP serves one client at a time: hold it only while setting up (other disks wait)
        async with await QMPClient.connect(str(self.path)) as qmp:
            await qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": fleece, "backing": self.node,
                                               "file": {"driver": "file", "filename": str(fleece_file)}})
            self._teardown.append(("node", fleece))
            actions: list[dict[str, Any]] = []
            if self.new_bitmap:
                actions.append({"type": "block-dirty-bitmap-add",
                                "data": {"node": self.node, "name": self.new_bitmap, "persistent": True}})
            if self.base_bitmap:
                actions += [
                    {"type": "block-dirty-bitmap-add",
                     "data": {"node": fleece, "name": MERGED, "persistent": False, "disabled": True}},
                    {"type": "block-dirty-bitmap-merge",
                     "data": {"node": fleece, "target": MERGED,
                              "bitmaps": [{"node": self.node, "name": self.base_bitmap}]}},
                ]
            actions.append({"type": "blockdev-backup",
                            "data": {"job-id": job, "device": self.node, "target": fleece, "sync": "none"}})
            async with self._quiesced():
                await qmp.execute("transaction", {"actions": actions})
            self._teardown.append(("job", job))
            try:
                await qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
            except QMPError as exc:
                # another disk of this VM being backed up now started it on the same socket
                if "already" not in exc.desc or not os.path.exists(sock):
                    raise
            self._teardown.append(("server", sock))
            args: dict[str, Any] = {"type": "nbd", "id": export, "node-name": fleece, "name": export,
                                    "writable": False}
            if self.base_bitmap:
                args["bitmaps"] = [MERGED]
            await qmp.execute("block-export-add", args)
            self._teardown.append(("export", export))
        contexts = ["base:allocation"] + ([f"qemu:dirty-bitmap:{MERGED}"] if self.base_bitmap else [])
        self.client = await NBDClient.connect(NBDAddress(path=sock), export, meta_contexts=contexts)
        log.info("fleece_started", disk=self.name, node=self.node, fleece=fleece, bitmap=self.new_bitmap,
                 base_bitmap=self.base_bitmap)

    async def _start_qemu_nbd(self) -> None:
        assert self._work is not None
        if self.tracking:
            await self._remove_bitmaps(await self._stray())
            assert self.new_bitmap is not None
            await _run("qemu-img", "bitmap", "--add", "--enable", str(self.path), self.new_bitmap, what=str(self.path))
        sock = str(self._work / "nbd.sock")
        argv = ["qemu-nbd", "--read-only", "--persistent", "--format", self.image_format, "--socket", sock,
                "--export-name", self.name]
        if self.base_bitmap:
            argv += ["--bitmap", self.base_bitmap]
        argv.append(str(self.path))
        try:
            self._proc = await anyio.open_process(argv)
        except OSError as exc:
            raise SourceError(f"{self.path}: cannot run qemu-nbd ({exc.strerror}); install qemu-utils") from exc
        if not await wait_until_listening(sock, self._proc):
            err = b""
            if self._proc.returncode is not None and self._proc.stderr is not None:
                try:
                    err = await self._proc.stderr.receive()
                except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                    pass
            raise SourceError(f"{self.path}: qemu-nbd did not start ({err.decode(errors='replace').strip() or 'timeout'}"
                              "; is a running VM using the image?)")
        contexts = ["base:allocation"] + ([f"qemu:dirty-bitmap:{self.base_bitmap}"] if self.base_bitmap else [])
        self.client = await NBDClient.connect(NBDAddress(path=sock), self.name, meta_contexts=contexts)

    async def _quiesce_agent(self) -> GuestAgent | None:
        if not self.agent:
            self.metadata["consistency"] = "crash"
            self.metadata["consistency_reason"] = "no guest agent configured"
            return None
        try:
            ga = await GuestAgent.connect(self.agent, timeout=self.freeze_timeout)
        except SourceError as exc:
            self.metadata["consistency_reason"] = f"guest agent unreachable: {exc}"
            return None
        return ga

    @contextlib.asynccontextmanager
    async def _quiesced(self) -> AsyncIterator[None]:
        """Guest filesystems frozen inside (when an agent answers); thawed on the way out, always:
        after a failed or timed-out freeze too (the agent may have frozen late), and shielded
        from cancellation."""
        ga = await self._quiesce_agent()
        if ga is None:
            yield
            return
        try:
            try:
                n = await ga.execute("guest-fsfreeze-freeze", timeout=self.freeze_timeout)
                self.metadata["consistency"] = "application"
                self.metadata["consistency_reason"] = f"guest agent froze {n} filesystems"
            except TimeoutError:
                self.metadata["consistency"] = "crash"
                self.metadata["consistency_reason"] = f"guest freeze failed: no answer within {self.freeze_timeout:g} s"
            except SourceError as exc:
                self.metadata["consistency"] = "crash"
                self.metadata["consistency_reason"] = f"guest freeze failed: {exc}"
            log.info("guest_freeze", disk=self.name, consistency=self.metadata["consistency"],
                     reason=self.metadata["consistency_reason"])
            yield
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await ga.execute("guest-fsfreeze-thaw", timeout=self.freeze_timeout)
                    self.metadata["thawed"] = True
                except (TimeoutError, SourceError) as err:
                    self.metadata["thawed"] = False
                    log.warning("guest_thaw_failed", disk=self.name, error=str(err) or "timeout")
                finally:
                    await ga.aclose()

    async def data_extents(self) -> list[Extent] | None:
        await self._start()
        assert self.client is not None
        status = await self.client.block_status("base:allocation", 0, self.size)
        return [(o, min(n, self.size - o)) for o, n, f in status if not f & STATE_ZERO and o < self.size]

    async def read_into(self, offset: int, buffers: Sequence[Buffer]) -> int:
        await self._start()
        assert self.client is not None
        room = max(0, self.size - offset)  # the export may be longer (a raw file rounded up)
        if sum(len(b) for b in buffers) > room:
            cut: list[Buffer] = []
            for b in buffers:
                if room <= 0:
                    break
                v = memoryview(b).cast("B")
                cut.append(v[:room])
                room -= len(cut[-1])
            buffers = cut
        if not buffers:
            return 0
        return await self.client.read_into(offset, buffers)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._stop()

    async def _stop(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None
        errors: list[str] = []
        qmp: QMPClient | None = None
        if any(kind != "file" for kind, _ in self._teardown):
            try:
                qmp = await QMPClient.connect(str(self.path))
            except Exception as exc:  # the VM is gone: so is everything in it
                errors.append(f"qmp: {exc!r}")
        try:
            for kind, what in reversed(self._teardown):
                try:
                    with anyio.fail_after(30):
                        if kind == "file":
                            os.unlink(what)
                        elif qmp is None:
                            continue
                        elif kind == "export":
                            await qmp.execute("block-export-del", {"id": what})
                            await qmp.wait_event("BLOCK_EXPORT_DELETED", _field_is("id", what))
                        elif kind == "server":
                            # stopped only when no export is left (another disk may still be read)
                            if not await qmp.execute("query-block-exports"):
                                await qmp.execute("nbd-server-stop")
                        elif kind == "job":
                            await qmp.execute("block-job-cancel", {"device": what})
                            await qmp.wait_event("BLOCK_JOB_CANCELLED", _field_is("device", what))
                        elif kind == "node":
                            await qmp.execute("blockdev-del", {"node-name": what})
                except Exception as exc:  # go on: each later step may still succeed
                    errors.append(f"{kind} {what}: {exc!r}")
        finally:
            self._teardown.clear()
            if qmp is not None:
                await qmp.aclose()
        if self._proc is not None:
            if self._proc.returncode is None:
                self._proc.terminate()
                with anyio.move_on_after(10) as scope:
                    await self._proc.wait()
                if scope.cancelled_caught:
                    self._proc.kill()
                    await self._proc.wait()
            await self._proc.aclose()
            self._proc = None
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None
        if errors:
            log.warning("teardown_incomplete", disk=self.name, errors=errors)


def _field_is(key: str, value: Any) -> Callable[[dict[str, Any]], bool]:
    """A QMP event filter: the event's ``data[key]`` is ``value``."""
    return lambda data: data.get(key) == value


def _vm_nbd_socket(qmp_path: Path) -> str:
    """The Unix socket of the NBD server blockferry starts in a VM: one per VM, shared by the
    disks read at the same time (QEMU runs a single NBD server)."""
    digest = hashlib.blake2s(str(qmp_path.resolve()).encode(), digest_size=6).hexdigest()
    return f"{tempfile.gettempdir()}/bf-qemu-nbd-{digest}.sock"


class QemuSourcePlugin:
    scheme = "qemu"

    def disk_name(self, url: str) -> str:
        path, disk, _ = split_url(url)
        if disk:
            return disk
        if path.suffix in (".qmp", ".sock", ".socket"):
            return path.stem
        return path.name

    async def expand(self, url: str) -> list[str]:
        """A running VM named without a disk: one URL per disk (``qemu:SOCK#DISK``, options kept)."""
        path, want, _ = split_url(url)
        if want or not path.is_socket():
            return [url]
        return [f"{url}#{label}" for label, _, _ in await self._vm_disks(path)]

    async def _vm_disks(self, path: Path) -> list[tuple[str, set[str], dict[str, Any]]]:
        """(label, names it answers to, query-block's ``inserted``) of each disk with a medium."""
        async with await QMPClient.connect(str(path)) as qmp:
            blocks = await qmp.execute("query-block")
        disks = []
        for b in blocks:
            ins = b.get("inserted")
            if not ins:
                continue
            qdev = b.get("qdev", "")
            dev_id = qdev.split("/")[3] if qdev.startswith("/machine/peripheral/") else ""
            names = {n for n in (dev_id, b.get("device", ""), ins.get("node-name", "")) if n}
            disks.append((dev_id or b.get("device") or ins.get("node-name"), names, ins))
        return disks

    async def open(self, url: str, options: Mapping[str, Any]) -> QemuDisk:
        path, want, opts = split_url(url)
        opts = {**opts, **{k: str(v) for k, v in options.items()}}
        cbt = opts.get("cbt", "true").lower() not in ("0", "false", "no", "off")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise SourceError(f"{path}: no such QMP socket or image") from None
        except OSError as exc:
            raise SourceError(f"{path}: cannot stat ({exc.strerror})") from exc
        if stat.S_ISSOCK(st.st_mode):
            return await self._open_vm(url, path, want, opts, cbt)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: neither a QMP socket nor an image file")
        info = msgspec.json.decode(await _run("qemu-img", "info", "--output=json", "-U", str(path), what=str(path)))
        fmt = info.get("format")
        if fmt not in ("qcow2", "raw"):
            raise ConfigError(f"{path}: a {fmt} image; the qemu source reads qcow2 and raw images")
        if info.get("backing-filename"):
            raise ConfigError(f"{path}: an image with a backing file; back up the chain's top through a running VM")
        # QEMU rounds a raw file's size up to 512 bytes; the disk is the file, to the byte
        size = st.st_size if fmt == "raw" else int(info["virtual-size"])
        return QemuDisk(url, path, want or self.disk_name(url), size, running=False, image_format=fmt, cbt=cbt)

    async def _open_vm(self, url: str, path: Path, want: str | None, opts: dict[str, str], cbt: bool) -> QemuDisk:
        disks = await self._vm_disks(path)
        if want:
            found = [d for d in disks if want in d[1]]
        else:
            found = disks
        if not found:
            raise ConfigError(f"{url}: the VM has no disk {want!r} (disks: {', '.join(d[0] for d in disks) or 'none'})")
        if len(found) > 1:
            raise ConfigError(f"{url}: the VM has {len(found)} disks; name one: "
                              + ", ".join(f"qemu:{path}#{d[0]}" for d in found))
        label, _, ins = found[0]
        name = want or label
        return QemuDisk(url, path, name, int(ins["image"]["virtual-size"]), running=True, node=ins["node-name"],
                        driver=ins.get("drv", ""), agent=opts.get("agent"), cbt=cbt,
                        freeze_timeout=float(opts.get("freeze_timeout", FREEZE_TIMEOUT)))
