"""Ceph RBD: the storage system ``rbd`` (:mod:`.storage`: images as volumes, RBD snapshots) and
the source ``rbd`` (:mod:`.source`: one image, read from a temporary storage snapshot)."""

from blockferry.plugins.rbd.source import RbdSourcePlugin
from blockferry.plugins.rbd.storage import RbdStoragePlugin

__all__ = ["RbdSourcePlugin", "RbdStoragePlugin"]
