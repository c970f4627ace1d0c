"""Source ``vsphere``: disks of VMware vSphere VMs read from VM snapshots (see :mod:`.source`), the
vSphere API side on pyvmomi (:mod:`.vcenter`) and the transports that read the disks
(:mod:`.transport`). Needs the ``vsphere`` extra (pyvmomi, httpx)."""

from blockferry.plugins.vsphere.source import VSphereSourcePlugin

__all__ = ["VSphereSourcePlugin"]
