"""moto's server, started once per session on a free loopback port, standing in for EC2 and the
EBS direct APIs; and the helpers that write real block contents into it.

moto departs from AWS's documentation of the EBS direct APIs in ways these tests must not let
the plugin depend on (the plugin is written to AWS's documentation). The server runs in this
process (``ThreadedMotoServer``), so the shims below patch moto's models for the session, each
named after the departure it corrects:

``block_size_512``
    moto answers ``BlockSize: 512`` (StartSnapshot, ListSnapshotBlocks, ListChangedBlocks); AWS
    documents 524288 (512 KiB), the size of every block PutSnapshotBlock takes and
    GetSnapshotBlock returns. Shim: moto's snapshots say 524288.
``changed_blocks_miss_second_only``
    moto's ListChangedBlocks walks the first snapshot's blocks only, so a block written only in
    the second snapshot is missing; AWS lists it (without a FirstBlockToken). Shim: they are added.
``volume_snapshots_hold_no_blocks``
    moto keeps no data for EC2 volumes, and a snapshot taken with EC2 CreateSnapshot is unknown
    to its EBS direct APIs. Shim: a test writes a volume's blocks with :func:`write_volume`, and a
    CreateSnapshot of that volume becomes an EBS snapshot holding them (as AWS's would).
``deleted_snapshots_stay_readable``
    EC2 DeleteSnapshot leaves moto's EBS snapshot readable; on AWS the blocks go with it. Shim:
    deleting drops the EBS snapshot as well.

Other departures the tests live with, not relied on by the plugin: moto validates no checksum
on PutSnapshotBlock and hands back the one given (so a test can store a wrong one to stand for
a block damaged in transit); it does not page (NextToken, MaxResults, StartingBlockIndex are
ignored; the plugin pages as documented); it ignores BlockToken and ParentSnapshotId (so each
snapshot a test starts is written whole, as a child of its parent would read on AWS); an EC2
snapshot is ``completed`` at once (AWS: ``pending`` first, which the plugin waits out).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import boto3
import pytest
from moto.ebs import models as ebs_models
from moto.ebs.models import EBSBackend, EBSSnapshot, ebs_backends
from moto.ec2.models import EC2Backend
from moto.server import ThreadedMotoServer

REGION = "eu-west-1"
ACCOUNT = "123456789012"
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
EBS_BLOCK = 512 * KiB

#: volume id → block index → data, what write_volume wrote (the volume_snapshots_hold_no_blocks shim)
VOLUMES: dict[str, dict[int, bytes]] = {}


def sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def _install_shims(mp: pytest.MonkeyPatch) -> None:
    init = EBSSnapshot.__init__

    def block_size_512(self: EBSSnapshot, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.block_size = EBS_BLOCK

    mp.setattr(EBSSnapshot, "__init__", block_size_512)

    listed = EBSBackend.list_changed_blocks

    def changed_blocks_miss_second_only(self: EBSBackend, first_snapshot_id: str,
                                        second_snapshot_id: str) -> Any:
        changed, snap = listed(self, first_snapshot_id, second_snapshot_id)
        first, second = self.snapshots[first_snapshot_id], self.snapshots[second_snapshot_id]
        for idx, block in second.blocks.items():
            if idx not in first.blocks:
                changed[idx] = (None, block.block_token)
        return dict(sorted(changed.items())), snap

    mp.setattr(EBSBackend, "list_changed_blocks", changed_blocks_miss_second_only)

    create = EC2Backend.create_snapshot

    def volume_snapshots_hold_no_blocks(self: EC2Backend, volume_id: str, *args: Any, **kwargs: Any) -> Any:
        snapshot = create(self, volume_id, *args, **kwargs)
        contents = VOLUMES.get(volume_id)
        if contents is not None:
            ebs = ebs_backends[self.account_id][self.region_name]
            snap = ebs_models.EBSSnapshot(account_id=self.account_id, snapshot=snapshot)
            for idx, data in contents.items():
                snap.put_block(idx, data, sha256_b64(data), "SHA256", len(data))
            snap.status = "completed"
            ebs.snapshots[snapshot.id] = snap
        return snapshot

    mp.setattr(EC2Backend, "create_snapshot", volume_snapshots_hold_no_blocks)

    delete = EC2Backend.delete_snapshot

    def deleted_snapshots_stay_readable(self: EC2Backend, snapshot_id: str) -> Any:
        gone = delete(self, snapshot_id)
        ebs_backends[self.account_id][self.region_name].snapshots.pop(snapshot_id, None)
        return gone

    mp.setattr(EC2Backend, "delete_snapshot", deleted_snapshots_stay_readable)


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's server on a free loopback port (stopped after the session), AWS credentials for it
    in the environment, and the shims above installed."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                                "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": REGION}.items():
                mp.setenv(name, value)
            for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
                mp.delenv(name, raising=False)
            mp.setenv("AWS_CONFIG_FILE", "/nonexistent")
            mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
            _install_shims(mp)
            yield f"http://{host}:{port}"
    finally:
        server.stop()


class Aws:
    """Synchronous boto3 clients of moto's server, and the writing helpers."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=endpoint)
        self.ebs = boto3.client("ebs", region_name=REGION, endpoint_url=endpoint)

    @property
    def options(self) -> dict[str, Any]:
        """The source options that point the plugin at moto (and keep its polling short)."""
        return {"endpoint_url": self.endpoint, "poll_interval": 0.01, "backoff_base": 0.01}

    def write_snapshot(self, size_gib: int, blocks: Mapping[int, bytes], *, checksums: Mapping[int, str] | None = None,
                       tags: Mapping[str, str] | None = None) -> str:
        """A completed snapshot of ``size_gib`` GiB holding ``blocks`` (index → 512 KiB), written
        through StartSnapshot / PutSnapshotBlock / CompleteSnapshot."""
        started = self.ebs.start_snapshot(VolumeSize=size_gib, Description="written by a test",
                                          Tags=[{"Key": k, "Value": v} for k, v in (tags or {}).items()])
        snap = started["SnapshotId"]
        assert started["BlockSize"] == EBS_BLOCK  # the block_size_512 shim
        for idx, data in blocks.items():
            assert len(data) == EBS_BLOCK
            self.ebs.put_snapshot_block(SnapshotId=snap, BlockIndex=idx, BlockData=data, DataLength=len(data),
                                        Checksum=(checksums or {}).get(idx) or sha256_b64(data),
                                        ChecksumAlgorithm="SHA256")
        self.ebs.complete_snapshot(SnapshotId=snap, ChangedBlocksCount=len(blocks))
        return snap

    def create_volume(self, size_gib: int, blocks: Mapping[int, bytes]) -> str:
        vol = self.ec2.create_volume(Size=size_gib, AvailabilityZone=f"{REGION}a")["VolumeId"]
        self.write_volume(vol, blocks)
        return vol

    def write_volume(self, volume: str, blocks: Mapping[int, bytes]) -> None:
        """The volume's written blocks from now on (index → 512 KiB data, replacing those given)."""
        assert all(len(d) == EBS_BLOCK for d in blocks.values())
        VOLUMES.setdefault(volume, {}).update(blocks)

    def snapshots_of(self, volume: str) -> list[str]:
        """blockferry's snapshots of ``volume`` that exist (by its id and the tag)."""
        got = self.ec2.describe_snapshots(OwnerIds=["self"], Filters=[
            {"Name": "volume-id", "Values": [volume]}, {"Name": "tag:blockferry", "Values": ["1"]}])
        return sorted(s["SnapshotId"] for s in got["Snapshots"])

    def exists(self, snapshot: str) -> bool:
        got = self.ec2.describe_snapshots(Filters=[{"Name": "snapshot-id", "Values": [snapshot]}])
        return bool(got["Snapshots"])


@pytest.fixture
def aws(moto_endpoint: str) -> Aws:
    return Aws(moto_endpoint)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore is asyncio-only (the ebs source refuses trio: tested in test_ebs.py)
