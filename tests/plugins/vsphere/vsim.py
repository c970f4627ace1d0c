"""The tests' own view of the simulated vCenter (blocking pyvmomi calls, as a user's tools would
make): find VMs, give them disks, put disk contents on the datastore, look at snapshots."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any
from urllib.parse import quote

from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl


class SimClient:
    def __init__(self, host: str, port: int, user: str, password: str) -> None:
        self.base = f"http://{host}:{port}"
        self.si = SmartConnect(host=host, port=port, user=user, pwd=password, protocol="http",
                               disableSslCertValidation=True)
        self.content = self.si.RetrieveContent()

    def close(self) -> None:
        Disconnect(self.si)

    def vm(self, name: str) -> Any:
        view = self.content.viewManager.CreateContainerView(self.content.rootFolder, [vim.VirtualMachine], True)
        try:
            (vm,) = [v for v in view.view if v.name == name]
        finally:
            view.Destroy()
        return vm

    @staticmethod
    def disks(vm: Any) -> list[Any]:
        return [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]

    def add_disk(self, vm: Any, capacity: int) -> Any:
        """A new virtual disk of ``capacity`` bytes on the VM's first disk's controller."""
        first = self.disks(vm)[0]
        disk = vim.vm.device.VirtualDisk(
            key=-1, controllerKey=first.controllerKey, unitNumber=len(self.disks(vm)) + 1,
            capacityInKB=capacity // 1024, capacityInBytes=capacity,
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(diskMode="persistent", thinProvisioned=True,
                                                                  fileName=""),
        )
        spec = vim.vm.ConfigSpec(deviceChange=[vim.vm.device.VirtualDeviceSpec(
            operation="add", fileOperation="create", device=disk)])
        WaitForTask(vm.ReconfigVM_Task(spec=spec))
        return self.disks(vm)[-1]

    def resize(self, vm: Any, disk: Any, capacity: int) -> None:
        disk.capacityInKB, disk.capacityInBytes = capacity // 1024, capacity
        spec = vim.vm.ConfigSpec(deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="edit", device=disk)])
        WaitForTask(vm.ReconfigVM_Task(spec=spec))

    def put_file(self, datastore_path: str, data: bytes) -> None:
        """PUT ``data`` at ``[ds] path`` through the datastore's HTTP access."""
        ds, _, path = datastore_path[1:].partition("] ")
        url = f"{self.base}/folder/{quote(path)}?dcPath=DC0&dsName={quote(ds)}"
        req = urllib.request.Request(url, data=data, method="PUT")
        with urllib.request.urlopen(req) as r:
            assert r.status in (200, 201, 204), r.status

    def snapshots(self, vm: Any) -> list[Any]:
        # through the property collector: reading ``vm.snapshot`` while it is unset makes this
        # simulator's Fetch panic
        info = self.prop(vm, "snapshot")
        out, todo = [], list(info.rootSnapshotList) if info else []
        while todo:
            node = todo.pop()
            out.append(node)
            todo.extend(node.childSnapshotList or [])
        return out

    def snapshot_names(self, vm: Any) -> list[str]:
        return sorted(s.name for s in self.snapshots(vm))

    def create_snapshot(self, vm: Any, name: str, owner: dict[str, Any] | None) -> None:
        description = json.dumps({"by": "blockferry", **owner}) if owner is not None else "a user's own"
        WaitForTask(vm.CreateSnapshot_Task(name=name, description=description, memory=False, quiesce=False))

    def remove_all_snapshots(self, vm: Any) -> None:
        WaitForTask(vm.RemoveAllSnapshots_Task())

    def set_change_tracking(self, vm: Any, on: bool) -> None:
        WaitForTask(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=on)))

    def prop(self, obj: Any, path: str) -> Any:
        """A property through the property collector (None when unset)."""
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=obj)],
            propSet=[vmodl.query.PropertyCollector.PropertySpec(type=type(obj), pathSet=[path])])
        result = self.content.propertyCollector.RetrievePropertiesEx([spec], vmodl.query.PropertyCollector.RetrieveOptions())
        return next((p.val for o in (result.objects if result else []) for p in o.propSet or []), None)

    def wait(self, task: Any) -> None:
        """Wait for a task by its state alone (this simulator fills some tasks' ``info.entity``
        with objects pyVim's WaitForTask cannot decode)."""
        while (state := self.prop(task, "info.state")) not in ("success", "error"):
            time.sleep(0.01)
        assert state == "success", self.prop(task, "info.error")

    def delete_file(self, datastore_path: str) -> None:
        """Remove a datastore file (as a datastore gone or a disk file lost would leave a VM)."""
        (dc,) = [e for e in self.content.rootFolder.childEntity if isinstance(e, vim.Datacenter)]
        self.wait(self.content.fileManager.DeleteDatastoreFile_Task(name=datastore_path, datacenter=dc))
