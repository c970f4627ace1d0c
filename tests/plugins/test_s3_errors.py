"""How the S3 plugin names a server's failures (no S3 server needed: a plain HTTP server that
answers junk stands in for a wrong endpoint)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import anyio
import pytest
from blockferry.errors import RepositoryError
from blockferry.plugins.s3 import _translate
from botocore.exceptions import ClientError

pytestmark = pytest.mark.anyio


class _Junk(http.server.BaseHTTPRequestHandler):
    def _answer(self) -> None:
        body = b"Welcome! This is not S3, and not even XML <"
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def junk_endpoint() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Junk)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}"
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # aiobotocore runs on asyncio only
async def test_a_200_with_junk_is_not_reported_as_s3_error_500(junk_endpoint: str, anyio_backend: str) -> None:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    session = get_session()
    async with session.create_client("s3", endpoint_url=junk_endpoint, region_name="us-east-1",
                                     aws_access_key_id="x", aws_secret_access_key="y",
                                     config=AioConfig(retries={"max_attempts": 1})) as client:
        with pytest.raises(ClientError) as info:
            with anyio.fail_after(30):
                await client.complete_multipart_upload(Bucket="b", Key="packs/ab/abc", UploadId="u",
                                                       MultipartUpload={"Parts": [{"ETag": "e", "PartNumber": 1}]})
    err = _translate(info.value, "committing packs/ab/abc", "b")
    assert isinstance(err, RepositoryError)
    assert "S3 error 500" not in str(err) and "not an S3 response" in str(err), err


def test_a_real_s3_error_keeps_its_code() -> None:
    exc = ClientError({"Error": {"Code": "InternalError", "Message": "We encountered an internal error."},
                       "ResponseMetadata": {"HTTPStatusCode": 500}}, "PutObject")
    err = _translate(exc, "writing config", "b")
    assert str(err) == "writing config: S3 error InternalError: We encountered an internal error." and err.transient
