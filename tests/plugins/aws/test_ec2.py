"""The ``ec2`` source against moto's server: an instance of two volumes backed up as one object
(expanded into one disk per volume, both read from one CreateSnapshots set), restored bit-exact,
then incrementally. asyncio only (aiobotocore), like test_ebs.py; the moto shims of conftest.py
apply (moto's CreateSnapshots takes each volume's snapshot through CreateSnapshot, so the
``volume_snapshots_hold_no_blocks`` shim gives every snapshot of the set its volume's blocks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import blockferry
import pytest
from blockferry.actors.server import running_server
from blockferry.datapath.source import Expands
from blockferry.errors import ConfigError, SourceError
from blockferry.jobs.config import DiskSpec, JobSpec, ObjectSpec, ProxyConfig, RepositorySettings, ServerConfig
from blockferry.plugins.aws import Ec2SourcePlugin
from blockferry.plugins.aws.ec2 import parse_url
from moto.ec2.models import EC2Backend

from tests.plugins.aws.conftest import EBS_BLOCK, REGION, Aws, GiB, MiB
from tests.plugins.aws.test_ebs import ZERO, blocks_of

pytestmark = pytest.mark.anyio


def launch(aws: Aws) -> tuple[str, str, str]:
    """An instance with a 1 GiB root volume and a 1 GiB data volume: (instance, root, data)."""
    image = aws.ec2.describe_images()["Images"][0]["ImageId"]
    inst = aws.ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, InstanceType="t3.micro",
                                 BlockDeviceMappings=[{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 1}}],
                                 TagSpecifications=[{"ResourceType": "instance",
                                                     "Tags": [{"Key": "Name", "Value": "web"}]}])
    instance = inst["Instances"][0]["InstanceId"]
    desc = aws.ec2.describe_instances(InstanceIds=[instance])["Reservations"][0]["Instances"][0]
    (root,) = [m["Ebs"]["VolumeId"] for m in desc["BlockDeviceMappings"]]
    data = aws.ec2.create_volume(Size=1, AvailabilityZone=desc["Placement"]["AvailabilityZone"])["VolumeId"]
    aws.ec2.attach_volume(VolumeId=data, InstanceId=instance, Device="/dev/sdf")
    return instance, root, data


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The instances moto's CreateSnapshots was called for."""
    seen: list[str] = []
    create = EC2Backend.create_snapshots

    def counting(self: EC2Backend, instance_spec: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        seen.append(instance_spec["InstanceId"])
        return create(self, instance_spec, *args, **kwargs)

    monkeypatch.setattr(EC2Backend, "create_snapshots", counting)
    return seen


async def test_an_instance_backed_up_from_one_snapshot_set(aws: Aws, tmp_path: Path, calls: list[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOCKFERRY_AWS_ENDPOINT_URL", aws.endpoint)  # expansion takes no options
    instance, root, data = launch(aws)
    root_blocks, data_blocks = blocks_of(20, [0, 1, 100]), blocks_of(21, [5, 2047])
    aws.write_volume(root, root_blocks)
    aws.write_volume(data, data_blocks)
    url = f"ec2://{REGION}/{instance}"
    plugin = Ec2SourcePlugin()
    assert isinstance(plugin, Expands)
    assert await plugin.expand(url) == [f"{url}/{root}", f"{url}/{data}"]  # by device name
    assert await plugin.expand(f"{url}/{data}") == [f"{url}/{data}"]

    repo = str(tmp_path / "repo")
    await blockferry.init_repository(repo)
    async with blockferry.open_repository(repo) as r:
        session = await r.backup([DiskSpec(source=url, options=aws.options)], name="web", retries=0)
    assert session.state == "success", session
    assert calls == [instance]  # one crash-consistent set for both volumes
    disks = {d.name: d for d in session.objects[0].disks}
    assert set(disks) == {root, data}
    assert disks[root].stats.read_bytes == 2 * MiB and disks[data].stats.read_bytes == 2 * MiB

    async with blockferry.open_repository(repo) as r:
        m = await r.point("latest")
        await r.restore("latest", tmp_path / "out")
    for vol, blocks in ((root, root_blocks), (data, data_blocks)):
        with open(tmp_path / "out" / vol, "rb") as f:
            for i in range(GiB // EBS_BLOCK):
                assert f.read(EBS_BLOCK) == blocks.get(i, ZERO), (vol, i)
    rec = {d.name: d for d in m.disks}
    config = rec[root].metadata["instance"]
    assert config["id"] == instance and config["type"] == "t3.micro" and config["tags"] == {"Name": "web"}
    assert config["volumes"] == {root: "/dev/sda1", data: "/dev/sdf"}
    assert rec[data].metadata["device"] == "/dev/sdf"
    assert rec[data].identity == {"region": REGION, "instance": instance, "volume": data}
    first = {vol: rec[vol].change_id for vol in rec}

    # an incremental: one new set, only the changed block of the data volume read
    aws.write_volume(data, blocks_of(22, [6]))
    async with blockferry.open_repository(repo) as r:
        again = await r.backup([DiskSpec(source=url, options=aws.options)], name="web", retries=0)
    assert again.state == "success", again
    assert calls == [instance, instance]
    disks = {d.name: d for d in again.objects[0].disks}
    assert "ListChangedBlocks" in disks[data].plan and "1 blocks changed" in disks[data].plan, disks[data].plan
    assert disks[data].stats.read_bytes == MiB and disks[root].stats.read_bytes == 0
    for vol in (root, data):  # the first set is deleted, the second kept as the next base
        (kept,) = aws.snapshots_of(vol)
        assert f"ebs:{kept}" != first[vol]


async def test_urls_and_missing_instances(aws: Aws) -> None:
    assert parse_url("ec2://eu-west-1/i-0123456789abcdef0") == ("eu-west-1", "i-0123456789abcdef0", None)
    for bad in ("ec2://eu-west-1/", "ec2://eu-west-1/vol-01234567", "ec2://eu-west-1/i-01234567/snap-01234567",
                "ec2://EU/i-01234567"):
        with pytest.raises(SourceError):
            parse_url(bad)
    with pytest.raises(SourceError, match="i-0123456789abcdef0"):
        await Ec2SourcePlugin().open(f"ec2://{REGION}/i-0123456789abcdef0", aws.options)
    instance, _, data = launch(aws)
    with pytest.raises(SourceError, match="has 2 volumes"):
        await Ec2SourcePlugin().open(f"ec2://{REGION}/{instance}", aws.options)
    with pytest.raises(SourceError, match="not attached"):
        await Ec2SourcePlugin().open(f"ec2://{REGION}/{instance}/vol-0123456789abcdef0", aws.options)


async def test_a_set_is_shared_while_its_disks_are_open_and_its_unclaimed_snapshots_deleted(
        aws: Aws, calls: list[str]) -> None:
    instance, root, data = launch(aws)
    aws.write_volume(root, blocks_of(23, [0]))
    aws.write_volume(data, blocks_of(24, [1]))
    plugin = Ec2SourcePlugin()
    a = await plugin.open(f"ec2://{REGION}/{instance}/{root}", aws.options)
    b = await plugin.open(f"ec2://{REGION}/{instance}/{data}", aws.options)
    try:
        assert await a.data_extents() == [(0, EBS_BLOCK)]  # takes the set
        assert calls == [instance] and len(aws.snapshots_of(data)) == 1
        assert await b.data_extents() == [(EBS_BLOCK, EBS_BLOCK)]  # claims its snapshot from it
        assert calls == [instance]
    finally:
        await a.aclose()
        await b.aclose()
    await a.finish(True)
    await b.finish(True)
    assert len(aws.snapshots_of(root)) == 1 and len(aws.snapshots_of(data)) == 1

    # a disk whose partner never reads: the partner's snapshot goes when the set is let go
    c = await plugin.open(f"ec2://{REGION}/{instance}/{root}", aws.options)
    try:
        await c.data_extents()
        assert calls == [instance, instance] and len(aws.snapshots_of(data)) == 2
    finally:
        await c.aclose()
    assert aws.snapshots_of(data) == [b.snapshot]  # the unclaimed one deleted, the base kept
    await c.finish(False)
    assert aws.snapshots_of(root) == [a.snapshot]


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_refuses_to_run_on_trio_with_a_clear_error(anyio_backend: str) -> None:
    for call in (Ec2SourcePlugin().open(f"ec2://{REGION}/i-0123456789abcdef0", {}),
                 Ec2SourcePlugin().expand(f"ec2://{REGION}/i-0123456789abcdef0")):
        with pytest.raises(ConfigError, match="asyncio only"):
            await call


async def test_a_server_job_over_an_instance_on_a_proxy_with_the_ec2_transport(
        aws: Aws, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As the daemon runs jobs: a proxy configured with the ``ec2`` transport, a job whose object
    is an instance (its options carry the settings), expanded when the job starts."""
    monkeypatch.setenv("BLOCKFERRY_AWS_ENDPOINT_URL", aws.endpoint)  # expansion takes no options
    instance, root, data = launch(aws)
    aws.write_volume(root, blocks_of(25, [0]))
    aws.write_volume(data, blocks_of(26, [3]))
    repo = str(tmp_path / "repo")
    await blockferry.init_repository(repo)
    cfg = ServerConfig(proxies=[ProxyConfig(name="aws-proxy", transports=["ec2"])])
    spec = JobSpec(name="web-nightly", repository="main", retries=0, objects=[
        ObjectSpec(name="web", disks=[DiskSpec(source=f"ec2://{REGION}/{instance}", options=aws.options)])])
    async with running_server(cfg) as server:
        await server.add_repository(RepositorySettings(name="main", url=repo))
        session = await (await server.run_job(spec)).result()
    assert session.state == "success", session
    disks = {d.name: d for d in session.objects[0].disks}
    assert set(disks) == {root, data} and {d.proxy for d in disks.values()} == {"aws-proxy"}
    assert disks[data].stats.read_bytes == MiB
