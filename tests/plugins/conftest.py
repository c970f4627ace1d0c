"""Fixtures of the plugin tests: a real S3 server (radosgw), started once per session."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.plugins.rgw import RadosGW


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
