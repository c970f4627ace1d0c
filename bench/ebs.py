"""The ebs source against moto: a full and an incremental backup of an EBS snapshot, in blocks
per second, and where the time goes.

Usage: ``python -m bench.ebs [--blocks 512] [--changed 0.1] [--output FILE]`` prints JSON.

moto's server runs in its own process (with the shims of tests/plugins/aws/conftest.py, which
correct its departures from AWS: without them its block size is 512 bytes), on loopback, on the
same cores as blockferry. Snapshot A holds ``--blocks`` random 512 KiB blocks of a volume;
snapshot B is A with ``--changed`` of them rewritten (written whole: moto ignores
ParentSnapshotId). A full backup of A, then an incremental of B as the same disk (ListChangedBlocks
A→B); each into a fresh local repository, timed. Reported per step: wall time, EBS blocks read and
per second, blockferry's CPU seconds and moto's (from /proc), and the time spent inside the API
client's requests summed over requests (``api_seconds``) over the wall time: the mean number of
requests in flight. What limits it on this machine is the one whose CPU is near one core per
core it can use (moto answers from one Python process; the client's share is botocore's
request signing and parsing plus aiohttp). A real account's figures differ: see docs/aws.md.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import blockferry
import boto3
from blockferry.jobs.config import DiskSpec
from blockferry.plugins.aws import client as aws_client

EBS_BLOCK = 512 * 1024
REGION = "eu-west-1"
ROOT = Path(__file__).resolve().parent.parent
SERVER = """
import sys, pytest
from moto.server import ThreadedMotoServer
from tests.plugins.aws.conftest import _install_shims
mp = pytest.MonkeyPatch()
_install_shims(mp)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
print("ready", flush=True)
sys.stdin.read()
server.stop()
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_snapshot(ebs: Any, blocks: dict[int, bytes]) -> str:
    snap = ebs.start_snapshot(VolumeSize=max(1, -(-len(blocks) * EBS_BLOCK // (1 << 30))))["SnapshotId"]
    for idx, data in blocks.items():
        ebs.put_snapshot_block(SnapshotId=snap, BlockIndex=idx, BlockData=data, DataLength=len(data),
                               Checksum=base64.b64encode(hashlib.sha256(data).digest()).decode(),
                               ChecksumAlgorithm="SHA256")
    ebs.complete_snapshot(SnapshotId=snap, ChangedBlocksCount=len(blocks))
    return snap


async def step(repo: str, url: str, options: dict[str, Any], server_pid: int) -> dict[str, Any]:
    api = {"seconds": 0.0}
    call = aws_client.AwsClients.call

    async def timed(self: Any, what: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await call(self, what, fn)
        finally:
            api["seconds"] += time.perf_counter() - t0

    aws_client.AwsClients.call = timed  # type: ignore[method-assign]
    try:
        cpu0, srv0, t0 = time.process_time(), cpu_seconds(server_pid), time.perf_counter()
        async with blockferry.open_repository(repo) as r:
            session = await r.backup([DiskSpec(source=url, name="disk", options=options)], name="vol", retries=0)
        wall = time.perf_counter() - t0
        cpu, srv = time.process_time() - cpu0, cpu_seconds(server_pid) - srv0
    finally:
        aws_client.AwsClients.call = call  # type: ignore[method-assign]
    assert session.state == "success", session
    d = session.objects[0].disks[0]
    blocks = d.stats.read_bytes // EBS_BLOCK
    return {"plan": d.plan, "wall_s": round(wall, 3), "ebs_blocks_read": blocks,
            "blocks_per_s": round(blocks / wall, 1), "mib_per_s": round(d.stats.read_bytes / wall / (1 << 20), 1),
            "blockferry_cpu_s": round(cpu, 3), "moto_cpu_s": round(srv, 3),
            "api_seconds": round(api["seconds"], 3), "requests_in_flight_mean": round(api["seconds"] / wall, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ebs", description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=512, help="written 512 KiB blocks of the snapshot")
    ap.add_argument("--changed", type=float, default=0.1, help="share of them rewritten for the incremental")
    ap.add_argument("--output", type=Path)
    args = ap.parse_args(argv)
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": REGION,
           "PYTHONPATH": str(ROOT)}
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
        endpoint = f"http://127.0.0.1:{port}"
        ebs = boto3.client("ebs", region_name=REGION, endpoint_url=endpoint)
        rnd = random.Random(7)
        a = {i: rnd.randbytes(EBS_BLOCK) for i in range(args.blocks)}
        changed = sorted(rnd.sample(range(args.blocks), max(1, int(args.blocks * args.changed))))
        b = {**a, **{i: rnd.randbytes(EBS_BLOCK) for i in changed}}
        snap_a, snap_b = write_snapshot(ebs, a), write_snapshot(ebs, b)
        options = {"endpoint_url": endpoint}
        with tempfile.TemporaryDirectory() as tmp:
            repo = str(Path(tmp) / "repo")

            async def run() -> dict[str, Any]:
                await blockferry.init_repository(repo)
                full = await step(repo, f"ebs://{REGION}/{snap_a}", options, server.pid)
                incremental = await step(repo, f"ebs://{REGION}/{snap_b}", options, server.pid)
                return {"blocks": args.blocks, "changed_blocks": len(changed), "full": full,
                        "incremental": incremental}

            result = anyio.run(run)
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(30)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
