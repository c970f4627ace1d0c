"""Fixtures of the plugin tests: a real S3 server (radosgw) on a one-node Ceph cluster, started
once per session, and an RBD pool on that same cluster for the storage-snapshot tests."""

from __future__ import annotations

import os
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.plugins.rgw import RadosGW, RbdPool


@pytest.fixture(scope="session")
def rgw() -> Iterator[RadosGW]:
    """A one-node Ceph cluster with radosgw on loopback (about 20 s to start). Fails, never
    skips, when Ceph is not installed. Every daemon is stopped by its pid at the end, also when
    starting failed half-way."""
    if dev := os.environ.get("BLOCKFERRY_TEST_RGW_PORT"):
        # developers iterating on these tests may point them at a cluster they started by hand
        # with tests/plugins/rgw.py (same keys, user created); CI never sets it
        server = RadosGW(Path(tempfile.gettempdir()))
        server.port = int(dev)
        yield server
        return
    root = Path(tempfile.mkdtemp(prefix="blockferry-rgw-"))
    server = RadosGW(root)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        import shutil

        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def ceph_rbd(request: pytest.FixtureRequest) -> Iterator[RbdPool]:
    """An RBD pool on the session's Ceph cluster (the ``rgw`` fixture's: one cluster per test
    session). Its images are small (tens of MiB) and removed by the tests that make them, well
    within the OSD's memstore (``RadosGW.memstore_bytes``, 1.5 GiB, shared with the S3 tests)."""
    if conf := os.environ.get("BLOCKFERRY_TEST_CEPH_CONF"):
        # developers may point the RBD tests at a cluster they started by hand (see rgw.py)
        pool = RbdPool(Path(conf), f"bf-rbd-{uuid.uuid4().hex[:6]}")
    else:
        server: RadosGW = request.getfixturevalue("rgw")
        pool = RbdPool(server.conf, "blockferry-rbd")
    pool.create()
    try:
        yield pool
    finally:
        subprocess.run(["ceph", "-c", str(pool.conf), "osd", "pool", "rm", pool.name, pool.name,
                        "--yes-i-really-really-mean-it"], capture_output=True, timeout=60)
