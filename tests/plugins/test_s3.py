"""The ``s3`` backend against a real S3 server: radosgw from Debian's Ceph packages on loopback,
started once per session (tests/plugins/rgw.py). These tests run on **asyncio only**: the backend
is built on aiobotocore, which is asyncio-bound (under trio it refuses to open, tested below).

Faults (503 SlowDown, slow answers, dropped connections, archived objects) come from a small
HTTP proxy in front of radosgw (:class:`FaultProxy`): real HTTP both ways, nothing mocked.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import random
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.to_thread
import blockferry
import pytest
from blockferry.errors import BlockferryError, ConfigError, CorruptionError, ImmutableError
from blockferry.plugins.s3 import S3Backend, S3BackendPlugin, _retryable, load_settings, parse_url
from blockferry.repo.backend import AbortsUploads, PreparesRead, Protects, ReadsInto, Retention, StorageClasses
from blockferry.repo.retention import RetentionPolicy
from blockferry.runtime.settings import EngineSettings
from botocore.exceptions import ClientError, EndpointConnectionError

from tests.conformance import BackendConformance
from tests.conftest import KiB, MiB, mixed_disk, same_file, write_disk
from tests.plugins.rgw import RadosGW
from tests.plugins.s3proxy import FaultProxy, Rule

pytestmark = pytest.mark.anyio

PLAIN_BUCKET = "bf-plain"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore is asyncio-only


@pytest.fixture
def s3_env(rgw: RadosGW, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Only the standard AWS variables (and a cache directory of this test)."""
    for k in list(os.environ):
        if k.startswith(("AWS_", "BLOCKFERRY_S3_")):
            monkeypatch.delenv(k)
    env = rgw.env() | {"BLOCKFERRY_CACHE_DIR": str(tmp_path / "cache"), "AWS_CONFIG_FILE": "/dev/null",
                       "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def new_url(bucket: str = PLAIN_BUCKET) -> str:
    return f"s3://{bucket}/t-{uuid.uuid4().hex[:12]}"


async def open_s3(url: str, **options: object) -> S3Backend:
    return await S3BackendPlugin().open(url, {"create_bucket": True, **options})


class TestS3Backend(BackendConformance):
    @pytest.fixture
    async def backend(self, s3_env: dict[str, str]) -> AsyncIterator[S3Backend]:
        # small parts and threshold so that the suite's uploads exercise multipart too
        b = await open_s3(new_url(), multipart_threshold=6 << 20, part_size=5 << 20, upload_parallel=2)
        yield b
        await b.aclose()

    @pytest.fixture
    def declared_capabilities(self) -> set[type]:
        return {Protects, Retention, AbortsUploads, PreparesRead, StorageClasses, ReadsInto}


# -- helpers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def proxy(rgw: RadosGW) -> Iterator[FaultProxy]:
    p = FaultProxy(rgw.endpoint)
    p.start()
    yield p
    p.stop()


@pytest.fixture
def fault(proxy: FaultProxy) -> Iterator[FaultProxy]:
    """The proxy, clean for this test."""
    proxy.reset()
    yield proxy
    proxy.release()
    proxy.reset()


def cli(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The blockferry CLI in a fresh process, with only the environment given (plus PATH)."""
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
    p = subprocess.run([sys.executable, "-m", "blockferry", *args], capture_output=True, text=True,
                       env=base | (env or {}), timeout=120)
    if check:
        assert p.returncode == 0, f"blockferry {' '.join(args)} failed ({p.returncode}): {p.stderr}"
    return p


@contextlib.asynccontextmanager
async def raw_client(env: dict[str, str], endpoint: str | None = None) -> AsyncIterator[Any]:
    """A plain aiobotocore client, to look at the bucket behind blockferry's back."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    async with get_session().create_client(
            "s3", endpoint_url=endpoint or env["AWS_ENDPOINT_URL"], region_name="default",
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            config=AioConfig(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                             response_checksum_validation="when_required")) as c:
        yield c


async def keys(c: Any, url: str) -> dict[str, int]:
    bucket, prefix = parse_url(url)
    out = {}
    async for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"][len(prefix):]] = o["Size"]
    return out


async def incomplete(c: Any, url: str) -> list[str]:
    bucket, prefix = parse_url(url)
    page = await c.list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    return [u["Key"][len(prefix):] for u in page.get("Uploads", [])]


def modify(img: Path, offset: int, n: int, seed: int) -> None:
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(random.Random(seed).randbytes(n))


# -- end to end --------------------------------------------------------------------------------------


async def test_cli_backup_incremental_restore_bit_exact_with_only_aws_env(s3_env: dict[str, str], tmp_path: Path) -> None:
    url = new_url()
    img = mixed_disk(tmp_path / "disk0.img", 8 * MiB, seed=11)
    env = dict(s3_env)
    out = cli("init", url, "--create-bucket", "--block-size", "256KiB", env=env)
    assert "created repository" in out.stdout
    full = cli("-vv", "backup", url, str(img), "--name", "vm", "-q", "--json", env=env)
    modify(img, 3 * MiB, 300 * KiB, seed=12)
    saved = tmp_path / "v1.img"
    shutil.copy(img, saved)
    incr = cli("-vv", "--log-json", "backup", url, str(img), "--name", "vm", "-q", "--json", env=env)
    first, second = (json.loads(p.stdout)["objects"][0]["point"] for p in (full, incr))
    points = json.loads(cli("points", url, "--json", env=env).stdout)
    assert [p["id"] for p in points] == [first, second]
    # the incremental stored only what changed (two 256 KiB blocks)
    assert json.loads(incr.stdout)["stats"]["new_bytes"] <= 512 * KiB
    cli("restore", url, "latest", "--to", str(tmp_path / "r2"), "-q", env=env)
    assert same_file(tmp_path / "r2" / "disk0.img", saved)
    cli("restore", url, first[:8], "--to", str(tmp_path / "r1"), "-q", env=env)
    assert not same_file(tmp_path / "r1" / "disk0.img", saved)
    assert cli("verify", url, "-q", env=env).returncode == 0
    # secrets never reach the output, even at debug level
    for p in (full, incr):
        assert s3_env["AWS_SECRET_ACCESS_KEY"] not in p.stdout + p.stderr
        assert "s3_opened" in p.stderr or "s3" in p.stderr  # debug logging did run
    # a wrong secret: a clear error, and the secret is not in it either
    bad = cli("points", url, env=env | {"AWS_SECRET_ACCESS_KEY": "wrong-secret-XYZ"}, check=False)
    assert bad.returncode != 0 and "access denied" in bad.stderr and "wrong-secret-XYZ" not in bad.stderr
    missing = cli("points", "s3://bf-no-such-bucket/x", env=env, check=False)
    assert missing.returncode != 0 and "does not exist" in missing.stderr


async def test_api_multipart_packs_and_ranged_reads(s3_env: dict[str, str], tmp_path: Path) -> None:
    url = new_url()
    opts = {"multipart_threshold": 6 * MiB, "part_size": 5 * MiB, "upload_parallel": 3}
    await blockferry.init_repository(url, block_size=MiB, compression="none", pack_size=24 * MiB,
                                     backend_options={"create_bucket": True})
    img = write_disk(tmp_path / "big.img", 40 * MiB, [(0, "random", 40 * MiB)], seed=5)
    async with blockferry.open_repository(url, backend_options=opts) as r:
        s = await r.backup([str(img)], name="big")
        b = r.store.backend
        assert isinstance(b, S3Backend)
        # 40 MiB of incompressible blocks in 24 MiB packs: one pack in 5 parts, sent 3 at a time
        assert b.requests["UploadPart"] >= 5 and b.requests["CompleteMultipartUpload"] >= 1
        before = b.fetched["packs"]
        await r.restore(s.points[0], tmp_path / "out")
        # a restore reads each pack's needed span once (planned over the point), not per batch
        assert b.fetched["packs"] - before == 2
    assert same_file(tmp_path / "out" / "big.img", img)
    async with raw_client(s3_env) as c:
        assert await incomplete(c, url) == []
        packs = {k: n for k, n in (await keys(c, url)).items() if k.startswith("packs/")}
        assert len(packs) == 2 and max(packs.values()) > 24 * MiB



async def test_a_pack_gone_from_the_bucket_is_zeroed_with_allow_damaged_and_the_rest_restores(
        s3_env: dict[str, str], tmp_path: Path) -> None:
    url = new_url()
    await blockferry.init_repository(url, block_size=MiB, compression="none", pack_size=8 * MiB,
                                     backend_options={"create_bucket": True})
    img = write_disk(tmp_path / "vda.img", 24 * MiB, [(0, "random", 24 * MiB)], seed=7)
    data = img.read_bytes()
    async with blockferry.open_repository(url) as r:
        s = await r.backup([str(img)], name="vm")
        disk = (await r.point(s.points[0])).disks[0]
        packs = [(r.store.locate(disk.blocks[i * 32:(i + 1) * 32]) or ("?",))[0] for i in range(24)]
        gone = packs[len(packs) // 2]
        await r.store.backend.delete(gone)
        with pytest.raises(CorruptionError):
            await r.restore(s.points[0], tmp_path / "strict")
        (result,) = await r.restore(s.points[0], tmp_path / "out", allow_damaged=True)
    lost = [i for i, p in enumerate(packs) if p == gone]
    assert lost and len(lost) < 24
    expect = b"".join(bytes(MiB) if i in lost else data[i * MiB:(i + 1) * MiB] for i in range(24))
    assert (tmp_path / "out" / "vda.img").read_bytes() == expect
    assert sum(n for _, n in result.damaged_ranges) == len(lost) * MiB


async def test_a_pack_is_hashed_as_it_is_written_so_its_put_goes_out_at_once(
        s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The Content-MD5 of a pack sent as one PutObject is computed while the pack fills, not
    at commit; the server checks it, so a wrong running hash would fail the put."""
    import blockferry.plugins.s3 as s3mod

    hashed_at_commit: list[int] = []
    whole = s3mod._md5
    monkeypatch.setattr(s3mod, "_md5", lambda pieces: hashed_at_commit.append(sum(map(len, pieces))) or whole(pieces))
    b = await open_s3(new_url())
    try:
        rng = random.Random(3)
        pieces = [rng.randbytes(MiB), rng.randbytes(1000), rng.randbytes(3 * MiB), bytearray(rng.randbytes(700 * KiB))]
        up = await b.open_upload("packs/aa/hashed")
        for p in pieces:
            await up.write([p])
        await up.commit()
        assert hashed_at_commit == []
        assert await b.get("packs/aa/hashed") == b"".join(pieces)
        # past the multipart threshold the running hash is dropped: each part carries its own
        b.settings.multipart_threshold, b.settings.part_size = 5 * MiB, 5 * MiB
        up = await b.open_upload("packs/aa/parts")
        for p in pieces * 2:
            await up.write([p])
        await up.commit()
        assert hashed_at_commit and sum(hashed_at_commit) == 2 * sum(map(len, pieces))
        assert await b.get("packs/aa/parts") == b"".join(pieces * 2)
    finally:
        await b.aclose()


async def test_an_incremental_with_hints_compresses_while_the_repository_opens(s3_env: dict[str, str], tmp_path: Path) -> None:
    """engine/datapath/prepare.py: the hinted blocks are compressed while the S3 repository opens, and
    the backup stores those chunks instead of compressing again: same point, bit-exact."""
    url = new_url()
    await blockferry.init_repository(url, backend_options={"create_bucket": True})  # default settings
    img = mixed_disk(tmp_path / "d.img", 16 * MiB, seed=21)
    async with blockferry.open_repository(url) as r:
        await r.backup([str(img)], name="vm")
    modify(img, 0, 3 * MiB, seed=22)  # random over text: three changed blocks
    with open(img, "r+b") as f:  # and two of new text
        f.seek(9 * MiB)
        f.write(b"a changed line of text that compresses\n" * (2 * MiB // 40))
    hints = tmp_path / "d.hints"
    hints.write_text(f"0 {3 * MiB}\n{9 * MiB} {2 * MiB}\n")
    saved = tmp_path / "v1.img"
    shutil.copy(img, saved)
    async with blockferry.open_repository(url, prepare={str(img): str(hints)}) as r:
        prepared = r.store.index.prepared
        assert prepared is not None
        with anyio.fail_after(30):  # preparing overlaps the opening; here it may still be running
            while prepared.prepared < 5:
                await anyio.sleep(0.01)
        assert len(prepared) == 5 and prepared.held > 0
        s = await r.backup([str(img)], name="vm", hints={str(img): str(hints)})
        assert prepared.used == 5 and prepared.stopped and r.store.index.prepared is None
        assert s.objects[0].disks[0].stats.new_bytes == 5 * MiB
        await r.restore(s.points[0], tmp_path / "out")
    assert same_file(tmp_path / "out" / "d.img", saved)
    # a repository with other settings than the defaults prepares for nothing
    other = new_url()
    await blockferry.init_repository(other, compression="fast", backend_options={"create_bucket": True})
    async with blockferry.open_repository(other, prepare={str(img): str(hints)}) as r:
        assert r.store.index.prepared is None


async def test_tasks_share_packs_so_they_fill_and_go_out_while_reading(s3_env: dict[str, str], tmp_path: Path) -> None:
    """Four disks backed up at once into S3 fill one pack stream together (engine/repo/store.py
    WriterHandle): full packs, not one part-filled pack per disk, and each disk still counts
    its own bytes."""
    url = new_url()
    await blockferry.init_repository(url, block_size=256 * KiB, compression="none", pack_size=4 * MiB,
                                     backend_options={"create_bucket": True})
    imgs = [write_disk(tmp_path / f"d{i}.img", 3 * MiB, [(0, "random", 3 * MiB)], seed=40 + i) for i in range(4)]
    # batches of 512 KiB: each disk arrives in six, interleaved with the others'
    async with blockferry.open_repository(url, engine=EngineSettings(batch_bytes=512 * KiB)) as r:
        s = await r.backup([str(p) for p in imgs], name="vm")
        await r.restore(s.points[0], tmp_path / "out")
    for p in imgs:
        assert same_file(tmp_path / "out" / p.name, p)
    async with raw_client(s3_env) as c:
        packs = sorted(n for k, n in (await keys(c, url)).items() if k.startswith("packs/"))
    total = sum(packs)
    # 12 MiB in 4 MiB packs: three or four packs (one per disk would have been four part-filled
    # ones of 3 MiB each)
    assert 12 * MiB < total < 13 * MiB and len(packs) <= 4 and max(packs) >= 4 * MiB
    # every disk counts what it wrote (its chunks, and the framing of packs it opened or
    # sealed); together that is every byte of every pack
    written = [d.stats.written_bytes for d in s.objects[0].disks]
    assert all(w >= 3 * MiB for w in written) and sum(written) == total


async def test_delete_learns_the_versioning_without_asking(s3_env: dict[str, str]) -> None:
    """An unversioned bucket: one request per delete, no GetBucketVersioning. A versioned one
    (without object lock): the first plain delete's marker says so, and every version (the
    marker too) goes, so nothing is left to bill."""
    plain = await open_s3(new_url())
    try:
        await plain.put("locks/a", b"a")
        await plain.delete("locks/a")
        assert plain.versioned is False and plain.requests["DeleteObject"] == 1
        assert "GetBucketVersioning" not in plain.requests and not await plain.exists("locks/a")
    finally:
        await plain.aclose()
    bucket = f"bf-versioned-{uuid.uuid4().hex[:8]}"
    url = new_url(bucket)
    b = await open_s3(url)
    try:
        async with raw_client(s3_env) as c:
            await c.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
            await b.put("gc/plan", b"one")
            await b.put("gc/plan", b"two")
            await b.delete("gc/plan")
            assert b.versioned is True and "GetBucketVersioning" not in b.requests
            _, prefix = parse_url(url)
            left = await c.list_object_versions(Bucket=bucket, Prefix=prefix)
            assert left.get("Versions", []) == [] and left.get("DeleteMarkers", []) == []
    finally:
        await b.aclose()


async def test_crash_mid_upload_leaves_no_half_object_and_the_next_run_cleans_up(
        s3_env: dict[str, str], fault: FaultProxy, tmp_path: Path) -> None:
    url = new_url()
    await blockferry.init_repository(url, block_size=MiB, compression="none", pack_size=16 * MiB,
                                     backend_options={"create_bucket": True})
    img = write_disk(tmp_path / "d.img", 24 * MiB, [(0, "random", 24 * MiB)], seed=7)
    env = s3_env | {"AWS_ENDPOINT_URL": fault.endpoint, "BLOCKFERRY_S3_MULTIPART_THRESHOLD": str(6 * MiB),
                    "BLOCKFERRY_S3_PART_SIZE": str(5 * MiB)}
    # the first multipart upload to complete hangs in the proxy: the writer is caught mid-upload
    fault.add(Rule(lambda op, path: op == "CompleteMultipartUpload", "hang"))
    proc = subprocess.Popen([sys.executable, "-m", "blockferry", "backup", url, str(img), "--name", "vm", "-q"],
                            env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/")} | env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert await anyio.to_thread.run_sync(fault.hung.wait, 60), "the backup never reached the upload"
    finally:
        proc.kill()
        proc.wait()
    fault.release()
    async with raw_client(s3_env) as c:
        left = await incomplete(c, url)
        assert left and all(k.startswith("packs/") for k in left)
        listed = await keys(c, url)
        assert not any(k.startswith("points/") for k in listed)
        assert not set(left) & set(listed)  # the pack being written is not visible, not even in part
        # the next writer (it finds the dead one's lock and takes over) aborts the leftovers
        async with blockferry.open_repository(url) as r:
            s = await r.backup([str(img)], name="vm")
            assert await incomplete(c, url) == []
            await r.restore(s.points[0], tmp_path / "out")
    assert same_file(tmp_path / "out" / "d.img", img)


async def test_throttling_errors_and_dropped_connections_are_retried(
        s3_env: dict[str, str], fault: FaultProxy, tmp_path: Path) -> None:
    url = new_url()
    await blockferry.init_repository(url, block_size=256 * KiB, backend_options={"create_bucket": True})
    img = mixed_disk(tmp_path / "d.img", 6 * MiB, seed=21)
    fault.slow_seconds = 2.5
    rules = [
        fault.add(Rule(lambda op, path: op == "PutObject", "slowdown", times=3)),
        fault.add(Rule(lambda op, path: op == "GetObject" and "/points/" in path, "slowdown", times=2)),
        fault.add(Rule(lambda op, path: op == "PutObject" and "/packs/" in path, "drop", times=1)),
        fault.add(Rule(lambda op, path: op == "List", "slow", times=1)),
        fault.add(Rule(lambda op, path: op == "GetObject" and "/packs/" in path, "drop", times=4)),
    ]
    opts = {"endpoint_url": fault.endpoint, "read_timeout": 1.0, "backoff_base": 0.01, "cache_dir": ""}
    async with blockferry.open_repository(url, backend_options=opts) as r:
        s = await r.backup([str(img)], name="vm")
        r.store._manifests.clear()
        r.store._summaries.clear()
        assert [p.id for p in await r.points()] == s.points
        await r.restore(s.points[0], tmp_path / "out")
        b = r.store.backend
        assert isinstance(b, S3Backend)
        # every 503 and the slow answer went through our backoff; a dropped connection may also
        # be retried once by the HTTP layer below (a stale keep-alive connection looks the same)
        assert b.retries["PutObject"] >= 3 and b.retries["GetObject"] >= 2 and sum(b.retries.values()) >= 6, b.retries
    assert [rule.fired for rule in rules] == [3, 2, 1, 1, 4]
    assert same_file(tmp_path / "out" / "d.img", img)
    # a server that keeps failing: the error says what failed, after the configured retries
    fault.add(Rule(lambda op, path: op == "GetObject" and "/packs/" in path, "slowdown", times=None))
    async with blockferry.open_repository(url, backend_options=opts | {"retries": 2}) as r:
        r.store._manifests.clear()
        # (restore reports it as data it cannot read, naming the S3 error and the retries)
        with pytest.raises(BlockferryError, match="SlowDown.*after 2 retries"):
            await r.restore(s.points[0], tmp_path / "again")


async def test_a_request_that_keeps_failing_is_shown_to_the_user_before_it_gives_up(
        s3_env: dict[str, str], fault: FaultProxy, tmp_path: Path) -> None:
    """Routine retries stay quiet on the command line; from the third retry of one request on,
    each is a warning naming the request and the error, so a stalled run says why."""
    url = new_url()
    await blockferry.init_repository(url, block_size=256 * KiB, backend_options={"create_bucket": True})
    img = mixed_disk(tmp_path / "d.img", 2 * MiB, seed=22)
    env = s3_env | {"AWS_ENDPOINT_URL": fault.endpoint, "BLOCKFERRY_S3_BACKOFF_BASE": "0.01"}
    fault.add(Rule(lambda op, path: op == "PutObject" and "/packs/" in path, "slowdown", times=2))
    quiet = cli("backup", url, str(img), "--name", "vm", "-q", env=env)
    assert "s3_retry" not in quiet.stderr
    fault.add(Rule(lambda op, path: op == "PutObject" and "/packs/" in path, "slowdown", times=4))
    loud = cli("backup", url, str(mixed_disk(tmp_path / "e.img", 2 * MiB, seed=23)), "--name", "vm", "-q", env=env)
    warned = [line for line in loud.stderr.splitlines() if "s3_retry" in line]
    assert len(warned) == 2 and all("PutObject" in w and "SlowDown" in w for w in warned), loud.stderr
    assert "attempt=3" in warned[0] and "attempt=4" in warned[1] and "of=8" in warned[0]


async def test_cache_serves_unchanged_objects_and_is_rebuilt_when_another_writer_changes_the_bucket(
        s3_env: dict[str, str], tmp_path: Path) -> None:
    url = new_url()
    mine, theirs = str(tmp_path / "cache-mine"), str(tmp_path / "cache-theirs")
    await blockferry.init_repository(url, block_size=256 * KiB, backend_options={"create_bucket": True})
    a = mixed_disk(tmp_path / "a.img", 2 * MiB, seed=31)
    async with blockferry.open_repository(url, backend_options={"cache_dir": mine}) as r:
        p1 = (await r.backup([str(a)], name="vm")).points[0]
        modify(a, 0, 256 * KiB, seed=32)
        p2 = (await r.backup([str(a)], name="vm")).points[0]
    async with blockferry.open_repository(url, backend_options={"cache_dir": mine}) as r:
        assert [p.id for p in await r.points()] == [p1, p2]
        await r.store.load_index()
        b = r.store.backend
        # manifests and index files came from the cache: listing only, no GET
        assert b.fetched["points"] == b.fetched["index"] == 0 and b.cache_hits >= 4, b.statistics()
    # another writer, with its own cache: removes p1 and rebuilds the index (new index files)
    async with blockferry.open_repository(url, backend_options={"cache_dir": theirs}) as r:
        await r.delete(p1)
        await r.repair()
    cached = {p.name.split("@")[0] for p in Path(mine).rglob("*@*")}
    assert p1 in cached
    async with blockferry.open_repository(url, backend_options={"cache_dir": mine}) as r:
        assert [p.id for p in await r.points()] == [p2]
        await r.store.load_index()
        b = r.store.backend
        # only the new index file travelled; the manifest of p2 came from the cache
        assert b.fetched["index"] == 1 and b.fetched["points"] == 0, b.statistics()
        await r.restore(p2, tmp_path / "out")
    assert same_file(tmp_path / "out" / "a.img", a)
    cached = {p.name.split("@")[0] for p in Path(mine).rglob("*@*")}
    async with raw_client(s3_env) as c:
        now = {k.rsplit("/", 1)[-1] for k in await keys(c, url) if k.startswith(("index/", "points/"))}
    assert cached == now  # stale copies dropped, current ones kept


async def test_copy_between_local_and_s3_sends_only_missing_chunks(
        s3_env: dict[str, str], fault: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local, back = str(tmp_path / "local"), str(tmp_path / "back")
    url = new_url()
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault.endpoint)  # count what reaches the server
    await blockferry.init_repository(local, block_size=256 * KiB)
    await blockferry.init_repository(url, block_size=256 * KiB, backend_options={"create_bucket": True})
    await blockferry.init_repository(back, block_size=256 * KiB)
    img = write_disk(tmp_path / "d.img", 8 * MiB, [(0, "random", 8 * MiB)], seed=41)
    async with blockferry.open_repository(local) as r:
        p1 = (await r.backup([str(img)], name="vm")).points[0]
        fault.reset()
        first = await r.copy_to(url)
        assert first.points == [p1] and first.chunks_copied == 32
        assert fault.put_bytes["packs"] >= 8 * MiB
        modify(img, 5 * MiB, 256 * KiB, seed=42)
        p2 = (await r.backup([str(img)], name="vm")).points[0]
        fault.reset()
        second = await r.copy_to(url)
    assert second.skipped == [p1] and second.points == [p2] and second.chunks_copied == 1
    # one new pack of one 256 KiB chunk travelled; PUTs: that pack, an index file, the manifest,
    # the lock and the read session
    assert 256 * KiB <= fault.put_bytes["packs"] < 300 * KiB
    assert fault.counts["PutObject"] <= 6 and fault.counts["UploadPart"] == 0
    async with blockferry.open_repository(url) as r:
        to_local = await r.copy_to(back)
        assert to_local.points == [p1, p2]
        assert (await r.copy_to(back)).skipped == [p1, p2]
    async with blockferry.open_repository(back) as r:
        await r.restore(p2, tmp_path / "out")
        assert (await r.verify()).healthy
    assert same_file(tmp_path / "out" / "d.img", img)


_LOOP_GAP_SCRIPT = """
import asyncio, sys, time
from blockferry.plugins.s3 import S3BackendPlugin

async def main():
    gaps, done = [], False
    async def tick():
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.05)
    backend = await S3BackendPlugin().open(sys.argv[1], {"create_bucket": True})
    await backend.aclose()
    done = True
    await ticker
    print(max(gaps), "aiobotocore" in sys.modules)

asyncio.run(main())
"""


def test_connecting_loads_aiobotocore_without_blocking_the_event_loop(s3_env: dict[str, str]) -> None:
    # a fresh process, so that aiobotocore is imported (and S3's service model loaded) by the
    # connect itself: about half a second of work that must not stall a daemon's other jobs
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
    p = subprocess.run([sys.executable, "-c", _LOOP_GAP_SCRIPT, new_url()], capture_output=True, text=True,
                       env=base | s3_env, timeout=120)
    assert p.returncode == 0, p.stderr
    gap, imported = p.stdout.split()
    assert imported == "True"
    assert float(gap) < 0.2, f"the event loop stood still for {float(gap):.3f} s while connecting"


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_refuses_to_run_on_trio_with_a_clear_error(anyio_backend: str) -> None:
    with pytest.raises(ConfigError, match="asyncio only"):
        await S3BackendPlugin().open("s3://bf-plain/x", {})


def test_settings_hide_secrets_and_urls_are_checked() -> None:
    s = load_settings({"access_key_id": "AKIAEXAMPLE", "secret_access_key": "very-secret", "session_token": "tok"})
    assert "very-secret" not in repr(s) and "tok'" not in repr(s) and "AKIAEXAMPLE" in repr(s)
    assert parse_url("s3://bucket/a/b/") == ("bucket", "a/b/")
    assert parse_url("s3://bucket") == ("bucket", "")
    for bad in ("s3://", "s3://B_ad/x", "s3://bucket/a/../b", "s3://bucket/x?endpoint=y"):
        with pytest.raises(ConfigError):
            parse_url(bad)
    with pytest.raises(ConfigError, match="part size"):
        load_settings({"part_size": 1024})


async def test_object_locked_points_cannot_be_removed(s3_env: dict[str, str], tmp_path: Path) -> None:
    url = f"s3://bf-locked-{uuid.uuid4().hex[:8]}/repo"
    bucket, prefix = parse_url(url)
    cli("init", url, "--create-bucket", "--object-lock", "--block-size", "256KiB", env=s3_env)
    a = write_disk(tmp_path / "a.img", 2 * MiB, [(0, "random", 2 * MiB)], seed=51)
    b = write_disk(tmp_path / "b.img", 2 * MiB, [(0, "random", 2 * MiB)], seed=52)
    c_img = write_disk(tmp_path / "c.img", 2 * MiB, [(0, "random", 2 * MiB)], seed=53)
    frozen = json.loads(cli("backup", url, str(a), "--name", "vm", "--immutable-days", "1", "-q", "--json",
                            env=s3_env).stdout)["objects"][0]["point"]
    async with blockferry.open_repository(url) as r:
        plain = (await r.backup([str(b)], name="vm")).points[0]
        modify(b, 0, 256 * KiB, seed=54)
        await r.backup([str(b)], name="vm")
        other = (await r.backup([str(c_img)], name="other")).points[0]
        backend = r.store.backend
        assert isinstance(backend, S3Backend) and backend.object_lock
        frozen_packs = {r.store.locate(d)[0] for d in r.store.referenced(await r.point(frozen))}  # type: ignore[index]
        other_packs = {r.store.locate(d)[0] for d in r.store.referenced(await r.point(other))}  # type: ignore[index]
        # the server holds the manifest and the packs of the immutable point under COMPLIANCE retention
        async with raw_client(s3_env) as c:
            for key in [f"points/{frozen}", *frozen_packs]:
                head = await c.head_object(Bucket=bucket, Key=prefix + key)
                assert head["ObjectLockMode"] == "COMPLIANCE"
                left = head["ObjectLockRetainUntilDate"] - dt.datetime.now(dt.timezone.utc)
                assert dt.timedelta(hours=23) < left <= dt.timedelta(days=1)
            # the bucket came with rules for crash leftovers and old versions of overwritten objects
            rules = (await c.get_bucket_lifecycle_configuration(Bucket=bucket))["Rules"]
            assert {"AbortIncompleteMultipartUpload", "NoncurrentVersionExpiration"} <= {k for r in rules for k in r}
            # the server refuses to delete the locked version, whatever the client asks
            versions = await c.list_object_versions(Bucket=bucket, Prefix=prefix + f"points/{frozen}")
            vid = versions["Versions"][0]["VersionId"]
            with pytest.raises(Exception, match="AccessDenied"):
                await c.delete_object(Bucket=bucket, Key=prefix + f"points/{frozen}", VersionId=vid,
                                      BypassGovernanceRetention=True)
        # and blockferry does not try: refused before any delete request
        before = backend.requests["DeleteObjects"] + backend.requests["DeleteObject"]
        with pytest.raises(ImmutableError):
            await r.delete(frozen)
        assert backend.requests["DeleteObjects"] + backend.requests["DeleteObject"] == before
        report = await r.prune(RetentionPolicy(keep_last=1))
        assert frozen not in report.removed and plain in report.removed
        # the backend itself: the server's refusal becomes an ImmutableError
        with pytest.raises(ImmutableError, match="object lock"):
            await backend.delete(f"points/{frozen}")
        # a pack the server keeps locked although no point says so: gc plans around it
        assert await backend.protect(sorted(other_packs)[0], (dt.datetime.now(dt.timezone.utc)
                                                               + dt.timedelta(hours=2)).isoformat())
        await r.delete(other)
        gc = await r.gc()
        assert gc.state == "nothing to do" and gc.packs_kept_immutable == 1  # only dead chunks, but locked
    out = cli("delete", url, frozen[:8], env=s3_env, check=False)
    assert out.returncode == 5 and "immutable" in out.stderr
    cli("restore", url, frozen[:8], "--to", str(tmp_path / "out"), "-q", env=s3_env)
    assert same_file(tmp_path / "out" / "a.img", a)
    async with raw_client(s3_env) as c:
        listed = await keys(c, url)
    assert f"points/{frozen}" in listed and all(p in listed for p in frozen_packs | other_packs)
    assert f"points/{plain}" not in listed


async def test_archive_tier_moves_old_packs_and_restores_bring_them_back(
        s3_env: dict[str, str], fault: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Storage classes are real (radosgw with an ARCHIVE class in its placement, see rgw.py);
    the archive tier's *behaviour* (GETs refused until RestoreObject, then x-amz-restore) is
    played by the proxy, since radosgw 16 has no RestoreObject."""
    from blockferry.repo.archive import archive_points
    from blockferry.repo.retention import parse_time

    url = new_url()
    bucket, prefix = parse_url(url)
    env = s3_env | {"AWS_ENDPOINT_URL": fault.endpoint, "BLOCKFERRY_S3_RESTORE_CLASSES": "ARCHIVE",
                    "BLOCKFERRY_S3_RESTORE_POLL": "0.2", "BLOCKFERRY_S3_ARCHIVE_CLASS": "ARCHIVE"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    fault.restore_after = 0.5
    await blockferry.init_repository(url, block_size=256 * KiB, backend_options={"create_bucket": True})
    old = write_disk(tmp_path / "old.img", 2 * MiB, [(0, "random", 2 * MiB)], seed=61)
    new = write_disk(tmp_path / "new.img", 2 * MiB, [(0, "random", 2 * MiB)], seed=62)
    async with blockferry.open_repository(url) as r:
        p_old = (await r.backup([str(old)], name="old")).points[0]
        p_new = (await r.backup([str(new)], name="new")).points[0]
        created = {p.id: parse_time(p.created) for p in await r.points()}
        # "older than N days", with the clock moved so that only the first point qualifies
        span = (created[p_new] - created[p_old]).total_seconds() / 86400
        await r.store.lock("archive")
        report = await archive_points(r.store, older_than_days=span / 2, now=created[p_new])
        await r.store.unlock()
        assert report.points == [p_old] and report.packs_moved == 1 and report.storage_class == "ARCHIVE"
        old_packs = {r.store.locate(d)[0] for d in r.store.referenced(await r.point(p_old))}  # type: ignore[index]
        new_packs = {r.store.locate(d)[0] for d in r.store.referenced(await r.point(p_new))}  # type: ignore[index]
    async with raw_client(s3_env) as c:
        async def cls(key: str) -> str:
            return (await c.head_object(Bucket=bucket, Key=prefix + key)).get("StorageClass", "STANDARD")
        assert [await cls(k) for k in old_packs] == ["ARCHIVE"]
        assert {await cls(k) for k in new_packs} | {await cls(f"points/{p_old}")} == {"STANDARD"}
    # the archive refuses reads until a restore was requested and has finished
    fault.archived = {f"{bucket}/{prefix}{k}" for k in old_packs}
    out = cli("restore", url, p_old[:8], "--to", str(tmp_path / "out"), "-q", env=env)
    assert "1 pack(s) are in the archive tier: requesting them back" in out.stderr
    assert "1 pack(s) restored from the archive tier" in out.stderr
    assert fault.counts["RestoreObject"] == 1
    assert same_file(tmp_path / "out" / "old.img", old)
    # a read that meets an archived object unannounced (class not in restore_classes) restores it too
    fault.restores.clear()
    async with blockferry.open_repository(url, backend_options={"restore_classes": ""}) as r:
        b = r.store.backend
        assert isinstance(b, S3Backend)
        key = sorted(old_packs)[0]
        assert await b.get(key, 0, 8) == b"BFPACK01"  # the pack's header, once restored
        assert b.requests["RestoreObject"] == 1 and b.fetched["packs"] == 2  # refused, then read
        # and back to STANDARD
        report = await r.archive(points=[p_old], back=True)
        assert report.packs_moved == 1 and report.storage_class == "STANDARD"
    async with raw_client(s3_env) as c:
        assert [await cls(k) for k in old_packs] == ["STANDARD"]
    # a copy on a backend without storage classes has no archive tier: said plainly
    await blockferry.init_repository(str(tmp_path / "local"))
    async with blockferry.open_repository(str(tmp_path / "local")) as r:
        with pytest.raises(ConfigError, match="no storage classes"):
            await r.archive(older_than_days=1)


async def test_a_job_runs_into_s3_with_the_repository_settings_options(
        s3_env: dict[str, str], fault: FaultProxy, tmp_path: Path) -> None:
    from blockferry.actors.server import running_server
    from blockferry.jobs.config import DiskSpec, JobSpec, ObjectSpec, RepositorySettings

    url = new_url()
    await blockferry.init_repository(url, block_size=256 * KiB, backend_options={"create_bucket": True})
    img = mixed_disk(tmp_path / "d.img", 2 * MiB, seed=71)
    spec = JobSpec(name="nightly", repository="s3", objects=[ObjectSpec(name="vm", disks=[DiskSpec(source=str(img))])])
    # the endpoint comes from the repository's options (here: the proxy, to see that it is used)
    settings = RepositorySettings(name="s3", url=url, options={"endpoint_url": fault.endpoint, "max_requests": 4})
    async with running_server() as server:
        await server.add_repository(settings)
        session = await (await server.run_job(spec)).result()
    assert session.state == "success", session
    assert fault.counts["PutObject"] >= 3  # pack, index, manifest went through the configured endpoint
    async with blockferry.open_repository(url) as r:
        await r.restore(session.points[0], tmp_path / "out")
    assert same_file(tmp_path / "out" / "d.img", img)


def test_which_failures_are_retried() -> None:
    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    assert _retryable(client_error("SlowDown", 503)) and _retryable(client_error("", 500))
    assert not _retryable(client_error("AccessDenied", 403))
    assert _retryable(EndpointConnectionError(endpoint_url="http://x"))
    assert _retryable(aiohttp.ClientPayloadError("cut short")) and _retryable(TimeoutError())
    assert not _retryable(ValueError("a bug, not the network"))
