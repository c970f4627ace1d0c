"""A small fault-injecting HTTP proxy in front of the real S3 server, for tests.

It forwards every request unchanged (same path, query, headers and body, so SigV4 signatures stay
valid) to radosgw and the answer back, counting requests by operation. Rules can make matching
requests fail instead: answer 503 SlowDown, answer slowly (past the client's read timeout), drop
the connection without an answer, or hang until released. It can also play an archive tier
(S3 Glacier): GETs of chosen keys answer 403 InvalidObjectState until a RestoreObject request for
the key has arrived and ``restore_after`` seconds have passed; HEAD then shows the ``x-amz-restore``
header S3 sends. radosgw 16 has no RestoreObject (it answers NotImplemented), so this is the only
way to run the restore path end to end.

It runs in its own thread and event loop (aiohttp), so that a test's event loop and CLI
subprocesses can use it alike.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
       "proxy-authenticate", "content-length"}


def operation(method: str, path: str, query: str) -> str:
    """A coarse S3 operation name for counting: PutObject, UploadPart, GetObject, ..."""
    q = dict(p.split("=", 1) if "=" in p else (p, "") for p in query.split("&") if p)
    has_key = path.strip("/").count("/") >= 1
    if method == "PUT":
        if "partNumber" in q:
            return "UploadPart"
        if "retention" in q:
            return "PutObjectRetention"
        return "PutObject" if has_key else "PutBucket"
    if method == "POST":
        if "uploads" in q:
            return "CreateMultipartUpload"
        if "uploadId" in q:
            return "CompleteMultipartUpload"
        if "restore" in q:
            return "RestoreObject"
        if "delete" in q:
            return "DeleteObjects"
        return "Post"
    if method == "GET":
        if not has_key:
            return "ListMultipartUploads" if "uploads" in q else "ListObjectVersions" if "versions" in q else "List"
        return "GetObject"
    if method == "HEAD":
        return "HeadObject" if has_key else "HeadBucket"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in q else "DeleteObject"
    return method


@dataclass
class Rule:
    """Requests matching ``match(op, path)`` get ``action`` (``slowdown``, ``slow``, ``drop``,
    ``hang``: held until released, then dropped) ``times`` times (None: always), after skipping the first ``skip`` matches."""

    match: Callable[[str, str], bool]
    action: str
    times: int | None = 1
    skip: int = 0
    seen: int = 0
    fired: int = 0


@dataclass
class FaultProxy:
    upstream: str
    slow_seconds: float = 3.0
    restore_after: float = 1.0
    rules: list[Rule] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    put_bytes: Counter[str] = field(default_factory=Counter)  # bytes PUT, by first key component
    archived: set[str] = field(default_factory=set)  # "bucket/key" paths playing the archive tier
    restores: dict[str, float] = field(default_factory=dict)  # path → when RestoreObject arrived
    hung: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._release: asyncio.Event | None = None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def reset(self) -> None:
        with self._lock:
            self.rules.clear()
            self.counts.clear()
            self.put_bytes.clear()
            self.archived.clear()
            self.restores.clear()
        self.hung.clear()

    def _pick(self, op: str, path: str) -> str | None:
        with self._lock:
            self.counts[op] += 1
            for r in self.rules:
                if r.match(op, path) and (r.times is None or r.fired < r.times):
                    r.seen += 1
                    if r.seen > r.skip:
                        r.fired += 1
                        return r.action
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        op = operation(request.method, request.path, request.query_string)
        body = await request.read()
        path = request.path.lstrip("/")
        if op in ("PutObject", "UploadPart"):
            with self._lock:
                parts = path.split("/")
                self.put_bytes[parts[2] if len(parts) > 2 else parts[-1]] += len(body)
        action = self._pick(op, path)
        if action == "slowdown":
            return web.Response(status=503, content_type="application/xml", text=(
                "<?xml version=\"1.0\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate."
                "</Message></Error>"))
        if action == "slow":
            await asyncio.sleep(self.slow_seconds)
        if action == "drop":
            assert request.transport is not None
            request.transport.abort()
            raise ConnectionResetError("dropped by the fault proxy")
        if action == "hang":  # held until released, then dropped: it never reaches the server
            self.hung.set()
            assert self._release is not None
            await self._release.wait()
            assert request.transport is not None
            request.transport.abort()
            raise ConnectionResetError("dropped by the fault proxy")
        archived = self._archive_answer(op, path)
        if archived is not None:
            return archived
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        url = self.upstream + request.raw_path
        async with self._session.request(request.method, url, headers=headers, data=body or None,
                                         allow_redirects=False, auto_decompress=False) as resp:
            data = await resp.read()
            out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP}
            if path in self.restores and op == "HeadObject" and time.monotonic() >= self.restores[path]:
                out_headers["x-amz-restore"] = 'ongoing-request="false", expiry-date="Fri, 21 Dec 2040 00:00:00 GMT"'
            if request.method == "HEAD":
                # the object's size must reach the client: a plain Response would say 0
                r = web.StreamResponse(status=resp.status, headers=out_headers)
                r.content_length = int(resp.headers.get("Content-Length", "0"))
                await r.prepare(request)
                await r.write_eof()
                return r
            return web.Response(status=resp.status, headers=out_headers, body=data)

    def _archive_answer(self, op: str, path: str) -> web.Response | None:
        if path not in self.archived:
            return None
        if op == "RestoreObject":
            with self._lock:
                first = path not in self.restores
                self.restores.setdefault(path, time.monotonic() + self.restore_after)
            return web.Response(status=202 if first else 409, content_type="application/xml",
                                text="" if first else "<Error><Code>RestoreAlreadyInProgress</Code></Error>")
        if op == "HeadObject" and path in self.restores and time.monotonic() < self.restores[path]:
            return None  # forwarded; the header is added once the restore is done (see _handle)
        if op == "GetObject" and (path not in self.restores or time.monotonic() < self.restores[path]):
            return web.Response(status=403, content_type="application/xml", text=(
                "<?xml version=\"1.0\"?><Error><Code>InvalidObjectState</Code><Message>The operation is not "
                "valid for the object's storage class</Message></Error>"))
        return None

    # -- lifetime ------------------------------------------------------------------------------

    def start(self) -> None:
        import logging

        logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)  # dropped requests are on purpose
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="s3-fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault proxy did not start")

    def _run(self, ready: threading.Event) -> None:
        loop = self._loop = asyncio.new_event_loop()
        self._release = asyncio.Event()
        self._stop = asyncio.Event()

        async def main() -> None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
            app = web.Application(client_max_size=1 << 30)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            ready.set()
            await self._stop.wait()
            await runner.cleanup()
            await self._session.close()

        loop.run_until_complete(main())
        loop.close()

    def release(self) -> None:
        """Let hanging requests go on."""
        if self._loop is not None and self._release is not None:
            self._loop.call_soon_threadsafe(self._release.set)

    def stop(self) -> None:
        if self._loop is not None:
            self.release()
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
