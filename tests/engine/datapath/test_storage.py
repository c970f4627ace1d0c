"""The storage-system contract's naming rules (engine/datapath/storage.py): which snapshots are
blockferry's, and which temporary ones are leftovers of a backup that is over. The contract's
methods are tested against a real Ceph cluster in tests/plugins/rbd/."""

from __future__ import annotations

import datetime as dt
import socket

from blockferry import registry
from blockferry.datapath.storage import (
    hold,
    is_retained,
    is_temporary,
    leftover,
    retained_name,
    temporary_name,
)


def test_names_say_whose_and_which_kind() -> None:
    tmp = temporary_name()
    assert is_temporary(tmp) and not is_retained(tmp)
    kept = retained_name(tmp)
    assert is_retained(kept) and not is_temporary(kept) and kept.endswith(tmp.split(".", 1)[1])
    assert temporary_name() != tmp
    for other in ("daily-2026", "blockferry", "blockferry-tmp", "blockferry-keepsake"):
        assert not is_temporary(other) and not is_retained(other) and not leftover(other)


def test_leftovers() -> None:
    now = dt.datetime.now(dt.UTC)
    host = "".join(c for c in socket.gethostname() if c.isalnum() or c == "-")[:40]
    young_elsewhere = f"blockferry-tmp.{now:%Y%m%dT%H%M%SZ}.some-other-host.1.abcd"
    assert not leftover(young_elsewhere)  # another host's backup may still read it
    assert leftover(young_elsewhere, now=now + dt.timedelta(hours=25))  # that host never came back
    assert leftover("blockferry-tmp.garbled")  # ours by prefix, not in this format
    mine = temporary_name()
    assert leftover(mine)  # this process's, held by no backup
    hold(mine)
    try:
        assert not leftover(mine)
    finally:
        hold(mine, False)
    assert host in mine
    assert not leftover(retained_name(mine))  # retained snapshots are never leftovers


def test_storage_plugins_are_found_by_scheme() -> None:
    assert type(registry.storage_plugin("rbd://pool?conf=/etc/ceph/ceph.conf")).__name__ == "RbdStoragePlugin"
