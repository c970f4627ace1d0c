"""Source ``vsphere``: the virtual disks of VMware vSphere VMs, read from a VM snapshot.

URLs
----
``vsphere://[USER@]HOST[:PORT]/VM[?OPTIONS][#DISK]``

* ``HOST`` a vCenter (or an ESXi host); ``VM`` the VM's name (unique in the inventory) or its
  managed-object id (``vm-42``); ``DISK`` the virtual disk's device key (``2000``, as
  :meth:`VSphereSourcePlugin.expand` writes it). A VM named without a disk is expanded by the job
  into one task per virtual disk; opened as it is, it must have exactly one disk.
* options (in the query, or the job's disk options): ``protocol`` (``https``, the default, or
  ``http``), ``insecure=1`` (do not verify the TLS certificate: for test set-ups only),
  ``transport`` (how disks are read, see :mod:`.transport`; ``http`` by default),
  ``password_file`` (a file holding the password), ``orphan_hours`` (see below), ``quiesce``
  (``off``, the default: crash-consistent; ``try``: quiesce the guest through VMware Tools and,
  if that fails, fall back to a crash-consistent snapshot, saying so; ``require``: a failure to
  quiesce fails the VM's disks), ``cbt=1`` (turn changed block tracking on where it is off).

Credentials never come from the URL or the command line: the user is the URL's or
``BLOCKFERRY_VSPHERE_USER``; the password is read from ``password_file`` (an option), else from
``BLOCKFERRY_VSPHERE_PASSWORD``, else from a ``password`` disk option (set by a program or
daemon configuration, never a URL query, which is refused).

Per VM
------
The first disk of a VM that starts reading creates a VM snapshot (no memory; quiesced only as
the ``quiesce`` option says) named ``blockferry-<run id>``, whose description records its owner
(host, pid, run); the other disks of the VM open meanwhile read from the same snapshot; the last one to close
removes it. Removal is always tried, also when a read failed or the task was cancelled (in a
shielded cancel scope); a removal that fails is logged and left to the next run. Each disk is
read from the snapshot's configuration (the disk files as they were when it was taken).

Before creating its snapshot a run removes the VM's blockferry snapshots that were left by runs
that died: made on this host by a process that is gone (or by this process, not held any more),
or made elsewhere more than ``orphan_hours`` (24) ago. A snapshot of a live run is kept.

The point's disk records carry the VM's configuration (hardware, disks, networks) in their
metadata, with the snapshot and transport that served them.

Changed block tracking
----------------------
With tracking on for the VM (``cbt=1`` turns it on, by ReconfigVM, before the snapshot), each
disk records the change id of its disk in the snapshot (``change_id = "vmware-cbt:<id>"``). A full
read reads only the allocated areas (``QueryChangedDiskAreas`` with ``"*"``); an incremental only
the areas changed since the base point's change id. A base without a VMware change id, tracking
off, a disk resized since the base, or a change id vCenter refuses (tracking reset: VM restored or
moved) gives a full read, with the reason in the session. VMware change ids need no rotation:
:meth:`VSphereDisk.finish` does nothing.

pyvmomi is synchronous: its calls run in worker threads (``anyio.to_thread``) under a limiter of
their own per VM, never on the event loop (:mod:`.vcenter`).

Not here yet (issue 23): VDDK transports, inventory
containers (folders, clusters, tags), restore to vSphere.
"""

from __future__ import annotations

import functools
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import anyio
from blockferry.datapath.source import Buffer, Extent
from blockferry.errors import ConfigError, SourceError
from blockferry.log import get_logger
from blockferry.plugins.vsphere.transport import DiskLocation, DiskReader, split_datastore_path, transport
from blockferry.plugins.vsphere.vcenter import (
    SNAPSHOT_PREFIX,
    ChangeTrackingReset,
    Endpoint,
    VCenter,
    owner_of,
    parse_port,
)
from blockferry.processes import pid_alive

if TYPE_CHECKING:
    from blockferry.repo.format import DiskRecord

log = get_logger(component="vsphere")

T = TypeVar("T")

PASSWORD_ENV = "BLOCKFERRY_VSPHERE_PASSWORD"
USER_ENV = "BLOCKFERRY_VSPHERE_USER"
#: worker threads one VM's API calls may use at once
API_THREADS = 4
#: a snapshot of another host's run is taken for an orphan after this long
ORPHAN_HOURS = 24.0
#: how a point records a VMware change id
CHANGE_PREFIX = "vmware-cbt:"
#: this process's run id: the default name of its snapshots (``session`` option overrides)
RUN_ID = secrets.token_hex(6)


@dataclass(frozen=True)
class VSphereUrl:
    url: str
    host: str
    port: int
    user: str | None
    vm: str
    disk: str | None
    options: dict[str, str]

    @property
    def protocol(self) -> str:
        return self.options.get("protocol", "https")

    def with_disk(self, key: int) -> str:
        base = self.url.partition("#")[0]
        return f"{base}#{key}"


def parse_url(url: str) -> VSphereUrl:
    """``vsphere://[USER@]HOST[:PORT]/VM[?k=v][#DISK]``; ConfigError when malformed."""
    u = urlsplit(url)
    if u.scheme != "vsphere" or not u.hostname:
        raise ConfigError(f"{url}: expected vsphere://[USER@]HOST[:PORT]/VM[#DISK]")
    if u.password is not None:
        raise ConfigError(f"{u.scheme}://{u.hostname}: a password never goes into the URL; set {PASSWORD_ENV} "
                          "or the password_file option")
    vm = unquote(u.path.lstrip("/"))
    if not vm or "/" in vm:
        raise ConfigError(f"{url}: name one VM after the host (its name or id, e.g. vm-42)")
    opts = {k: v[-1] for k, v in parse_qs(u.query).items()}
    if "password" in opts:
        raise ConfigError(f"vsphere://{u.hostname}: a password never goes into the URL; set {PASSWORD_ENV} "
                          "or the password_file option")
    protocol = opts.get("protocol", "https")
    if protocol not in ("https", "http"):
        raise ConfigError(f"{url}: protocol must be https or http, not {protocol!r}")
    try:
        port_text = str(u.port) if u.port is not None else None
    except ValueError:
        raise ConfigError(f"{url}: bad port") from None
    return VSphereUrl(url=url, host=u.hostname, port=parse_port(port_text, protocol),
                      user=unquote(u.username) if u.username else None, vm=vm, disk=u.fragment or None, options=opts)


def _flag(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes", "on")


def endpoint_of(parsed: VSphereUrl, options: Mapping[str, str]) -> Endpoint:
    """Log-in details: the URL's host, the user and the password from the environment or a file."""
    user = parsed.user or os.environ.get(USER_ENV)
    if not user:
        raise ConfigError(f"vsphere://{parsed.host}: no user: put it in the URL (vsphere://USER@HOST/...) "
                          f"or set {USER_ENV}")
    if pw_file := options.get("password_file"):
        try:
            password = Path(pw_file).expanduser().read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"vsphere://{parsed.host}: cannot read password_file {pw_file}: "
                              f"{exc.strerror}") from exc
    else:
        password = os.environ.get(PASSWORD_ENV) or options.get("password") or ""
    if not password:
        raise ConfigError(f"vsphere://{parsed.host}: no password: set {PASSWORD_ENV} or the password_file option")
    return Endpoint(host=parsed.host, port=parsed.port, user=user, password=password,
                    protocol=parsed.protocol, verify=not _flag(options.get("insecure")))


def _intersect(a: Sequence[Extent], b: Sequence[Extent] | None, size: int) -> list[Extent]:
    """The parts of the extents ``a`` inside ``b`` (None: the whole disk) and the disk, sorted and
    merged."""
    bounds = sorted(b) if b is not None else [(0, size)]
    out: list[Extent] = []
    for off, n in sorted(a):
        for boff, bn in bounds:
            start, end = max(off, boff, 0), min(off + n, boff + bn, size)
            if start >= end:
                continue
            if out and start <= out[-1][0] + out[-1][1]:
                prev = out[-1]
                out[-1] = (prev[0], max(prev[0] + prev[1], end) - prev[0])
            else:
                out.append((start, end - start))
    return out


def quiesce_mode(options: Mapping[str, str]) -> str:
    mode = options.get("quiesce", "off")
    if mode not in ("off", "try", "require"):
        raise ConfigError(f"quiesce must be off, try or require, not {mode!r}")
    return mode


@dataclass
class VmState:
    """What the open disks of one VM share in one event loop: the API session, the thread
    limiter, the snapshot and how many disks use each."""

    endpoint: Endpoint
    ident: str
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    limiter: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(API_THREADS))
    vc: VCenter | None = None
    vm: Any = None
    refs: int = 0  #: open disks
    snapshot: Any = None
    snapshot_name: str = ""
    snapshot_users: int = 0  #: disks reading from the snapshot
    #: ``application`` (quiesced) or ``crash``, and why not quiesced when it was asked for
    consistency: str = "crash"
    quiesce_error: str = ""
    #: changed block tracking was on for the VM when its snapshot was taken
    tracking: bool = False
    orphans_removed: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"vsphere://{self.endpoint.host}/{self.ident}"

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """A blocking pyvmomi call, in a worker thread under this VM's limiter."""
        return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=self.limiter)


class VSphereDisk:
    """One virtual disk of a VM, between :meth:`VSphereSourcePlugin.open` and :meth:`aclose`.
    The snapshot is taken lazily, at the first :meth:`changed_extents`, :meth:`data_extents` or
    read, so opening only to check a source changes nothing on the VM. Offers
    :class:`~blockferry.datapath.source.ChangeTracking` (VMware CBT)."""

    def __init__(self, plugin: VSphereSourcePlugin, state: VmState, parsed: VSphereUrl, key: int, name: str,
                 size: int, config: dict[str, Any], options: Mapping[str, str]) -> None:
        self.plugin = plugin
        self.state = state
        self.url = parsed.url
        self.key = key
        self.name = name
        self.size = size
        self.options = options
        self.change_id: str | None = None
        self.identity = {"vcenter": parsed.host, "vm": config["instance_uuid"] or config["moref"],
                         "disk": str(key)}
        self.metadata: dict[str, Any] = {"kind": "vsphere-vm-disk", "vm": config, "disk_key": key,
                                         "consistency": "crash"}
        self.reader: DiskReader | None = None
        #: the disk's change id in the snapshot (None: no tracking)
        self.snapshot_change_id: str | None = None
        self._started = False
        self._holds_snapshot = False
        self._closed = False
        self._start_lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"<VSphereDisk {self.state.label}#{self.key} size={self.size}>"

    async def _start(self) -> None:
        async with self._start_lock:
            if self._started:
                return
            if self._closed:
                raise SourceError(f"{self.url}: closed")
            self._started = True
            try:
                await self.plugin._acquire_snapshot(self.state, self.options)
                self._holds_snapshot = True
                await self._open_reader()
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._stop()
                raise

    async def _open_reader(self) -> None:
        st = self.state
        assert st.vc is not None and st.snapshot is not None
        vc = st.vc
        cfg = await st.call(vc.snapshot_config, st.snapshot)
        disks = {d.key: d for d in await st.call(functools.partial(vc.disks, st.vm, config=cfg))}
        d = disks.get(self.key)
        if d is None:
            raise SourceError(f"{self.url}: disk {self.key} is not in the snapshot (removed meanwhile?)")
        file = d.backing.fileName
        change = getattr(d.backing, "changeId", None) if st.tracking else None
        if change:
            self.snapshot_change_id = change
            self.change_id = f"{CHANGE_PREFIX}{change}"
        self.metadata["cbt"] = ("on" if change else
                                "on, but the disk has no change id yet" if st.tracking else "off")
        ds, path = split_datastore_path(file)
        dc_path = await st.call(vc.datacenter_path, st.vm)
        loc = DiskLocation(
            base_url=f"{st.endpoint.protocol}://{st.endpoint.host}:{st.endpoint.port}", file=file, datastore=ds,
            path=path, dc_path=dc_path, capacity=self.size, vm=st.vm._moId, snapshot=st.snapshot._moId,
            disk_key=self.key, cookie=vc.session_cookie(), ssl_context=st.endpoint.ssl_context(), label=self.url,
        )
        self.reader = await transport(self.options.get("transport", "http"))(loc)
        self.metadata.update({"snapshot": st.snapshot_name, "snapshot_id": st.snapshot._moId, "file": file,
                              "transport": self.reader.mode, "consistency": st.consistency})
        if st.quiesce_error:
            self.metadata["quiesce_error"] = st.quiesce_error
        if st.orphans_removed:
            self.metadata["orphan_snapshots_removed"] = list(st.orphans_removed)
        log.info("disk_reading", vm=st.ident, disk=self.key, file=file, transport=self.reader.mode,
                 snapshot=st.snapshot_name)

    async def data_extents(self) -> list[Extent] | None:
        """The transport's extents; with tracking, only the allocated areas within them."""
        await self._start()
        assert self.reader is not None
        extents = await self.reader.data_extents()
        if self.snapshot_change_id is None:
            return extents
        try:
            allocated = await self._changed("*")
        except SourceError as exc:  # e.g. a disk type that cannot tell: read what the transport has
            log.warning("cbt_allocated_unknown", vm=self.state.ident, disk=self.key, error=str(exc))
            return extents
        return _intersect(allocated, extents, self.size)

    async def _changed(self, change_id: str) -> list[Extent]:
        st = self.state
        assert st.vc is not None
        return await st.call(functools.partial(st.vc.changed_areas, st.vm, st.snapshot, self.key, change_id,
                                               self.size))

    async def changed_extents(self, base: DiskRecord) -> tuple[list[Extent] | None, str]:
        """Areas changed since ``base`` (VMware CBT), or None and why not."""
        await self._start()
        since = base.change_id[len(CHANGE_PREFIX):] if base.change_id and base.change_id.startswith(CHANGE_PREFIX) \
            else None
        if self.snapshot_change_id is None:
            reason = ("changed block tracking is off for the VM (cbt=1 turns it on)" if not self.state.tracking
                      else "the disk has no change id yet")
        elif since is None:
            reason = "the base point recorded no VMware change id"
        elif base.size != self.size:
            reason = f"the disk was resized since the base point ({base.size} to {self.size} bytes)"
        else:
            try:
                changed = await self._changed(since)
            except ChangeTrackingReset as exc:
                reason = f"change tracking was reset since the base point ({exc})"
            else:
                extents = _intersect(changed, [(0, self.size)], self.size)
                self.metadata["cbt_base"] = since
                return extents, f"VMware CBT since {since}: {sum(n for _, n in extents)} bytes changed"
        self.metadata["cbt_full_read"] = reason
        log.info("cbt_full_read", vm=self.state.ident, disk=self.key, reason=reason)
        return None, reason

    async def finish(self, committed: bool) -> None:
        """VMware's change ids need no rotation: nothing to do."""

    async def read_into(self, offset: int, buffers: Sequence[Buffer]) -> int:
        if not self._started:
            await self._start()
        reader = self.reader
        assert reader is not None
        if offset >= self.size:
            return 0
        room, bufs = self.size - offset, []
        for b in buffers:  # clip the request at the end of the disk
            if room <= 0:
                break
            view = memoryview(b)
            bufs.append(view[:room] if len(view) > room else view)
            room -= len(bufs[-1])
        return await reader.read_into(offset, bufs)

    async def _stop(self) -> None:
        reader, self.reader = self.reader, None
        try:
            if reader is not None:
                await reader.aclose()
        finally:
            if self._holds_snapshot:
                self._holds_snapshot = False
                await self.plugin._release_snapshot(self.state)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            try:
                await self._stop()
            finally:
                await self.plugin._release(self.state)


class VSphereSourcePlugin:
    """The ``vsphere`` source (see the module). Offers :class:`~blockferry.datapath.source.Expands`."""

    scheme = "vsphere"

    def __init__(self) -> None:
        #: per (endpoint, VM as named): the state its open disks share
        self._states: dict[tuple[Endpoint, str], VmState] = {}
        self.hostname = socket.gethostname()

    def disk_name(self, url: str) -> str:
        p = parse_url(url)
        vm = p.vm.replace("/", "_")
        return f"{vm}-{p.disk}" if p.disk else vm

    @staticmethod
    def _options(parsed: VSphereUrl, options: Mapping[str, Any]) -> dict[str, str]:
        return {**parsed.options, **{k: str(v) for k, v in options.items()}}

    async def _state(self, parsed: VSphereUrl, options: Mapping[str, str]) -> VmState:
        """The VM's shared state, logged in and with the VM found; counts one more user."""
        ep = endpoint_of(parsed, options)
        key = (ep, parsed.vm)
        st = self._states.get(key)
        if st is None:
            st = self._states[key] = VmState(endpoint=ep, ident=parsed.vm)
        st.refs += 1
        try:
            async with st.lock:
                if st.vc is None:
                    # shielded: a session opened while the task is cancelled is still logged out
                    with anyio.CancelScope(shield=True):
                        vc = await st.call(VCenter, ep)
                    try:
                        st.vm = await st.call(vc.find_vm, parsed.vm)
                    except BaseException:
                        with anyio.CancelScope(shield=True):
                            await st.call(vc.close)
                        raise
                    st.vc = vc
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._release(st)
            raise
        return st

    async def _release(self, st: VmState) -> None:
        st.refs -= 1
        if st.refs > 0:
            return
        self._states.pop((st.endpoint, st.ident), None)
        vc, st.vc = st.vc, None
        if vc is not None:
            await st.call(vc.close)

    async def open(self, url: str, options: Mapping[str, Any]) -> VSphereDisk:
        parsed = parse_url(url)
        opts = self._options(parsed, options)
        quiesce_mode(opts)  # bad input fails at the job's pre-flight check, not in the task
        st = await self._state(parsed, opts)
        try:
            assert st.vc is not None
            disks = await st.call(st.vc.disks, st.vm)
            config = await st.call(st.vc.configuration, st.vm)
            if parsed.disk is None:
                if len(disks) != 1:
                    raise SourceError(f"{url}: the VM has {len(disks)} disks: name one (#KEY: "
                                      f"{', '.join(str(d.key) for d in disks)}) or let the job expand the VM")
                disk = disks[0]
            else:
                found = [d for d in disks if str(d.key) == parsed.disk
                         or (d.deviceInfo is not None and d.deviceInfo.label == parsed.disk)]
                if not found:
                    raise SourceError(f"{url}: the VM has no disk {parsed.disk!r} (disks: "
                                      f"{', '.join(str(d.key) for d in disks)})")
                disk = found[0]
            size = int(disk.capacityInBytes or disk.capacityInKB * 1024)
            return VSphereDisk(self, st, parsed, disk.key, self.disk_name(url), size, config, opts)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._release(st)
            raise

    async def expand(self, url: str) -> list[str]:
        """A VM named without a disk: one URL per virtual disk (``...#KEY``, options kept)."""
        parsed = parse_url(url)
        if parsed.disk is not None:
            return [url]
        st = await self._state(parsed, self._options(parsed, {}))
        try:
            assert st.vc is not None
            disks = await st.call(st.vc.disks, st.vm)
        finally:
            with anyio.CancelScope(shield=True):
                await self._release(st)
        if len(disks) == 1:
            return [url]
        return [parsed.with_disk(d.key) for d in disks]

    # -- the VM snapshot ---------------------------------------------------------------------------

    def _owner(self, run: str) -> dict[str, Any]:
        return {"by": "blockferry", "host": self.hostname, "pid": os.getpid(), "run": run, "created": time.time()}

    def _is_orphan(self, owner: dict[str, Any], max_hours: float) -> tuple[bool, str]:
        if owner.get("host") == self.hostname:
            pid = owner.get("pid")
            if not isinstance(pid, int) or not pid_alive(pid):
                return True, f"its process {pid} on this host is gone"
            if pid == os.getpid():  # held ones were skipped by the caller
                return True, "this process no longer holds it"
            return False, f"its process {pid} on this host is running"
        age = (time.time() - float(owner.get("created", 0))) / 3600
        if age > max_hours:
            return True, f"made on {owner.get('host')} {age:.0f} hours ago"
        return False, f"made on {owner.get('host')} {age:.1f} hours ago (a run there may still use it)"

    async def _remove_orphans(self, st: VmState, max_hours: float) -> None:
        assert st.vc is not None
        held = {s.snapshot._moId for s in self._states.values() if s.snapshot is not None}
        for node in await st.call(st.vc.snapshots, st.vm):
            if not node.name.startswith(SNAPSHOT_PREFIX) or node.snapshot._moId in held:
                continue
            owner = owner_of(node.description)
            if owner is None:
                continue  # named like ours but not made by blockferry: never touched
            orphan, why = self._is_orphan(owner, max_hours)
            if not orphan:
                log.info("snapshot_kept", vm=st.ident, snapshot=node.name, reason=why)
                continue
            try:
                await st.call(st.vc.remove_snapshot, node.snapshot)
            except SourceError as exc:  # not this run's to fail for: the next run tries again
                log.error("orphan_snapshot_remove_failed", vm=st.ident, snapshot=node.name, error=str(exc))
                continue
            st.orphans_removed.append(node.name)
            log.warning("orphan_snapshot_removed", vm=st.ident, snapshot=node.name, reason=why)

    async def _acquire_snapshot(self, st: VmState, options: Mapping[str, str]) -> None:
        """The VM's snapshot, created by the first disk that needs it."""
        async with st.lock:
            if st.snapshot is None:
                assert st.vc is not None
                try:
                    max_hours = float(options.get("orphan_hours", ORPHAN_HOURS))
                except ValueError:
                    raise ConfigError(f"bad orphan_hours {options.get('orphan_hours')!r}") from None
                await self._remove_orphans(st, max_hours)
                st.tracking = await st.call(st.vc.change_tracking_enabled, st.vm)
                if not st.tracking and _flag(options.get("cbt")):
                    await st.call(st.vc.enable_change_tracking, st.vm)
                    st.tracking = True
                    log.info("cbt_enabled", vm=st.ident)
                run = options.get("session") or RUN_ID
                name = f"{SNAPSHOT_PREFIX}{run}"
                st.snapshot = await self._create(st, name, run, quiesce_mode(options))
                st.snapshot_name = name
                log.info("snapshot_created", vm=st.ident, snapshot=name, id=st.snapshot._moId,
                         consistency=st.consistency)
            st.snapshot_users += 1

    async def _create(self, st: VmState, name: str, run: str, quiesce: str) -> Any:
        """Create the snapshot, quiesced as ``quiesce`` says; sets ``st.consistency``. Shielded: a
        snapshot created while the task is cancelled must still be known, so that it is removed."""
        assert st.vc is not None
        create = functools.partial(st.vc.create_snapshot, st.vm, name, self._owner(run))
        if quiesce != "off":
            try:
                with anyio.CancelScope(shield=True):
                    snap = await st.call(functools.partial(create, quiesce=True))
                st.consistency = "application"
                return snap
            except SourceError as exc:
                if quiesce == "require":
                    raise SourceError(f"{st.label}: quiescing the guest failed (quiesce=require): {exc}") from exc
                st.quiesce_error = str(exc)
                log.warning("quiesce_failed", vm=st.ident, error=str(exc), fallback="crash-consistent snapshot")
        with anyio.CancelScope(shield=True):
            snap = await st.call(create)
        st.consistency = "crash"
        return snap

    async def _release_snapshot(self, st: VmState) -> None:
        """One disk less on the snapshot; the last removes it (shielded: also when cancelled)."""
        with anyio.CancelScope(shield=True):
            async with st.lock:
                st.snapshot_users -= 1
                if st.snapshot_users > 0 or st.snapshot is None:
                    return
                snap, st.snapshot = st.snapshot, None
                assert st.vc is not None
                # not bounded by a timeout of ours: pyvmomi's socket timeout (60 s a request) ends a
                # vCenter that stopped answering
                try:
                    await st.call(st.vc.remove_snapshot, snap)
                except SourceError as exc:
                    log.error("snapshot_remove_failed", vm=st.ident, snapshot=st.snapshot_name, error=str(exc),
                              note="the next run removes it")
                    return
                log.info("snapshot_removed", vm=st.ident, snapshot=st.snapshot_name)
