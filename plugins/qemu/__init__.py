"""Source ``qemu``: disks of QEMU/KVM VMs (see :mod:`.source`), with the QMP and guest agent
clients it drives them through (:mod:`.qmp`)."""

from blockferry.plugins.qemu.source import QemuSourcePlugin

__all__ = ["QemuSourcePlugin"]
