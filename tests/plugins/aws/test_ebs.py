"""The ``ebs`` source against moto's server (tests/plugins/aws/conftest.py names its departures
from AWS and the shims that correct them).

These tests run on **asyncio only**: the plugin is built on aiobotocore, which is asyncio-bound
(under trio it refuses to open with a ConfigError, tested below).

How moto stands in: a test writes real block contents either into a snapshot
(StartSnapshot / PutSnapshotBlock / CompleteSnapshot, then backs up ``ebs://REGION/snap-...``) or
into a volume (``Aws.write_volume``: moto keeps no volume data, so the
``volume_snapshots_hold_no_blocks`` shim makes the CreateSnapshot the plugin calls hold the
blocks written so far, as AWS's snapshot of the volume would).

The generic source conformance suite (tests/conformance.py) does not fit: its images are a few
MiB of arbitrary size and it reads them whole, byte-wise in places, while an EBS disk is a whole
number of GiB. The contract points it checks are tested here at EBS scale instead
(:class:`TestContract`).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import blockferry
import pytest
from blockferry.datapath.source import DISK_CAPABILITIES, PLUGIN_CAPABILITIES, ChangeTracking, SourceDisk, SourcePlugin
from blockferry.errors import ConfigError, SourceError
from blockferry.jobs.config import DiskSpec
from blockferry.jobs.messages import DiskResult, SessionResult
from blockferry.plugins.aws import EbsSourcePlugin
from blockferry.plugins.aws.ebs import EbsDisk, parse_url
from blockferry.repo.format import DiskRecord
from moto.core.exceptions import ServiceException
from moto.ebs.models import Block, EBSBackend
from moto.ec2.models import EC2Backend

from tests.plugins.aws.conftest import EBS_BLOCK, REGION, Aws, GiB, MiB
from tests.plugins.s3proxy import FaultProxy, Rule

pytestmark = pytest.mark.anyio
ZERO = bytes(EBS_BLOCK)


def blocks_of(seed: int, indexes: list[int]) -> dict[int, bytes]:
    rnd = random.Random(seed)
    return {i: rnd.randbytes(EBS_BLOCK) for i in indexes}


@pytest.fixture
def fetched(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, int]]]:
    """Every GetSnapshotBlock moto served: (snapshot, block index)."""
    calls: list[tuple[str, int]] = []
    get = EBSBackend.get_snapshot_block

    def counting(self: EBSBackend, snapshot_id: str, block_index: Any) -> Any:
        calls.append((snapshot_id, int(block_index)))
        return get(self, snapshot_id, block_index)

    monkeypatch.setattr(EBSBackend, "get_snapshot_block", counting)
    yield calls


async def backup(repo: str, aws: Aws, url: str, **options: Any) -> SessionResult:
    async with blockferry.open_repository(repo) as r:
        return await r.backup([DiskSpec(source=url, name="root", options={**aws.options, **options})], name="vm",
                              retries=0)


def disk_result(session: SessionResult) -> DiskResult:
    (obj,) = session.objects
    (d,) = obj.disks
    return d


async def restored_matches(repo: str, tmp_path: Path, point: str, size: int, blocks: Mapping[int, bytes]) -> None:
    """The point's disk restores to ``size`` bytes: ``blocks`` where written, zeros elsewhere."""
    out = tmp_path / f"restore-{point}"
    async with blockferry.open_repository(repo) as r:
        await r.restore(point, out)
    path = out / "root"
    assert path.stat().st_size == size
    with open(path, "rb") as f:
        for i in range(size // EBS_BLOCK):
            assert f.read(EBS_BLOCK) == blocks.get(i, ZERO), f"block {i} differs"


@pytest.fixture
async def repo(tmp_path: Path) -> str:
    url = str(tmp_path / "repo")
    await blockferry.init_repository(url)
    return url


# -- backups through the embedded API ------------------------------------------------------------


async def test_full_backup_of_a_snapshot_restores_bit_exact(aws: Aws, repo: str, tmp_path: Path,
                                                            fetched: list[tuple[str, int]]) -> None:
    blocks = blocks_of(1, [0, 1, 2, 100, 1000, 2047])
    blocks[7] = ZERO  # a block written with zeros: listed, read, stored as a hole
    snap = aws.write_snapshot(1, blocks)
    session = await backup(repo, aws, f"ebs://{REGION}/{snap}")
    assert session.state == "success", session
    d = disk_result(session)
    assert d.plan.startswith("full"), d.plan
    # only written blocks are read: 1 MiB repository blocks 0, 1, 3 (EBS 7), 50, 500, 1023
    assert d.stats.read_bytes == 6 * MiB
    assert sorted(i for s, i in fetched if s == snap) == sorted(blocks)  # holes never fetched
    assert d.stats.zero_bytes >= GiB - 6 * MiB
    await restored_matches(repo, tmp_path, "latest", GiB, blocks)
    async with blockferry.open_repository(repo) as r:
        m = await r.point("latest")
    rec = m.disks[0]
    assert rec.change_id == f"ebs:{snap}"
    assert rec.identity == {"region": REGION, "snapshot": snap}
    assert rec.metadata["created_by_blockferry"] is False and rec.metadata["ebs_block_size"] == EBS_BLOCK
    assert aws.exists(snap)  # a snapshot blockferry did not take is never deleted


async def test_incremental_of_a_volume_reads_only_changed_blocks(aws: Aws, repo: str, tmp_path: Path,
                                                                 fetched: list[tuple[str, int]]) -> None:
    v1 = blocks_of(2, [0, 1, 10, 11, 600, 2047])
    vol = aws.create_volume(1, v1)
    url = f"ebs://{REGION}/{vol}"
    first = await backup(repo, aws, url)
    assert first.state == "success", first
    assert disk_result(first).plan.startswith("full read: no earlier point"), disk_result(first).plan
    (snap1,) = aws.snapshots_of(vol)
    fetched.clear()

    changes = blocks_of(3, [1, 300, 301])  # one block rewritten, two written anew
    aws.write_volume(vol, changes)
    v2 = {**v1, **changes}
    second = await backup(repo, aws, url)
    assert second.state == "success", second
    d = disk_result(second)
    assert "ListChangedBlocks from " + snap1 in d.plan and "3 blocks changed" in d.plan, d.plan
    # the changed EBS blocks lie in 1 MiB repository blocks 0 (EBS 0, 1) and 150 (EBS 300, 301)
    assert d.stats.read_bytes == 2 * MiB
    assert d.stats.unchanged_bytes > 0
    (snap2,) = aws.snapshots_of(vol)  # the base of the first point is deleted, the new one kept
    assert snap2 != snap1
    assert sorted(i for s, i in fetched) == [0, 1, 300, 301] and {s for s, _ in fetched} == {snap2}
    async with blockferry.open_repository(repo) as r:
        points = await r.points()
        latest = await r.point("latest")
    assert latest.disks[0].change_id == f"ebs:{snap2}" and latest.disks[0].metadata["base_snapshot"] == snap1
    assert latest.disks[0].identity == {"region": REGION, "volume": vol}
    await restored_matches(repo, tmp_path, "latest", GiB, v2)
    older = next(p.id for p in points if p.id != latest.id)
    await restored_matches(repo, tmp_path, older, GiB, v1)


async def test_missing_base_snapshot_means_a_full_read_with_the_reason(aws: Aws, repo: str, tmp_path: Path,
                                                                       fetched: list[tuple[str, int]]) -> None:
    v1 = blocks_of(4, [0, 5, 9])
    vol = aws.create_volume(1, v1)
    url = f"ebs://{REGION}/{vol}"
    assert (await backup(repo, aws, url)).state == "success"
    (snap1,) = aws.snapshots_of(vol)
    aws.ec2.delete_snapshot(SnapshotId=snap1)  # deleted outside blockferry
    aws.write_volume(vol, blocks_of(5, [5]))
    v2 = {**v1, **blocks_of(5, [5])}
    fetched.clear()
    second = await backup(repo, aws, url)
    assert second.state == "success", second
    d = disk_result(second)
    assert d.plan.startswith("full read") and f"snapshot {snap1} is gone" in d.plan, d.plan
    assert sorted(i for _, i in fetched) == [0, 5, 9]  # every written block, not only the changed one
    await restored_matches(repo, tmp_path, "latest", GiB, v2)


async def test_a_failed_read_deletes_its_snapshot_and_keeps_the_base(aws: Aws, repo: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    v1 = blocks_of(6, [0, 3])
    vol = aws.create_volume(1, v1)
    url = f"ebs://{REGION}/{vol}"
    assert (await backup(repo, aws, url)).state == "success"
    (base,) = aws.snapshots_of(vol)
    aws.write_volume(vol, blocks_of(7, [3]))

    get = EBSBackend.get_snapshot_block

    def damaged(self: EBSBackend, snapshot_id: str, block_index: Any) -> Any:
        block = get(self, snapshot_id, block_index)  # what AWS would never send: damaged in transit
        return Block(block.block_data, "AAAA" + block.checksum[4:], block.checksum_algorithm, block.data_length)

    monkeypatch.setattr(EBSBackend, "get_snapshot_block", damaged)
    failed = await backup(repo, aws, url, retries=1)
    assert failed.state == "failed"
    assert "does not match its SHA256 checksum" in (failed.objects[0].error or ""), failed.objects[0].error
    assert not failed.warnings, failed.warnings
    assert aws.snapshots_of(vol) == [base]  # the failed run's snapshot is gone, the base stays
    monkeypatch.setattr(EBSBackend, "get_snapshot_block", get)

    again = await backup(repo, aws, url)
    assert again.state == "success"
    assert f"ListChangedBlocks from {base}" in disk_result(again).plan
    await restored_matches(repo, tmp_path, "latest", GiB, {**v1, **blocks_of(7, [3])})


async def test_a_cancelled_read_deletes_its_snapshot(aws: Aws, repo: str, monkeypatch: pytest.MonkeyPatch) -> None:
    vol = aws.create_volume(1, blocks_of(8, [0, 1]))
    entered = anyio.Event()

    async def held(self: EbsDisk, index: int, token: str | None, *, whole: bool) -> bytes | None:
        entered.set()
        await anyio.sleep_forever()  # a block that never arrives (until the backup is cancelled)
        raise AssertionError("unreachable")

    monkeypatch.setattr(EbsDisk, "_block", held)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(backup, repo, aws, f"ebs://{REGION}/{vol}")
            await entered.wait()  # the read has begun
            assert len(aws.snapshots_of(vol)) == 1
            tg.cancel_scope.cancel()
    assert aws.snapshots_of(vol) == []


async def test_a_committed_backup_removes_snapshots_left_by_dead_runs_of_its_chain(aws: Aws, repo: str) -> None:
    vol = aws.create_volume(1, blocks_of(9, [0]))
    url = f"ebs://{REGION}/{vol}"
    plugin = EbsSourcePlugin()
    stray = await plugin.open(url, aws.options)  # a run that died: never finished
    assert aws.snapshots_of(vol) == []  # opening alone takes no snapshot (a preflight's open)
    assert await stray.data_extents() == [(0, EBS_BLOCK)]
    await stray.aclose()
    other = await plugin.open(url, {**aws.options, "chain": "other-repo"})
    await other.data_extents()
    await other.aclose()
    assert len(aws.snapshots_of(vol)) == 2
    assert (await backup(repo, aws, url)).state == "success"
    kept = aws.snapshots_of(vol)
    assert stray.snapshot not in kept and other.snapshot in kept and len(kept) == 2  # another chain's stays
    await other.finish(False)
    assert other.snapshot not in aws.snapshots_of(vol)


@pytest.fixture
def pending_snapshots(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """EC2 snapshots are ``pending`` for their first looks, as AWS's are (moto's are completed at
    once), then end in ``state["end"]`` (completed or error)."""
    state: dict[str, Any] = {"looks": 0, "end": "completed"}
    create, describe = EC2Backend.create_snapshot, EC2Backend.describe_snapshots

    def pending(self: EC2Backend, *args: Any, **kwargs: Any) -> Any:
        snap = create(self, *args, **kwargs)
        snap.status = "pending"
        return snap

    def looked_at(self: EC2Backend, snapshot_ids: Any = None, filters: Any = None) -> Any:
        found = describe(self, snapshot_ids, filters)
        for snap in found:
            if snap.status == "pending":
                state["looks"] += 1
                if state["looks"] >= 3:
                    snap.status = state["end"]
        return found

    monkeypatch.setattr(EC2Backend, "create_snapshot", pending)
    monkeypatch.setattr(EC2Backend, "describe_snapshots", looked_at)
    return state


async def test_a_new_snapshot_is_waited_for_until_completed(aws: Aws, pending_snapshots: dict[str, Any]) -> None:
    blocks = blocks_of(14, [3])
    vol = aws.create_volume(1, blocks)
    disk = await EbsSourcePlugin().open(f"ebs://{REGION}/{vol}", aws.options)
    try:
        assert await disk.data_extents() == [(3 * EBS_BLOCK, EBS_BLOCK)]
        assert pending_snapshots["looks"] == 3  # pending twice, then completed
        buf = bytearray(EBS_BLOCK)
        assert await disk.read_into(3 * EBS_BLOCK, [buf]) == EBS_BLOCK and buf == blocks[3]
    finally:
        await disk.aclose()
        await disk.finish(False)
    assert aws.snapshots_of(vol) == []


async def test_a_snapshot_that_fails_is_deleted_at_once(aws: Aws, pending_snapshots: dict[str, Any]) -> None:
    pending_snapshots["end"] = "error"
    vol = aws.create_volume(1, blocks_of(15, [0]))
    disk = await EbsSourcePlugin().open(f"ebs://{REGION}/{vol}", aws.options)
    try:
        with pytest.raises(SourceError, match=f"snapshot snap-[0-9a-f]+ of {vol} failed"):
            await disk.data_extents()
        assert aws.snapshots_of(vol) == []
    finally:
        await disk.aclose()


async def test_changed_blocks_that_cannot_be_listed_drop_the_new_snapshot(aws: Aws, repo: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The source mover learns of ``finish`` only once ``changed_extents`` returned: when it
    raises, the disk drops its snapshot itself."""
    vol = aws.create_volume(1, blocks_of(16, [0]))
    url = f"ebs://{REGION}/{vol}"
    assert (await backup(repo, aws, url)).state == "success"
    (base,) = aws.snapshots_of(vol)

    def unavailable(self: EBSBackend, first_snapshot_id: str, second_snapshot_id: str) -> Any:
        raise ServiceException("InternalServerException", "try again later")

    monkeypatch.setattr(EBSBackend, "list_changed_blocks", unavailable)
    failed = await backup(repo, aws, url, retries=0)
    assert failed.state == "failed" and "InternalServerException" in (failed.objects[0].error or "")
    assert aws.snapshots_of(vol) == [base]


async def test_throttled_requests_are_retried_and_counted(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = blocks_of(11, [0, 1])
    snap = aws.write_snapshot(1, blocks)
    get, refused = EBSBackend.get_snapshot_block, []

    def throttled(self: EBSBackend, snapshot_id: str, block_index: Any) -> Any:
        if len(refused) < 3:  # AWS's answer to too many requests (HTTP 400, EBS's error shape)
            refused.append(int(block_index))
            raise ServiceException("RequestThrottledException", "Rate exceeded")
        return get(self, snapshot_id, block_index)

    monkeypatch.setattr(EBSBackend, "get_snapshot_block", throttled)
    disk = await EbsSourcePlugin().open(f"ebs://{REGION}/{snap}", aws.options)
    try:
        buf = bytearray(2 * EBS_BLOCK)
        assert await disk.read_into(0, [buf]) == len(buf)
        assert buf == blocks[0] + blocks[1]
        assert len(refused) == 3 and disk.clients.retried == 3
    finally:
        await disk.aclose()
    # once the retries are spent, the read fails with an engine error a later attempt may cure
    refused.clear()
    disk = await EbsSourcePlugin().open(f"ebs://{REGION}/{snap}", {**aws.options, "retries": 1})
    try:
        with pytest.raises(SourceError, match="RequestThrottledException") as info:
            await disk.read_into(0, [bytearray(EBS_BLOCK)])
        assert info.value.transient
    finally:
        await disk.aclose()


async def test_503_answers_and_dropped_connections_are_retried(aws: Aws, repo: str, tmp_path: Path) -> None:
    """moto behind the fault-injecting HTTP proxy of the s3 tests: GetSnapshotBlock answered 503
    twice and its connection dropped once, ListSnapshotBlocks answered 503 once; the backup
    succeeds, bit-exact."""
    blocks = blocks_of(17, [0, 1, 2, 3, 40])
    snap = aws.write_snapshot(1, blocks)
    proxy = FaultProxy(upstream=aws.endpoint)
    proxy.start()
    try:
        got_block = proxy.add(Rule(lambda op, path: "/blocks/" in path, "slowdown", times=2))
        dropped = proxy.add(Rule(lambda op, path: "/blocks/" in path, "drop", times=1))
        listed = proxy.add(Rule(lambda op, path: path.endswith("/blocks"), "slowdown", times=1))
        async with blockferry.open_repository(repo) as r:
            session = await r.backup([DiskSpec(source=f"ebs://{REGION}/{snap}", name="root",
                                               options={**aws.options, "endpoint_url": proxy.endpoint})],
                                     name="vm", retries=0)
        assert session.state == "success", session
        assert (got_block.fired, dropped.fired, listed.fired) == (2, 1, 1)
    finally:
        proxy.stop()
    await restored_matches(repo, tmp_path, "latest", GiB, blocks)


async def test_blocks_in_flight_are_many_and_bounded(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    """All the EBS blocks of one read are fetched at once, at most ``max_requests`` of them."""
    blocks = blocks_of(12, list(range(16)))
    snap = aws.write_snapshot(1, blocks)
    get, lock = EBSBackend.get_snapshot_block, threading.Condition()
    state = {"now": 0, "most": 0}

    def gathered(self: EBSBackend, snapshot_id: str, block_index: Any) -> Any:
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
            lock.notify_all()
            # hold each request until 3 are in flight (not forever: the last ones come fewer)
            lock.wait_for(lambda: state["most"] >= 3, timeout=10)
        try:
            return get(self, snapshot_id, block_index)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(EBSBackend, "get_snapshot_block", gathered)
    disk = await EbsSourcePlugin().open(f"ebs://{REGION}/{snap}", {**aws.options, "max_requests": 3})
    try:
        buf = bytearray(16 * EBS_BLOCK)
        assert await disk.read_into(0, [buf]) == len(buf)
        assert buf == b"".join(blocks[i] for i in range(16))
    finally:
        await disk.aclose()
    assert state["most"] == 3


# -- the source contract at EBS scale ------------------------------------------------------------


class TestContract:
    @pytest.fixture
    def blocks(self) -> dict[int, bytes]:
        return blocks_of(10, [0, 1, 4, 2047])

    @pytest.fixture
    async def disk(self, aws: Aws, blocks: dict[int, bytes]) -> Any:
        snap = aws.write_snapshot(1, blocks)
        disk = await EbsSourcePlugin().open(f"ebs://{REGION}/{snap}", aws.options)
        yield disk
        await disk.aclose()

    def image(self, blocks: Mapping[int, bytes], offset: int, length: int) -> bytes:
        out = bytearray()
        for i in range(offset // EBS_BLOCK, (offset + length - 1) // EBS_BLOCK + 1):
            out += blocks.get(i, ZERO)
        start = offset - offset // EBS_BLOCK * EBS_BLOCK
        return bytes(out[start:start + length])

    async def test_attributes_and_capabilities(self, disk: EbsDisk) -> None:
        plugin = EbsSourcePlugin()
        assert isinstance(plugin, SourcePlugin) and isinstance(disk, SourceDisk)
        assert disk.size == GiB and disk.name == plugin.disk_name(disk.url) == disk.snapshot
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in disk.identity.items())
        offered = {c for c in PLUGIN_CAPABILITIES if isinstance(plugin, c)}
        offered |= {c for c in DISK_CAPABILITIES if isinstance(disk, c)}
        assert offered == {ChangeTracking}  # network reads: no ReadsBlocking, no MapsBlocking

    @pytest.mark.parametrize("offset,sizes", [
        (0, [EBS_BLOCK]), (1, [4095]), (EBS_BLOCK - 3, [7]), (100, [EBS_BLOCK, 3, 2 * EBS_BLOCK]),
        (3 * EBS_BLOCK + 5, [EBS_BLOCK]), (GiB - EBS_BLOCK - 7, [10, EBS_BLOCK - 3]),
    ])
    async def test_read_at_any_offset_into_several_buffers(self, disk: EbsDisk, blocks: dict[int, bytes],
                                                           offset: int, sizes: list[int]) -> None:
        bufs = [bytearray(b"\xaa" * n) for n in sizes]
        assert await disk.read_into(offset, bufs) == sum(sizes)
        assert b"".join(bufs) == self.image(blocks, offset, sum(sizes))

    async def test_short_read_only_at_the_end(self, disk: EbsDisk, blocks: dict[int, bytes]) -> None:
        a, b = bytearray(b"\xaa" * 100), bytearray(b"\xaa" * EBS_BLOCK)
        assert await disk.read_into(GiB - 100, [a, b]) == 100
        assert a == blocks[2047][-100:] and b == b"\xaa" * EBS_BLOCK
        assert await disk.read_into(GiB, [bytearray(10)]) == 0

    async def test_concurrent_reads(self, disk: EbsDisk, blocks: dict[int, bytes]) -> None:
        got: dict[int, bytes] = {}

        async def reader(off: int) -> None:
            buf = bytearray(EBS_BLOCK + 1000)
            assert await disk.read_into(off, [buf]) == len(buf)
            got[off] = bytes(buf)

        offsets = [0, 1000, EBS_BLOCK // 2, 4 * EBS_BLOCK - 500, GiB - 2 * EBS_BLOCK]
        async with anyio.create_task_group() as tg:
            for off in offsets:
                tg.start_soon(reader, off)
        for off in offsets:
            assert got[off] == self.image(blocks, off, EBS_BLOCK + 1000), off

    async def test_a_block_read_in_parts_is_fetched_once(self, disk: EbsDisk, blocks: dict[int, bytes],
                                                          fetched: list[tuple[str, int]]) -> None:
        """A repository block smaller than EBS's: the halves of one EBS block cost one request."""
        half = EBS_BLOCK // 2
        a, b = bytearray(half), bytearray(half)
        assert await disk.read_into(4 * EBS_BLOCK, [a]) == half
        assert await disk.read_into(4 * EBS_BLOCK + half, [b]) == half
        assert a + b == blocks[4]
        assert [i for _, i in fetched] == [4]

    async def test_data_extents_are_the_written_blocks(self, disk: EbsDisk) -> None:
        assert await disk.data_extents() == [(0, 2 * EBS_BLOCK), (4 * EBS_BLOCK, EBS_BLOCK),
                                             (GiB - EBS_BLOCK, EBS_BLOCK)]

    async def test_change_tracking_without_a_base_of_its_own(self, disk: EbsDisk) -> None:
        for change_id in (None, "elsewhere:0123456789ab", "ebs:vol-0123456789abcdef0", "ebs:snap-0000000000000000f"):
            base = DiskRecord(name=disk.name, size=disk.size, source=disk.url, change_id=change_id)
            extents, why = await disk.changed_extents(base)
            assert extents is None and why, change_id
        base = DiskRecord(name=disk.name, size=disk.size, source=disk.url, change_id=disk.change_id)
        assert (await disk.changed_extents(base))[0] == []  # the same snapshot: nothing changed
        await disk.finish(True)  # a snapshot it did not take: nothing to do
        assert disk.metadata["kind"] == "ebs-snapshot"

    @pytest.mark.parametrize("missing", ["snap-0123456789abcdef0", "vol-0123456789abcdef0"])
    async def test_open_missing_source(self, aws: Aws, missing: str) -> None:
        with pytest.raises(SourceError, match=missing):
            await EbsSourcePlugin().open(f"ebs://{REGION}/{missing}", aws.options)

    @pytest.mark.parametrize("url", ["ebs://eu-west-1/", "ebs://EU/snap-0123456789abcdef0", "ebs://eu-west-1/ami-01234567",
                                     "ebs://eu-west-1/snap-0123456789abcdef0?x=1", "s3://eu-west-1/snap-01234567"])
    async def test_bad_urls(self, url: str) -> None:
        with pytest.raises(SourceError, match="ebs://REGION|region|not an EBS"):
            parse_url(url)

    async def test_bad_settings(self, aws: Aws) -> None:
        with pytest.raises(ConfigError, match="max_requests"):
            await EbsSourcePlugin().open(f"ebs://{REGION}/snap-0123456789abcdef0", {**aws.options, "max_requests": 0})

    async def test_no_credentials_is_a_config_error_without_secrets(self, aws: Aws,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(name)
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        with pytest.raises(ConfigError, match="no AWS credentials"):
            await EbsSourcePlugin().open(f"ebs://{REGION}/snap-0123456789abcdef0", aws.options)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_refuses_to_run_on_trio_with_a_clear_error(anyio_backend: str) -> None:
    with pytest.raises(ConfigError, match="asyncio only"):
        await EbsSourcePlugin().open(f"ebs://{REGION}/snap-0123456789abcdef0", {})


# -- the CLI -------------------------------------------------------------------------------------


def cli(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blockferry", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_backup_of_an_ebs_snapshot(aws: Aws, tmp_path: Path) -> None:
    """The CLI backs up an ``ebs://`` URL, its settings from the environment; without credentials
    it exits 2 with a clear message (never a traceback, never a secret)."""
    blocks = blocks_of(13, [0, 9])
    snap = aws.write_snapshot(1, blocks)
    repo = str(tmp_path / "repo")
    env = {**os.environ, "BLOCKFERRY_AWS_ENDPOINT_URL": aws.endpoint}
    assert cli("init", repo, env=env).returncode == 0
    done = cli("backup", "-q", "--json", repo, f"ebs://{REGION}/{snap}", env=env)
    assert done.returncode == 0, done.stderr
    assert '"state":"success"' in done.stdout.replace(" ", ""), done.stdout
    out = tmp_path / "out"
    assert cli("restore", "-q", "--to", str(out), repo, "latest", env=env).returncode == 0
    with open(out / snap, "rb") as f:
        assert f.read(EBS_BLOCK) == blocks[0]
        f.seek(9 * EBS_BLOCK)
        assert f.read(EBS_BLOCK) == blocks[9]

    bare = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}
    bare["AWS_EC2_METADATA_DISABLED"] = "true"
    refused = cli("backup", "-q", repo, f"ebs://{REGION}/{snap}", env=bare)
    assert refused.returncode == 2, (refused.returncode, refused.stderr)
    assert "no AWS credentials" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    assert "testing" not in refused.stderr + refused.stdout  # the (test) secret is never shown
