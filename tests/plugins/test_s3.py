"""The ``s3`` backend against a real S3 server: radosgw from Debian's Ceph packages on loopback,
started once per session (tests/plugins/rgw.py). These tests run on **asyncio only**: the backend
is built on aiobotocore, which is asyncio-bound (under trio it refuses to open, tested below).

Faults (503 SlowDown, slow answers, dropped connections, archived objects) come from a small
HTTP proxy in front of radosgw (:class:`FaultProxy`): real HTTP both ways, nothing mocked.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from blockferry.plugins.s3 import S3Backend, S3BackendPlugin
from tests.conformance import BackendConformance
from tests.plugins.rgw import RadosGW

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
