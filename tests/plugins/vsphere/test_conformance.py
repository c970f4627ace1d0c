"""The source contract (tests/conformance.py) kept by the ``vsphere`` source: each test image is a
virtual disk of one simulated VM whose contents the test put on the datastore, read through a VM
snapshot and the ``http`` transport."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from typing import Any

import pytest
from blockferry.datapath.source import ChangeTracking, Expands
from blockferry.plugins.vsphere import VSphereSourcePlugin

from tests.conformance import SourceConformance, image_bytes
from tests.plugins.vsphere.conftest import Simulator
from tests.plugins.vsphere.vsim import SimClient

VM = "DC0_C0_RP0_VM2"

#: (contents digest, n-th image of that content in one test) -> disk key: the same images recur
#: across tests and event loops, and are made once
_made: dict[tuple[str, int], int] = {}


class TestVSphereSource(SourceConformance):
    @pytest.fixture
    def source_plugin(self) -> VSphereSourcePlugin:
        return VSphereSourcePlugin()

    @pytest.fixture
    def make_source_url(self, sim: SimClient, vcsim: Simulator):  # type: ignore[no-untyped-def]
        seen: dict[str, itertools.count[int]] = {}

        def make(size: int, segments: Sequence[tuple[int, bytes]]) -> str:
            data = image_bytes(size, segments)
            digest = hashlib.sha256(data + len(data).to_bytes(8, "big")).hexdigest()
            key = (digest, next(seen.setdefault(digest, itertools.count())))
            if key not in _made:
                vm = sim.vm(VM)
                disk = sim.add_disk(vm, len(data))  # a segment may end past ``size``: the image is longer
                # the file ends after its last non-zero byte: the rest of the disk reads as zeros
                sim.put_file(disk.backing.fileName, data.rstrip(b"\0"))
                _made[key] = disk.key
            return f"{vcsim.url(VM)}#{_made[key]}"

        return make

    @pytest.fixture
    def missing_source_url(self, vcsim: Simulator) -> tuple[str, str]:
        return vcsim.url("no-such-vm"), "'no-such-vm': no such VM"

    @pytest.fixture
    def declared_capabilities(self) -> set[type]:
        return {Expands, ChangeTracking}

    @pytest.fixture
    def source_options(self) -> dict[str, Any]:
        return {}
