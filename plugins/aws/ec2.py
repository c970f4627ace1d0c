"""Source ``ec2``: the EBS volumes of an EC2 instance, snapshotted together
(``ec2://REGION/INSTANCE_ID``, one disk per volume: ``ec2://REGION/INSTANCE_ID/VOLUME_ID``).

A job expands an instance's URL into one disk per attached EBS volume (:class:`Ec2SourcePlugin`
offers ``Expands``), in the order of their device names. The first disk of an instance that needs
its snapshot takes the snapshots of **all** the instance's volumes at once, with one
``CreateSnapshots`` call: a crash-consistent set, tagged as blockferry's with the run's id, the
instance and the chain. Each disk then reads its own volume's snapshot exactly as the ``ebs``
source does (:class:`~blockferry.plugins.aws.ebs.EbsDisk`: EBS direct APIs, checksums, change
tracking through ListChangedBlocks, deletion of the snapshots no longer needed).

The set is shared through the plugin object (one per process) until every volume of it was
claimed by a disk; a disk that needs its snapshot later (its task waited for a slot after the
others finished) gets a new set, of a later moment. The instance's configuration (type,
availability zone, subnet, security groups, network interfaces, device names, tags) is kept in
each disk's metadata, so it is stored with the point.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import anyio
from blockferry.errors import SourceError
from blockferry.log import get_logger
from blockferry.plugins.aws.client import AwsClients, AwsSettings, load_settings, require_asyncio
from blockferry.plugins.aws.ebs import TAG, TAG_CHAIN, TAG_RUN, EbsDisk, cleanup

log = get_logger(component="ec2")

TAG_INSTANCE = "blockferry:instance"
_REGION = re.compile(r"[a-z]{2}(-[a-z0-9]+)+-\d+")
_INSTANCE = re.compile(r"i-[0-9a-f]{8,17}")
_VOLUME = re.compile(r"vol-[0-9a-f]{8,17}")


def parse_url(url: str) -> tuple[str, str, str | None]:
    """``ec2://REGION/INSTANCE[/VOLUME]`` → ``(region, instance, volume or None)``."""
    p = urlparse(url)
    parts = p.path.strip("/").split("/") if p.path.strip("/") else []
    if p.scheme != "ec2" or not p.netloc or len(parts) not in (1, 2) or p.query or p.fragment:
        raise SourceError(f"{url}: an EC2 source is named ec2://REGION/INSTANCE_ID (or .../INSTANCE_ID/VOLUME_ID)")
    if not _REGION.fullmatch(p.netloc):
        raise SourceError(f"{url}: {p.netloc!r} is not an AWS region name")
    if not _INSTANCE.fullmatch(parts[0]):
        raise SourceError(f"{url}: {parts[0]!r} is not an EC2 instance id (i-...)")
    if len(parts) == 2 and not _VOLUME.fullmatch(parts[1]):
        raise SourceError(f"{url}: {parts[1]!r} is not an EBS volume id (vol-...)")
    return p.netloc, parts[0], parts[1] if len(parts) == 2 else None


def configuration(instance: Mapping[str, Any]) -> dict[str, Any]:
    """What of DescribeInstances is kept with the point (enough to launch a like instance)."""
    return {
        "id": instance.get("InstanceId"),
        "type": instance.get("InstanceType"),
        "image": instance.get("ImageId"),
        "availability_zone": (instance.get("Placement") or {}).get("AvailabilityZone"),
        "subnet": instance.get("SubnetId"),
        "vpc": instance.get("VpcId"),
        "root_device": instance.get("RootDeviceName"),
        "security_groups": [g.get("GroupId") for g in instance.get("SecurityGroups") or []],
        "network_interfaces": [
            {"id": n.get("NetworkInterfaceId"), "subnet": n.get("SubnetId"), "private_ip": n.get("PrivateIpAddress"),
             "device_index": (n.get("Attachment") or {}).get("DeviceIndex"),
             "security_groups": [g.get("GroupId") for g in n.get("Groups") or []]}
            for n in instance.get("NetworkInterfaces") or []
        ],
        "volumes": {m["Ebs"]["VolumeId"]: m.get("DeviceName") for m in instance.get("BlockDeviceMappings") or []
                    if m.get("Ebs", {}).get("VolumeId")},
        "tags": {t["Key"]: t["Value"] for t in instance.get("Tags") or []},
    }


async def describe_instance(clients: AwsClients, url: str, instance: str) -> dict[str, Any]:
    got = await clients.call(f"{url}: DescribeInstances", lambda: clients.ec2.describe_instances(
        InstanceIds=[instance]))
    for reservation in got.get("Reservations") or []:
        for found in reservation.get("Instances") or []:
            if found.get("InstanceId") == instance:
                return dict(found)
    raise SourceError(f"{url}: instance {instance} not found")


@dataclass
class _SnapshotSet:
    """One CreateSnapshots of an instance: volume → snapshot, and the volumes not yet claimed."""

    ready: anyio.Event = field(default_factory=anyio.Event)
    snapshots: dict[str, str] = field(default_factory=dict)
    unclaimed: set[str] = field(default_factory=set)
    #: disks reading from the set and not closed yet: it is shared only while one is
    holders: int = 0
    error: BaseException | None = None


class Ec2Disk(EbsDisk):
    """One EBS volume of an instance, read from the instance's snapshot set."""

    def __init__(self, url: str, region: str, instance: str, volume: str, settings: AwsSettings,
                 clients: AwsClients, plugin: Ec2SourcePlugin) -> None:
        super().__init__(url, region, volume, settings, clients)
        self.instance = instance
        self.plugin = plugin
        self.identity = {"region": region, "instance": instance, "volume": volume}
        self.metadata["kind"] = "ec2-volume"

    async def _create(self) -> str:
        return await self.plugin._claim(self)

    async def aclose(self) -> None:
        if not self._closed:
            try:
                if stale := self.plugin._release(self):
                    # snapshots of the set no disk claimed (their disks failed before reading)
                    with anyio.CancelScope(shield=True):
                        for snap in stale:
                            try:
                                await cleanup(self.clients, self.url, "", self.settings.chain, keep=None, only=snap)
                            except Exception as exc:  # the volume's next committed backup deletes it
                                log.warning("ec2_snapshot_not_deleted", snapshot=snap, error=str(exc))
            finally:
                await super().aclose()


class Ec2SourcePlugin:
    scheme = "ec2"

    def __init__(self) -> None:
        #: (region, instance, chain) → the snapshot set being claimed
        self._sets: dict[tuple[str, str, str], _SnapshotSet] = {}
        #: disk → the set it claimed its snapshot from
        self._held: dict[int, tuple[tuple[str, str, str], _SnapshotSet]] = {}

    def disk_name(self, url: str) -> str:
        _, instance, volume = parse_url(url)
        return volume or instance

    async def expand(self, url: str) -> list[str]:
        region, instance, volume = parse_url(url)
        if volume is not None:
            return [url]
        require_asyncio("ec2 source")
        async with AwsClients(region, load_settings({})) as clients:
            config = configuration(await describe_instance(clients, url, instance))
        volumes = sorted(config["volumes"].items(), key=lambda v: (v[1] or "", v[0]))
        if not volumes:
            raise SourceError(f"{url}: instance {instance} has no EBS volume")
        return [f"ec2://{region}/{instance}/{vol}" for vol, _ in volumes]

    async def open(self, url: str, options: Mapping[str, Any]) -> Ec2Disk:
        require_asyncio("ec2 source")
        region, instance, volume = parse_url(url)
        settings = load_settings(options)
        clients = await AwsClients(region, settings).__aenter__()
        try:
            config = configuration(await describe_instance(clients, url, instance))
            if volume is None:
                if len(config["volumes"]) != 1:
                    raise SourceError(f"{url}: instance {instance} has {len(config['volumes'])} volumes: name one "
                                      "(ec2://REGION/INSTANCE_ID/VOLUME_ID), or back the instance up as a job "
                                      "object, which expands it into one disk per volume")
                (volume,) = config["volumes"]
            elif volume not in config["volumes"]:
                raise SourceError(f"{url}: volume {volume} is not attached to instance {instance}")
            disk = Ec2Disk(url, region, instance, volume, settings, clients, self)
            disk.metadata["instance"] = config
            disk.metadata["device"] = config["volumes"][volume]
        except BaseException:
            with anyio.CancelScope(shield=True):
                await clients.__aexit__(None, None, None)
            raise
        try:
            await disk._open()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await disk.aclose()
            raise
        return disk

    async def _claim(self, disk: Ec2Disk) -> str:
        """``disk``'s snapshot from the instance's current set, taken now if there is none (or
        its volume was claimed from it already)."""
        key = (disk.region, disk.instance, disk.settings.chain)
        current = self._sets.get(key)
        if current is None or (current.ready.is_set() and disk.volume not in current.unclaimed):
            current = self._sets[key] = _SnapshotSet()
            try:
                await self._take(disk, current)
            except BaseException as exc:
                current.error = exc
                if self._sets.get(key) is current:
                    del self._sets[key]
                raise
            finally:
                current.ready.set()
        else:
            await current.ready.wait()
            if current.error is not None:
                raise SourceError(f"{disk.url}: the instance's snapshots could not be taken: {current.error}")
        assert disk.volume is not None
        current.unclaimed.discard(disk.volume)
        current.holders += 1
        self._held[id(disk)] = (key, current)
        snap = current.snapshots.get(disk.volume)
        if snap is None:
            raise SourceError(f"{disk.url}: CreateSnapshots took no snapshot of {disk.volume} (detached since?)")
        return snap

    def _release(self, disk: Ec2Disk) -> list[str]:
        """``disk`` is closed; the snapshots nobody will claim once the set is no longer shared."""
        held = self._held.pop(id(disk), None)
        if held is None:
            return []
        key, current = held
        current.holders -= 1
        if current.holders > 0:
            return []
        if self._sets.get(key) is current:
            del self._sets[key]
        stale = [current.snapshots[v] for v in sorted(current.unclaimed)]
        current.unclaimed.clear()
        return stale

    async def _take(self, disk: Ec2Disk, into: _SnapshotSet) -> None:
        ec2 = disk.clients.ec2
        tags = [{"Key": TAG, "Value": "1"}, {"Key": TAG_RUN, "Value": disk.run},
                {"Key": TAG_INSTANCE, "Value": disk.instance}, {"Key": TAG_CHAIN, "Value": disk.settings.chain}]
        got = await disk.clients.call(f"{disk.url}: CreateSnapshots", lambda: ec2.create_snapshots(
            InstanceSpecification={"InstanceId": disk.instance, "ExcludeBootVolume": False},
            Description=f"blockferry backup of {disk.instance} (run {disk.run})",
            TagSpecifications=[{"ResourceType": "snapshot", "Tags": tags}]))
        into.snapshots = {s["VolumeId"]: s["SnapshotId"] for s in got.get("Snapshots") or []}
        into.unclaimed = set(into.snapshots)
        log.info("ec2_snapshots_created", instance=disk.instance, run=disk.run, snapshots=into.snapshots)
