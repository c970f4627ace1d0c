"""The vSphere API side of the ``vsphere`` source, on pyvmomi: log in, find a VM and its disks,
create, list and remove VM snapshots.

pyvmomi is synchronous: every function here blocks and is called from worker threads
(:mod:`.source` runs them through ``anyio.to_thread`` under the VM's own limiter), never on the
event loop. pyvmomi's faults and socket errors become engine errors here (:func:`faults`), with
the vCenter and the object in the message.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from blockferry.errors import ConfigError, SourceError
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

#: the prefix of every snapshot blockferry makes; the rest is the run id (see :mod:`.source`)
SNAPSHOT_PREFIX = "blockferry-"


@dataclass(frozen=True)
class Endpoint:
    """Where and as whom to log in. ``password`` never comes from the URL."""

    host: str
    port: int
    user: str
    password: str
    protocol: str = "https"
    #: False only when asked for (``insecure=1``): TLS certificates are verified by default
    verify: bool = True

    def __str__(self) -> str:
        return f"{self.protocol}://{self.host}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.protocol != "https":
            return None
        ctx = ssl.create_default_context()
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


@contextlib.contextmanager
def faults(what: str) -> Iterator[None]:
    """pyvmomi's faults and network errors, as SourceError naming ``what``."""
    try:
        yield
    except vim.fault.InvalidLogin as exc:
        raise SourceError(f"{what}: login refused (wrong user or password)") from exc
    except vim.fault.NoPermission as exc:
        raise SourceError(f"{what}: permission denied ({exc.msg or type(exc).__name__})") from exc
    except vmodl.fault.ManagedObjectNotFound as exc:
        raise SourceError(f"{what}: no longer exists (removed while being backed up?)") from exc
    except vmodl.MethodFault as exc:
        raise SourceError(f"{what}: vCenter refused: {exc.msg or type(exc).__name__}") from exc
    except ssl.SSLError as exc:
        raise SourceError(f"{what}: TLS failed: {exc.reason or exc}") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise SourceError(f"{what}: vCenter unreachable: {exc}") from exc
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # pyvmomi could not decode an answer
        raise SourceError(f"{what}: unexpected answer from vCenter: {exc}") from exc


class VCenter:
    """One logged-in session (blocking). Close it with :meth:`close`."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        with faults(str(endpoint)):
            self.si = SmartConnect(host=endpoint.host, port=endpoint.port, user=endpoint.user,
                                   pwd=endpoint.password, protocol=endpoint.protocol,
                                   sslContext=endpoint.ssl_context(),
                                   disableSslCertValidation=not endpoint.verify, httpConnectionTimeout=60)
            self.content = self.si.RetrieveContent()

    def close(self) -> None:
        with contextlib.suppress(Exception):  # logging out of a session that is gone is no error
            Disconnect(self.si)

    def session_cookie(self) -> str:
        """``name=value`` of the SOAP session cookie: the datastore's HTTP file access accepts it."""
        cookie = getattr(self.si._stub, "cookie", "") or ""
        return cookie.split(";", 1)[0].strip()

    # -- inventory ------------------------------------------------------------------------------

    def find_vm(self, ident: str) -> Any:
        """The VM named ``ident``, or with managed-object id ``ident`` (``vm-42``)."""
        what = f"{self.endpoint}: VM {ident!r}"
        with faults(what):
            if ident.startswith("vm-"):
                vm = vim.VirtualMachine(ident, self.si._stub)
                try:
                    vm.name  # noqa: B018 (a property read: fails when the moref is unknown)
                    return vm
                except vmodl.fault.ManagedObjectNotFound:
                    pass  # a VM may also be named vm-...
            view = self.content.viewManager.CreateContainerView(self.content.rootFolder, [vim.VirtualMachine], True)
            try:
                found = [vm for vm in view.view if vm.name == ident]
            finally:
                view.Destroy()
        if not found:
            raise SourceError(f"{what}: no such VM")
        if len(found) > 1:
            ids = ", ".join(vm._moId for vm in found)
            raise SourceError(f"{what}: {len(found)} VMs have that name ({ids}): name one by its id")
        return found[0]

    def disks(self, vm: Any, *, config: Any = None) -> list[Any]:
        """The VM's virtual disks (``config``: a snapshot's configuration instead of the VM's)."""
        with faults(f"{self.endpoint}: VM {vm._moId}"):
            cfg = config if config is not None else vm.config
            if cfg is None:
                raise SourceError(f"{self.endpoint}: VM {vm._moId} has no configuration (inaccessible?)")
            return [d for d in cfg.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]

    def configuration(self, vm: Any) -> dict[str, Any]:
        """What a restore needs to rebuild the VM: hardware, disks, networks (plain data)."""
        with faults(f"{self.endpoint}: VM {vm._moId}"):
            cfg = vm.config
            hw = cfg.hardware
            devices = {d.key: d for d in hw.device}
            disks, nics = [], []
            for d in hw.device:
                if isinstance(d, vim.vm.device.VirtualDisk):
                    ctrl = devices.get(d.controllerKey)
                    disks.append({
                        "key": d.key, "label": d.deviceInfo.label if d.deviceInfo else "",
                        "capacity": int(d.capacityInBytes or d.capacityInKB * 1024),
                        "file": getattr(d.backing, "fileName", ""),
                        "thin": bool(getattr(d.backing, "thinProvisioned", False)),
                        "controller": type(ctrl).__name__.rsplit(".", 1)[-1] if ctrl else "",
                        "bus": getattr(ctrl, "busNumber", None), "unit": d.unitNumber,
                    })
                elif isinstance(d, vim.vm.device.VirtualEthernetCard):
                    b = d.backing
                    network = getattr(b, "deviceName", None) or getattr(getattr(b, "port", None), "portgroupKey", "")
                    nics.append({
                        "key": d.key, "label": d.deviceInfo.label if d.deviceInfo else "",
                        "type": type(d).__name__.rsplit(".", 1)[-1], "mac": d.macAddress or "",
                        "network": network or "",
                    })
            return {
                "name": cfg.name, "moref": vm._moId, "instance_uuid": cfg.instanceUuid or "",
                "uuid": cfg.uuid or "", "guest_id": cfg.guestId or "", "version": cfg.version or "",
                "firmware": cfg.firmware or "", "cpus": hw.numCPU, "cores_per_socket": hw.numCoresPerSocket,
                "memory_mb": hw.memoryMB, "disks": disks, "networks": nics,
                "files": cfg.files.vmPathName if cfg.files else "",
            }

    def datacenter_path(self, vm: Any) -> str:
        """The inventory path of the VM's datacenter (``dcPath`` of the datastore's HTTP access)."""
        with faults(f"{self.endpoint}: VM {vm._moId}"):
            names, obj = [], vm.parent
            while obj is not None and not isinstance(obj, vim.Datacenter):
                obj = obj.parent
            if obj is None:
                raise SourceError(f"{self.endpoint}: VM {vm._moId} is in no datacenter")
            while obj is not None and obj != self.content.rootFolder:
                names.append(obj.name)
                obj = obj.parent
            return "/".join(reversed(names))

    # -- snapshots ------------------------------------------------------------------------------

    def create_snapshot(self, vm: Any, name: str, owner: dict[str, Any], *, quiesce: bool = False) -> Any:
        """A snapshot without memory named ``name``, quiesced through VMware Tools if asked (a
        failure to quiesce raises); ``owner`` goes into its description (JSON) so a later run
        can tell whether its maker is still alive."""
        what = f"{self.endpoint}: {'quiesced ' if quiesce else ''}snapshot of VM {vm._moId}"
        with faults(what):
            task = vm.CreateSnapshot_Task(name=name, description=json.dumps(owner), memory=False, quiesce=quiesce)
            return self.wait(task)

    def wait(self, task: Any) -> Any:
        """Wait for ``task`` to end (polling, in this worker thread); its result, or its fault
        raised. Reads only ``info.state``, ``info.result`` and ``info.error`` (pyVim's WaitForTask
        reads the whole ``info``, whose ``entity`` some servers fill with a non-entity)."""
        delay = 0.02
        while True:
            state = self.optional_property(task, "info.state")
            if state == vim.TaskInfo.State.success:
                return self.optional_property(task, "info.result")
            if state == vim.TaskInfo.State.error:
                error = self.optional_property(task, "info.error")
                raise error if isinstance(error, vmodl.MethodFault) else SourceError(f"task {task._moId} failed")
            time.sleep(delay)  # a worker thread, never the event loop
            delay = min(delay * 2, 1.0)

    def optional_property(self, obj: Any, name: str) -> Any:
        """A property that may be unset (None then), read through the property collector: reading
        it as an attribute makes pyvmomi call ``Fetch``, which some servers (govmomi's simulator)
        cannot answer for an unset property."""
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=obj, skip=False)],
            propSet=[vmodl.query.PropertyCollector.PropertySpec(type=type(obj), pathSet=[name], all=False)])
        result = self.content.propertyCollector.RetrievePropertiesEx([spec], vmodl.query.PropertyCollector.RetrieveOptions())
        for o in (result.objects if result else []):
            for p in o.propSet or []:
                if p.name == name:
                    return p.val
        return None

    def snapshots(self, vm: Any) -> list[Any]:
        """Every snapshot of the VM (a flat list of snapshot-tree nodes)."""
        with faults(f"{self.endpoint}: snapshots of VM {vm._moId}"):
            info = self.optional_property(vm, "snapshot")
            out, todo = [], list(info.rootSnapshotList) if info else []
            while todo:
                node = todo.pop()
                out.append(node)
                todo.extend(node.childSnapshotList or [])
            return out

    def remove_snapshot(self, snapshot: Any) -> None:
        """Remove one snapshot (its changes consolidated into the disks)."""
        with faults(f"{self.endpoint}: snapshot {snapshot._moId}"):
            self.wait(snapshot.RemoveSnapshot_Task(removeChildren=False, consolidate=True))

    # -- changed block tracking ---------------------------------------------------------------

    def change_tracking_enabled(self, vm: Any) -> bool:
        with faults(f"{self.endpoint}: VM {vm._moId}"):
            return bool(vm.config.changeTrackingEnabled)

    def enable_change_tracking(self, vm: Any) -> None:
        """Turn changed block tracking on (it starts with the next snapshot)."""
        with faults(f"{self.endpoint}: enabling change tracking on VM {vm._moId}"):
            self.wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True)))

    def changed_areas(self, vm: Any, snapshot: Any, key: int, change_id: str, capacity: int) -> list[tuple[int, int]]:
        """``QueryChangedDiskAreas`` over the whole disk: the areas changed since ``change_id``
        (``*``: every allocated area) as of ``snapshot``. ChangeTrackingReset when vCenter
        refuses the change id."""
        what = f"{self.endpoint}: changed areas of disk {key} of VM {vm._moId}"
        out: list[tuple[int, int]] = []
        start = 0
        with faults(what):
            while start < capacity:
                try:
                    info = vm.QueryChangedDiskAreas(snapshot=snapshot, deviceKey=key, startOffset=start,
                                                    changeId=change_id)
                except (vmodl.fault.InvalidArgument, vim.fault.FileFault) as exc:
                    raise ChangeTrackingReset(f"{what}: change id {change_id!r} refused: "
                                              f"{exc.msg or type(exc).__name__}") from exc
                out.extend((int(a.start), int(a.length)) for a in info.changedArea or [])
                end = int(info.startOffset) + int(info.length)
                if end <= start:
                    break
                start = end
        return out

    def snapshot_config(self, snapshot: Any) -> Any:
        with faults(f"{self.endpoint}: snapshot {snapshot._moId}"):
            return snapshot.config


class ChangeTrackingReset(SourceError):
    """vCenter refused a change id: the disk's tracking was reset since (VM restored, moved,
    tracking turned off and on), so the changes since then cannot be known."""


def owner_of(description: str) -> dict[str, Any] | None:
    """The owner a blockferry snapshot's description records, or None when it is not ours."""
    try:
        owner = json.loads(description or "")
    except ValueError:
        return None
    return owner if isinstance(owner, dict) and owner.get("by") == "blockferry" else None


def parse_port(text: str | None, protocol: str) -> int:
    if not text:
        return 443 if protocol == "https" else 80
    try:
        port = int(text)
    except ValueError:
        raise ConfigError(f"bad vCenter port {text!r}") from None
    if not 0 < port < 65536:
        raise ConfigError(f"bad vCenter port {text!r}")
    return port
