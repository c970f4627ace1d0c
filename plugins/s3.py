"""Backend ``s3``: a repository on S3 or an S3-compatible store (``s3://BUCKET/PREFIX``).

Built on aiobotocore, so it runs on **asyncio only** (the engine core also runs on trio; opening
this backend under trio raises a ConfigError that says so). See docs/s3.md for the user's view.

How the repository format maps onto objects (the same keys as the local backend, under PREFIX):

* Small objects (config, index files, manifests, locks, the gc plan) are one ``PutObject`` each:
  S3 publishes an object whole or not at all, so a reader never sees half of one. Exclusive puts
  (config, manifests, locks) send ``If-None-Match: *``: the server refuses to replace an existing
  key (PreconditionFailed → KeyExistsError). Nothing ever needs a rename.
* Packs go up as one ``PutObject`` up to ``multipart_threshold`` bytes (the default pack size
  fits: the fewest requests per GiB), larger ones as a multipart upload whose parts are sent in
  parallel. Neither is listed or readable before it completes. An aborted or crashed upload
  leaves an *incomplete multipart upload*, never an object: the writer aborts its own, and the
  next writer that takes the repository's lock aborts those left by dead writers
  (:meth:`S3Backend.abort_incomplete_uploads`); ``init --create-bucket`` also sets a bucket
  lifecycle rule that aborts them after a day.
* Reads of chunks are ranged GETs; several ranges of one pack that lie close together are
  fetched as one span.

Cross-cutting concerns live in one place, :meth:`S3Backend._call`: a semaphore bounds the
requests in flight (``max_requests``, also the connection pool size), transient failures
(throttling, 5xx, timeouts, dropped connections) are retried with exponential backoff and full
jitter, and every foreign exception is translated into an engine error. botocore's own retries are
turned off so that the policy is this one, counted and logged.

Index files and manifests are cached on local disk (:class:`_Cache`), keyed by key and ETag: both
are written once under a fresh name, so the bucket listing (which carries ETags) tells whether a
cached copy is current. A key the listing no longer has is dropped from the cache; a key with a
new ETag is fetched again.

Object lock: in a bucket created with object lock, :meth:`S3Backend.protect` puts an object under
retention (COMPLIANCE by default, GOVERNANCE by setting) until the point's immutability date;
:meth:`S3Backend.locked_until` lets garbage collection plan around locked objects.

Secrets: credentials come from botocore's usual chain (environment, shared files, profile) or the
settings; they are never logged, and the settings' ``repr`` hides them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import os
import random
import re
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import aiofiles
import aiofiles.os
import anyio
import msgspec
from blockferry.errors import (
    ArchivedError,
    BlockferryError,
    ConfigError,
    ImmutableError,
    NotFoundError,
    RepositoryError,
    RepositoryUnavailableError,
    plain_errors,
)
from blockferry.log import get_logger
from blockferry.repo.backend import BackendCapabilities, KeyExistsError, ObjectInfo
from botocore.exceptions import ClientError, HTTPClientError, NoCredentialsError, PartialCredentialsError
from botocore.exceptions import ConnectionError as BotoConnectionError

log = get_logger(component="s3")

MiB = 1 << 20
T = TypeVar("T")


def _new_session() -> Any:
    """An aiobotocore session with S3's service model, endpoint rules and the list of services
    already loaded: the imports and the synchronous file loading of ``create_client``, about
    half a second here. :meth:`S3Backend._connect` runs this in a worker thread, so the event
    loop (a daemon's other jobs) is not blocked meanwhile. (Starting it in a thread at process
    start, to overlap the rest of the start, was measured slower: both halves hold the GIL.)"""
    from aiobotocore.session import get_session  # 210 ms of imports: here, in a worker thread

    session = get_session()
    with contextlib.suppress(Exception):  # warm-ups only: create_client loads whatever is missing
        loader = session.get_component("data_loader")
        session.get_available_services()
        loader.load_service_model("s3", "service-2")
        loader.load_service_model("s3", "endpoint-rule-set-1")
        session._get_internal_component("endpoint_resolver")  # partitions and endpoints (botocore-internal)
    return session


#: key prefixes whose objects are cached locally (written once under a fresh name)
CACHED_PREFIXES = ("index/", "points/")
_ENV_PREFIX = "BLOCKFERRY_S3_"
#: bodies this large (bytes) are read into one buffer as they arrive
_READ_INTO_AT = 1 * MiB
#: retries of one request from this one on are logged as warnings (the earlier ones as info)
_WARN_FROM_RETRY = 3
#: a successful write this recent proves the repository writable (check_writable)
WRITE_PROOF_SECONDS = 60.0
_SECRET_FIELDS = ("secret_access_key", "session_token")


class S3Settings(msgspec.Struct, kw_only=True):
    """How to reach the bucket and how hard to push it. Each field can come from the backend
    options (job settings), else from ``BLOCKFERRY_S3_<FIELD>`` in the environment, else the
    default; endpoint, region and credentials otherwise come from botocore's usual places
    (``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``..., ``~/.aws``)."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    #: "path", "virtual" or "auto"; default: path for a custom endpoint, else botocore's choice
    addressing_style: str | None = None
    #: requests in flight at once (and connections in the pool)
    max_requests: int = 16
    #: objects larger than this (bytes) are uploaded in parts
    multipart_threshold: int = 48 * MiB
    #: part size of multipart uploads (bytes; S3's minimum is 5 MiB)
    part_size: int = 16 * MiB
    #: parts of one upload sent at once (also bounds the upload's buffer: parallel × part_size)
    upload_parallel: int = 4
    #: attempts after the first for a transient failure
    retries: int = 8
    #: first backoff (seconds); doubles per attempt, capped at backoff_max, full jitter
    backoff_base: float = 0.1
    backoff_max: float = 10.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    #: ranges of one object closer than this (bytes) are fetched by one GET
    coalesce_gap: int = 1 * MiB
    #: object lock retention mode for immutable points: COMPLIANCE or GOVERNANCE
    lock_mode: str = "COMPLIANCE"
    #: storage class for archived packs (``blockferry archive``)
    archive_class: str = "GLACIER"
    #: storage classes whose objects must be restored (RestoreObject) before a GET, comma-separated
    restore_classes: str = "GLACIER,DEEP_ARCHIVE"
    #: restore requests: days the restored copy stays, retrieval tier, and how long to wait
    restore_days: int = 2
    restore_tier: str = "Standard"
    restore_wait: float = 12 * 3600.0
    restore_poll: float = 30.0
    #: local cache of index files and manifests; "" turns it off
    cache_dir: str | None = None
    #: init only: create the bucket if missing, with object lock
    create_bucket: bool = False
    object_lock: bool = False

    def __repr__(self) -> str:
        shown = {f: getattr(self, f) for f in self.__struct_fields__
                 if getattr(self, f) is not None and f not in _SECRET_FIELDS}
        hidden = [f for f in _SECRET_FIELDS if getattr(self, f)]
        return f"S3Settings({shown}{', secrets hidden: ' + ','.join(hidden) if hidden else ''})"


def load_settings(options: Mapping[str, Any]) -> S3Settings:
    """Settings from ``options`` (unknown keys ignored), then the environment, then defaults."""
    values: dict[str, Any] = {}
    for name in S3Settings.__struct_fields__:
        if options.get(name) is not None:
            values[name] = options[name]
        elif (env := os.environ.get(_ENV_PREFIX + name.upper())) is not None:
            values[name] = env
    try:
        s = msgspec.convert(values, S3Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"s3 settings: {exc}") from None
    if s.lock_mode.upper() not in ("COMPLIANCE", "GOVERNANCE"):
        raise ConfigError(f"s3 lock mode must be COMPLIANCE or GOVERNANCE, not {s.lock_mode!r}")
    s.lock_mode = s.lock_mode.upper()
    if s.part_size < 5 * MiB:
        raise ConfigError(f"s3 part size must be at least 5 MiB (S3's minimum), not {s.part_size}")
    if s.max_requests < 1 or s.upload_parallel < 1:
        raise ConfigError("s3 max_requests and upload_parallel must be at least 1")
    if s.addressing_style not in (None, "path", "virtual", "auto"):
        raise ConfigError(f"s3 addressing style must be path, virtual or auto, not {s.addressing_style!r}")
    return s


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → ``("bucket", "some/prefix/")`` (prefix "" for the root)."""
    p = urlparse(url)
    if p.scheme != "s3" or not p.netloc:
        raise ConfigError(f"{url}: an S3 repository is named s3://BUCKET/PREFIX")
    if p.query or p.fragment:
        raise ConfigError(f"{url}: no query or fragment in S3 URLs (endpoint and region go in the settings)")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", p.netloc):
        raise ConfigError(f"{url}: {p.netloc!r} is not a valid bucket name")
    prefix = p.path.strip("/")
    if ".." in prefix.split("/"):
        raise ConfigError(f"{url}: invalid prefix")
    return p.netloc, prefix + "/" if prefix else ""


# -- errors --------------------------------------------------------------------------------------

_RETRY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests",
                "OperationAborted"}
_NOT_FOUND = {"NoSuchKey", "404", "NotFound", "NoSuchVersion"}
_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
           "InvalidToken", "ExpiredToken", "AccountProblem"}


def _code(exc: BaseException) -> tuple[str, int]:
    resp = getattr(exc, "response", None) or {}
    code = str(resp.get("Error", {}).get("Code", ""))
    status = int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, ClientError):
        code, status = _code(exc)
        return code in _RETRY_CODES or status in (429, 500, 502, 503, 504)
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return True  # connect/read timeouts, refused and dropped connections
    if isinstance(exc, asyncio.TimeoutError):
        return True
    # a body cut short while reading it, a server that closed the connection. aiohttp comes with
    # aiobotocore, which _new_session loads in a thread: imported here it would cost 140 ms on
    # the event loop, and while it is not loaded no exception is one of its own
    aiohttp = sys.modules.get("aiohttp")
    return aiohttp is not None and isinstance(exc, (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError))


def _translate(exc: BaseException, what: str, bucket: str) -> BlockferryError:
    if isinstance(exc, BlockferryError):
        return exc
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return ConfigError("no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                           "a profile in ~/.aws, or the repository's access key settings")
    if isinstance(exc, ClientError):
        code, status = _code(exc)
        msg = exc.response.get("Error", {}).get("Message") or code or f"HTTP {status}"
        if code == "NoSuchBucket":
            return RepositoryUnavailableError(f"{what}: bucket {bucket!r} does not exist "
                                              "(create it, or run init with --create-bucket)")
        if code in _NOT_FOUND:
            return NotFoundError(f"{what}: not found")
        if code == "PreconditionFailed":
            return KeyExistsError(f"{what}: exists")
        if code == "InvalidObjectState":
            return ArchivedError(f"{what}: the object is in an archive storage class and must be restored "
                                 "before it can be read")
        if code in _DENIED:
            return RepositoryUnavailableError(f"{what}: access denied by the S3 server ({code}); check the "
                                              "credentials and the bucket's policy")
        if code == "InvalidStorageClass" or (code == "InvalidArgument" and "class" in msg.lower()):
            return ConfigError(f"{what}: the server does not offer that storage class ({msg})")
        if not code or code == str(status):
            # no S3 error document: botocore made the code up from the HTTP status (and reports a
            # 200 whose body is not S3's XML as a 500); the server is not answering as S3 does
            err = RepositoryError(f"{what}: the endpoint's answer is not an S3 response (HTTP status {status} as "
                                  "botocore reports it, no S3 error code); check that the endpoint URL is an S3 "
                                  "server and that nothing (a proxy, a captive portal) answers in its place")
        else:
            err = RepositoryError(f"{what}: S3 error {code}: {msg}")
        err.transient = _retryable(exc)
        return err
    return RepositoryError(f"{what}: {type(exc).__name__}: {exc}")


# -- the local cache -----------------------------------------------------------------------------


class _Cache:
    """Copies of index files and manifests on local disk, one file per key and ETag
    (``<dir>/<key>@<etag>``), written whole through a temporary file and a rename."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str, etag: str) -> Path:
        return self.root / f"{key}@{re.sub(r'[^0-9A-Za-z-]', '', etag)}"

    async def read(self, key: str, etag: str) -> bytes | None:
        try:
            async with aiofiles.open(self._path(key, etag), "rb") as f:
                return await f.read()
        except OSError:
            return None

    async def write(self, key: str, etag: str, data: bytes) -> None:
        path = self._path(key, etag)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            await aiofiles.os.makedirs(path.parent, exist_ok=True)
            async with aiofiles.open(tmp, "wb") as f:
                await f.write(data)
            await aiofiles.os.replace(tmp, path)
        except OSError as exc:  # a cache that cannot be written only costs requests
            log.warning("s3_cache_write_failed", error=exc.strerror)
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def prune(self, prefix: str, current: Mapping[str, str]) -> int:
        """Drop cached copies under ``prefix`` whose key is gone or whose ETag changed."""
        base = self.root / prefix
        removed = 0
        if not base.is_dir():
            return 0
        for dirpath, _, files in os.walk(base):
            for fn in files:
                path = Path(dirpath) / fn
                key, sep, tag = str(path.relative_to(self.root)).rpartition("@")
                etag = current.get(key)
                if not sep or etag is None or self._path(key, etag) != path:
                    with contextlib.suppress(OSError):
                        path.unlink()
                        removed += 1
        return removed


def _default_cache_root() -> Path:
    if d := os.environ.get("BLOCKFERRY_CACHE_DIR"):
        return Path(d)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "blockferry"


# -- uploads -------------------------------------------------------------------------------------


class S3Upload:
    """A pack being written. Up to ``multipart_threshold`` bytes it is held and sent with one
    PutObject at commit; past that it becomes a multipart upload whose full parts are sent
    ``upload_parallel`` at a time (it never holds more than that many parts). Nothing is visible
    under the key before :meth:`commit`.

    The pieces written are kept as they come (the engine's chunk payloads are immutable
    ``bytes``): they are never joined into one buffer, but sent one after another as the
    request's body (:class:`_Body`). Their MD5 (the Content-MD5 the server checks) is
    computed as they are written, in a worker thread, so a sealed pack goes out at once: at
    the end of an incremental, hashing a 32 MiB pack at commit kept its PUT waiting 0.1–0.16 s
    while the other cores compressed."""

    def __init__(self, backend: S3Backend, key: str) -> None:
        self.key = key
        self._b = backend
        self._pieces: list[bytes] = []
        self._held = 0  #: bytes in _pieces
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._next_part = 1
        self._closed = False
        self.size = 0
        #: MD5 of everything written, while it may still go as one PutObject (None once multipart)
        self._md5: Any = hashlib.md5()

    def __repr__(self) -> str:
        return f"<S3Upload {self.key} bytes={self.size} parts={len(self._parts)} multipart={self._upload_id is not None}>"

    async def write(self, parts: Sequence[bytes | bytearray | memoryview]) -> int:
        if self._closed:
            raise RepositoryError(f"upload of {self.key} is closed")
        n = 0
        new: list[bytes] = []
        for p in parts:
            if len(p):
                # a view or a bytearray may change once this returns: keep a copy of those
                new.append(p if type(p) is bytes else bytes(p))
                n += len(p)
        self._pieces += new
        self._held += n
        self.size += n
        s = self._b.settings
        if self._upload_id is None and self._held > s.multipart_threshold:
            self._md5 = None  # parts carry their own
            await self._start()
        elif self._md5 is not None:
            if n <= _INLINE_BODY:
                _update(self._md5, new)
            else:
                await anyio.to_thread.run_sync(_update, self._md5, new)
        if self._upload_id is not None and self._held >= s.part_size * s.upload_parallel:
            await self._send_parts(final=False)
        return n

    async def _start(self) -> None:
        b = self._b
        resp = await b._call("CreateMultipartUpload", f"starting upload of {self.key}",
                             lambda c: c.create_multipart_upload(Bucket=b.bucket, Key=b._full(self.key)))
        self._upload_id = resp["UploadId"]

    def _take(self, size: int) -> list[bytes]:
        """The first ``size`` bytes of the held pieces (all of them if fewer), as pieces."""
        out: list[bytes] = []
        got = 0
        while self._pieces and got < size:
            p = self._pieces[0]
            if got + len(p) <= size:
                out.append(self._pieces.pop(0))
                got += len(p)
            else:
                k = size - got
                out.append(p[:k])
                self._pieces[0] = p[k:]
                got += k
        self._held -= got
        return out

    async def _send_parts(self, *, final: bool) -> None:
        size = self._b.settings.part_size
        batch: list[tuple[int, list[bytes]]] = []
        while self._held >= size or (final and self._held):
            batch.append((self._next_part, self._take(size)))
            self._next_part += 1
        b = self._b
        upload_id = self._upload_id

        async def send(number: int, pieces: list[bytes]) -> None:
            body, md5 = await _body(pieces)
            resp = await b._call("UploadPart", f"uploading part {number} of {self.key}",
                                 lambda c: c.upload_part(Bucket=b.bucket, Key=b._full(self.key), UploadId=upload_id,
                                                         PartNumber=number, Body=body, ContentMD5=md5))
            self._parts.append({"PartNumber": number, "ETag": resp["ETag"]})

        with plain_errors():
            async with anyio.create_task_group() as tg:
                for number, pieces in batch:
                    tg.start_soon(send, number, pieces)

    async def commit(self) -> None:
        if self._closed:
            raise RepositoryError(f"upload of {self.key} is closed")
        b = self._b
        try:
            if self._upload_id is None:
                pieces, self._pieces, self._held = self._pieces, [], 0
                await b.put(self.key, pieces, content_md5=base64.b64encode(self._md5.digest()).decode())
            else:
                await self._send_parts(final=True)
                parts = sorted(self._parts, key=lambda p: p["PartNumber"])
                await b._call("CompleteMultipartUpload", f"completing upload of {self.key}",
                              lambda c: c.complete_multipart_upload(
                                  Bucket=b.bucket, Key=b._full(self.key), UploadId=self._upload_id,
                                  MultipartUpload={"Parts": parts}))
                self._upload_id = None
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.abort()
            raise
        self._closed = True

    async def abort(self) -> None:
        self._closed = True
        self._pieces, self._held = [], 0
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is not None:
            await self._b._abort_upload(self.key, upload_id)


#: bodies up to this size are joined and hashed on the event loop (a thread hop costs more)
_INLINE_BODY = 256 * 1024
#: the slices a large body is handed to the connection in
_SEND_SLICE = 256 * 1024


class _Body:
    """A large request body sent as its pieces, never joined: aiohttp takes it as an async
    iterable (botocore has set Content-Length from ``len``), so the socket gets it a slice at a
    time and no copy of the whole body is made anywhere. A ``bytes`` body would be wrapped by
    botocore in a BytesIO whose buffer is then copied, and one large buffer would be copied
    again into the transport's; both copies touch fresh memory, which is what costs here.
    ``read`` exists for botocore's type check; it and ``bytes(body)`` give the joined body (for
    the rare callers that need it whole: the cache, a retried exclusive put's comparison)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self.size = sum(len(p) for p in pieces)

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.pieces)

    def read(self, n: int = -1) -> bytes:
        return bytes(self)

    def __aiter__(self) -> AsyncIterator[memoryview]:
        return self._slices()

    async def _slices(self) -> AsyncIterator[memoryview]:
        for p in self.pieces:
            view = memoryview(p)
            for off in range(0, len(view), _SEND_SLICE):
                yield view[off:off + _SEND_SLICE]


def _update(h: Any, pieces: Sequence[bytes]) -> None:
    for p in pieces:
        h.update(p)  # releases the GIL for all but tiny pieces


def _md5(pieces: Sequence[bytes]) -> str:
    h = hashlib.md5()
    _update(h, pieces)
    return base64.b64encode(h.digest()).decode()


async def _body(pieces: Sequence[bytes | bytearray | memoryview], md5: str | None = None) -> tuple[bytes | _Body, str]:
    """A request body for ``pieces`` and its Content-MD5: ``md5`` when the caller has it,
    else computed (in a worker thread unless the body is small)."""
    if sum(len(p) for p in pieces) <= _INLINE_BODY:
        small = b"".join(pieces)
        return small, md5 or _md5([small])
    frozen = [p if type(p) is bytes else bytes(p) for p in pieces]
    return _Body(frozen), md5 or await anyio.to_thread.run_sync(_md5, frozen)


# -- the backend ---------------------------------------------------------------------------------


class S3Backend:
    """A repository under ``s3://bucket/prefix``. Open with :class:`S3BackendPlugin`."""

    def __init__(self, url: str, settings: S3Settings) -> None:
        self.url = url
        self.bucket, self.prefix = parse_url(url)
        self.settings = settings
        self.capabilities = BackendCapabilities(max_connections=settings.max_requests, atomic_rename=False, local=False)
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._sem = anyio.Semaphore(settings.max_requests)
        #: requests sent, by operation (retries included), and retries, by operation
        self.requests: Counter[str] = Counter()
        self.retries: Counter[str] = Counter()
        #: GETs sent, by the key's first component ("packs", "index", "points", ...)
        self.fetched: Counter[str] = Counter()
        self.cache_hits = 0
        self.object_lock = False
        #: None until the first delete finds out (see delete)
        self.versioned: bool | None = None
        self._etags: dict[str, str] = {}
        self._cache: _Cache | None = None
        #: when a put last succeeded (anyio clock), see check_writable
        self._wrote_at: float | None = None
        self.restore_progress: Callable[[str], None] | None = None
        self.log = log.bind(repository=url)

    def __repr__(self) -> str:
        inflight = self.settings.max_requests - self._sem.value
        return (f"<S3Backend {self.url} requests={sum(self.requests.values())} in_flight={inflight}/"
                f"{self.settings.max_requests} lock={self.object_lock}>")

    @property
    def archive_class(self) -> str:
        """The class ``blockferry archive`` moves packs to by default (see StorageClasses)."""
        return self.settings.archive_class

    def statistics(self) -> dict[str, Any]:
        return {"requests": dict(self.requests), "retries": dict(self.retries), "fetched": dict(self.fetched),
                "cache_hits": self.cache_hits,
                "in_flight": self.settings.max_requests - self._sem.value}

    # -- plumbing ------------------------------------------------------------------------------

    def _full(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ConfigError(f"invalid key {key!r}")
        return self.prefix + key

    async def _connect(self) -> None:
        # imports and service-model loading off the event loop (other jobs keep running)
        try:
            session = await anyio.to_thread.run_sync(_new_session)
        except Exception as exc:
            raise _translate(exc, f"connecting to S3 for {self.url}", self.bucket) from exc
        # loaded with the session (in the thread above): at the top of the module it would load
        # aiobotocore, 260 ms, on the event loop when the plugin is found
        from aiobotocore.config import AioConfig

        s = self.settings
        if s.profile:
            session.set_config_variable("profile", s.profile)
        endpoint = s.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        style = s.addressing_style or ("path" if endpoint else None)
        config = AioConfig(
            max_pool_connections=s.max_requests,
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
            retries={"total_max_attempts": 1, "mode": "standard"},  # ours, in _call
            # bodies carry a Content-MD5 computed off the event loop (see put)
            s3={"payload_signing_enabled": False, **({"addressing_style": style} if style else {})},
            # S3-compatible servers (radosgw among them) do not all accept the new default
            # checksum headers; send them only where the API requires one
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        region = s.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") \
            or session.get_config_variable("region") or "us-east-1"
        kwargs: dict[str, Any] = {"region_name": region, "config": config}
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        if s.access_key_id:
            kwargs.update(aws_access_key_id=s.access_key_id, aws_secret_access_key=s.secret_access_key,
                          aws_session_token=s.session_token)
        try:
            self._client = await self._stack.enter_async_context(session.create_client("s3", **kwargs))
        except Exception as exc:
            raise _translate(exc, f"connecting to S3 for {self.url}", self.bucket) from exc
        self.log = self.log.bind(endpoint=endpoint or "aws", region=region)

    async def _call(self, op: str, what: str, fn: Callable[[Any], Awaitable[T]], *,
                    ok: Callable[[BaseException], T | None] | None = None) -> T:
        """Run one request (``fn(client)``, which also reads the body) with the in-flight bound,
        retries and error translation. ``ok`` may turn a failure into an answer (it returns
        None to let the failure stand).

        This is per request, inside the backend, rather than a wrapper around any Backend: the
        bound counts HTTP requests (a get_ranges sends several at once, an upload sends its
        parts, a versioned delete lists then deletes), a retry repeats one request and not a
        whole method (a retried exclusive put must check whether its first attempt landed, see
        put), and success is per operation (a 416 on a read past the end is an answer, a 412 on
        a create-only put means "exists", NoSuchUpload on an abort means "done"). A decorator
        around the Backend protocol would see none of that."""
        s = self.settings
        attempt = 0
        while True:
            try:
                async with self._sem:
                    self.requests[op] += 1
                    return await fn(self._client)
            except Exception as exc:
                if ok is not None and (answer := ok(exc)) is not None:
                    return answer
                if _retryable(exc) and attempt < s.retries:
                    delay = random.uniform(0, min(s.backoff_max, s.backoff_base * (2 ** attempt)))
                    attempt += 1
                    self.retries[op] += 1
                    code, status = _code(exc)
                    # the first retries are routine (throttling); from the third on a user
                    # sees why the run stalls (a full cluster holds writes until the read
                    # timeout, so the retries of one request can take several minutes)
                    emit = self.log.warning if attempt >= _WARN_FROM_RETRY else self.log.info
                    emit("s3_retry", op=op, attempt=attempt, of=s.retries, delay=round(delay, 3),
                         error=code or type(exc).__name__, status=status or None)
                    await anyio.sleep(delay)
                    continue
                err = _translate(exc, what, self.bucket)
                if attempt:
                    err.args = (f"{err} (after {attempt} retries)",)
                raise err from exc

    async def _setup(self) -> None:
        """Check the bucket (creating it if asked) and learn whether it has object lock: one
        request when the bucket exists (whether it is versioned, the first delete finds out)."""
        s = self.settings

        def answer(exc: BaseException) -> dict[str, Any] | None:
            code, status = _code(exc)
            if code == "NoSuchBucket" or (status == 404 and code in ("404", "NotFound")):
                return {"missing": True}
            if code in ("ObjectLockConfigurationNotFoundError", "ObjectLockConfigurationNotFound",
                        "NotImplemented", "InvalidRequest"):
                return {}  # a bucket without object lock (or a server without the feature)
            return None

        async def lock_config() -> dict[str, Any]:
            return await self._call("GetObjectLockConfiguration", f"reading the object lock of {self.bucket}",
                                    lambda c: c.get_object_lock_configuration(Bucket=self.bucket), ok=answer)

        lock = await lock_config()
        if lock.get("missing"):
            if not s.create_bucket:
                raise RepositoryUnavailableError(
                    f"{self.url}: bucket {self.bucket!r} does not exist (create it, or run init with --create-bucket)")
            await self._create_bucket()
            lock = await lock_config()
        self.object_lock = lock.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"
        if s.object_lock and not self.object_lock:
            raise ConfigError(f"{self.url}: bucket {self.bucket!r} exists without object lock; object lock is set when "
                              "a bucket is created (use a new bucket with --create-bucket --object-lock)")
        if self.object_lock:
            self.versioned = True
        if s.cache_dir != "":
            ident = hashlib.sha256(f"{self._client.meta.endpoint_url}|{self.bucket}|{self.prefix}".encode()).hexdigest()[:24]
            root = Path(s.cache_dir) if s.cache_dir else _default_cache_root() / "s3"
            self._cache = _Cache(root / ident)
        self.log.debug("s3_opened", versioned=self.versioned, object_lock=self.object_lock)

    async def _create_bucket(self) -> None:
        s = self.settings
        args: dict[str, Any] = {"Bucket": self.bucket}
        region = self._client.meta.region_name
        if region and region != "us-east-1" and not (s.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")):
            args["CreateBucketConfiguration"] = {"LocationConstraint": region}
        if s.object_lock:
            args["ObjectLockEnabledForBucket"] = True

        def owned(exc: BaseException) -> bool | None:
            return True if _code(exc)[0] == "BucketAlreadyOwnedByYou" else None

        await self._call("CreateBucket", f"creating bucket {self.bucket}",
                         lambda c: _true(c.create_bucket(**args)), ok=owned)
        self.log.info("s3_bucket_created", bucket=self.bucket, object_lock=s.object_lock)
        # leftovers of crashed uploads, and old versions of overwritten small objects (locks,
        # the gc plan) in a versioned bucket, go after a day; locked versions are never touched
        rules = [{"ID": "blockferry-abort-incomplete-uploads", "Status": "Enabled", "Filter": {"Prefix": self.prefix},
                  "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}}]
        if s.object_lock:
            rules.append({"ID": "blockferry-expire-old-versions", "Status": "Enabled", "Filter": {"Prefix": self.prefix},
                          "NoncurrentVersionExpiration": {"NoncurrentDays": 1}})
        try:
            await self._call("PutBucketLifecycleConfiguration", f"setting the lifecycle of {self.bucket}",
                             lambda c: c.put_bucket_lifecycle_configuration(
                                 Bucket=self.bucket, LifecycleConfiguration={"Rules": rules}))
        except BlockferryError as exc:
            self.log.warning("s3_lifecycle_not_set", error=str(exc))

    # -- reads ---------------------------------------------------------------------------------

    async def _get_object(self, key: str, rng: str | None, what: str,
                          into: bytearray | None = None) -> tuple[bytes, str]:
        """(body, ETag); an archived object is restored first (see :meth:`_restore`). A body
        of ``_READ_INTO_AT`` bytes or more goes into ``into`` (when it is large enough: the
        answer is then a view of it) or into a new buffer."""

        async def fetch(c: Any) -> tuple[bytes, str]:
            self.fetched[key.partition("/")[0]] += 1
            kw = {"Range": rng} if rng else {}
            resp = await c.get_object(Bucket=self.bucket, Key=self._full(key), **kw)
            size = resp.get("ContentLength") or 0
            async with resp["Body"] as body:
                if size < _READ_INTO_AT:
                    return await body.read(), resp.get("ETag", "")
                # a large body straight into its buffer: read() would hold every received
                # piece and their joined copy at once, twice the span at the peak. A new
                # buffer is zeroed and faulted in page by page on the event loop (a fifth of
                # the loop's time in a restore), so callers reading many hand one back in.
                buf = into if into is not None and len(into) >= size else bytearray(size)
                view = memoryview(buf)[:size]
                pos = 0
                while pos < size:
                    n = await body.readinto(view[pos:])
                    if n == 0:
                        break
                    pos += n
                if pos < size:
                    view.release()
                    raise RepositoryError(f"reading {key}: the answer ended after {pos} of {size} bytes")
                if len(buf) == size:
                    view.release()
                    return buf, resp.get("ETag", "")  # type: ignore[return-value]  # bytes-like
                return view, resp.get("ETag", "")  # type: ignore[return-value]  # bytes-like

        def past_end(exc: BaseException) -> tuple[bytes, str] | None:
            return (b"", "") if _code(exc)[0] == "InvalidRange" else None

        try:
            return await self._call("GetObject", what, fetch, ok=past_end)
        except ArchivedError:
            await self._restore(key)
            return await self._call("GetObject", what, fetch, ok=past_end)

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        if offset < 0 or (length is not None and length < 0):
            raise ConfigError(f"invalid range {offset}+{length} of {key}")
        if length == 0:
            await self.stat(key)
            return b""
        cacheable = offset == 0 and length is None and self._cache is not None and key.startswith(CACHED_PREFIXES)
        if cacheable and (etag := self._etags.get(key)):
            assert self._cache is not None
            data = await self._cache.read(key, etag)
            if data is not None:
                self.cache_hits += 1
                return data
        rng = None
        if offset or length is not None:
            rng = f"bytes={offset}-{offset + length - 1}" if length is not None else f"bytes={offset}-"
        data, etag = await self._get_object(key, rng, f"reading {key}")
        if cacheable and etag:
            assert self._cache is not None
            self._etags[key] = etag
            await self._cache.write(key, etag, data)
        return data

    async def get_into(self, key: str, offset: int, length: int, buffer: bytearray) -> bytes:
        """``length`` bytes at ``offset`` (as :meth:`get`), read into ``buffer`` when it holds
        them and they are large (then the answer is a view of it, valid while the buffer is
        not reused): for callers that read many large ranges and can recycle their buffers."""
        if offset < 0 or length <= 0:
            raise ConfigError(f"invalid range {offset}+{length} of {key}")
        data, _ = await self._get_object(key, f"bytes={offset}-{offset + length - 1}", f"reading {key}",
                                         into=buffer)
        return data

    async def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Ranges close together (``coalesce_gap``) are fetched as one span; spans in parallel."""
        if not ranges:
            return []
        order = sorted(range(len(ranges)), key=lambda i: ranges[i])
        spans: list[list[int]] = []  # [start, end, index...]
        for i in order:
            off, n = ranges[i]
            if spans and off <= spans[-1][1] + self.settings.coalesce_gap:
                spans[-1][1] = max(spans[-1][1], off + n)
                spans[-1].append(i)
            else:
                spans.append([off, off + n, i])
        out: list[bytes] = [b""] * len(ranges)

        async def fetch(span: list[int]) -> None:
            start, end = span[0], span[1]
            data = await self.get(key, start, end - start) if end > start else b""
            for i in span[2:]:
                off, n = ranges[i]
                out[i] = data[off - start:off - start + n]

        if len(spans) == 1:
            await fetch(spans[0])
            return out
        with plain_errors():
            async with anyio.create_task_group() as tg:
                for span in spans:
                    tg.start_soon(fetch, span)
        return out

    async def exists(self, key: str) -> bool:
        try:
            await self.stat(key)
            return True
        except NotFoundError:
            return False

    async def _head(self, key: str) -> dict[str, Any]:
        return await self._call("HeadObject", f"stat {key}",
                                lambda c: c.head_object(Bucket=self.bucket, Key=self._full(key)))

    async def stat(self, key: str) -> ObjectInfo:
        return ObjectInfo(key, (await self._head(key))["ContentLength"])

    async def _list_raw(self, prefix: str) -> AsyncIterator[dict[str, Any]]:
        """The listing's entries (Key relative to the prefix, Size, ETag, StorageClass)."""
        if prefix.startswith("/") or ".." in prefix.split("/"):
            raise ConfigError(f"invalid prefix {prefix!r}")
        full = self.prefix + prefix
        token: str | None = None
        while True:
            kw = {"ContinuationToken": token} if token else {}
            page = await self._call("ListObjectsV2", f"listing {prefix or 'the repository'}",
                                    lambda c: c.list_objects_v2(Bucket=self.bucket, Prefix=full, **kw))
            for o in page.get("Contents", []):
                yield {**o, "Key": o["Key"][len(self.prefix):]}
            if not page.get("IsTruncated"):
                break
            token = page.get("NextContinuationToken")

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:  # type: ignore[override]
        seen: dict[str, str] = {}
        async for o in self._list_raw(prefix):
            key = o["Key"]
            if key.startswith(CACHED_PREFIXES):
                seen[key] = o.get("ETag", "")
            yield ObjectInfo(key, o["Size"])
        # the listing is the truth for what it covered: forget and uncache the rest
        for cached in CACHED_PREFIXES:
            if cached.startswith(prefix) or prefix.startswith(cached):
                for k in [k for k in self._etags if k.startswith(prefix) and k.startswith(cached)]:
                    if k not in seen:
                        del self._etags[k]
                self._etags.update({k: v for k, v in seen.items() if k.startswith(cached)})
                if self._cache is not None and cached.startswith(prefix):
                    await anyio.to_thread.run_sync(self._cache.prune, cached,
                                                   {k: v for k, v in seen.items() if k.startswith(cached)})

    # -- writes --------------------------------------------------------------------------------

    async def put(self, key: str, data: bytes | Sequence[bytes], *, exclusive: bool = False,
                  content_md5: str | None = None) -> None:
        """Write one object (``data`` may be a list of pieces, joined into the body). Bodies
        go with a Content-MD5 header, which the server checks, and an unsigned payload hash
        (the client's ``payload_signing_enabled`` is off): the MD5 (``content_md5``, base64,
        when the caller has it) is computed in a worker thread and is part of the signed
        headers, where botocore would otherwise SHA-256 the whole body on the event loop of
        every request over plain HTTP."""
        full = self._full(key)
        body, md5 = await _body([data] if isinstance(data, (bytes, bytearray, memoryview)) else data, content_md5)
        attempts = 0

        async def send(c: Any) -> dict[str, Any]:
            nonlocal attempts
            attempts += 1
            kw = {"IfNoneMatch": "*"} if exclusive else {}
            return await c.put_object(Bucket=self.bucket, Key=full, Body=body, ContentMD5=md5, **kw)

        try:
            resp = await self._call("PutObject", f"writing {key}", send)
        except KeyExistsError:
            # a retried exclusive put may find its own first attempt, which did land
            if attempts > 1 and await self._same(key, bytes(body)):
                return
            raise KeyExistsError(f"{key} exists") from None
        self._wrote_at = anyio.current_time()
        if key.startswith(CACHED_PREFIXES) and (etag := resp.get("ETag")):
            self._etags[key] = etag
            if self._cache is not None:
                await self._cache.write(key, etag, bytes(body))

    async def _same(self, key: str, data: bytes) -> bool:
        try:
            return (await self._get_object(key, None, f"reading {key}"))[0] == data
        except NotFoundError:
            return False

    async def open_upload(self, key: str) -> S3Upload:
        self._full(key)
        return S3Upload(self, key)

    async def _abort_upload(self, key: str, upload_id: str) -> None:
        def gone(exc: BaseException) -> bool | None:
            return True if _code(exc)[0] in ("NoSuchUpload", "404") else None

        await self._call("AbortMultipartUpload", f"aborting the upload of {key}",
                         lambda c: _true(c.abort_multipart_upload(Bucket=self.bucket, Key=self._full(key),
                                                                  UploadId=upload_id)), ok=gone)

    async def incomplete_uploads(self) -> list[tuple[str, str, dt.datetime]]:
        """(key, upload id, initiated) of every multipart upload under the prefix not completed."""
        out = []
        kw: dict[str, Any] = {}
        while True:
            page = await self._call("ListMultipartUploads", "listing incomplete uploads",
                                    lambda c: c.list_multipart_uploads(Bucket=self.bucket, Prefix=self.prefix, **kw))
            for u in page.get("Uploads", []):
                out.append((u["Key"][len(self.prefix):], u["UploadId"], u["Initiated"]))
            if not page.get("IsTruncated"):
                return out
            kw = {"KeyMarker": page.get("NextKeyMarker"), "UploadIdMarker": page.get("NextUploadIdMarker")}

    async def abort_incomplete_uploads(self, *, older_than: float | None = None) -> int:
        """Abort the multipart uploads left under the prefix (by writers that died), or only
        those initiated more than ``older_than`` seconds ago. The caller holds the writer lock,
        so no other writer of points has one open; see RepositoryStore.lock."""
        now = dt.datetime.now(dt.timezone.utc)
        n = 0
        for key, upload_id, initiated in await self.incomplete_uploads():
            if older_than is not None and (now - initiated).total_seconds() < older_than:
                continue
            await self._abort_upload(key, upload_id)
            n += 1
        if n:
            self.log.warning("s3_stale_uploads_aborted", count=n)
        return n

    async def delete(self, key: str) -> None:
        """Remove the object; in a versioned bucket every version of it (a plain delete there
        would only hide it behind a delete marker and free nothing). A version under object lock
        raises ImmutableError."""
        full = self._full(key)
        if not self.versioned:
            # the first delete tells whether the bucket is versioned without asking: there a
            # plain delete only adds a delete marker (and says so), which the version sweep
            # below removes with the rest. (A bucket with object lock is known versioned from
            # the start, so a locked object never gets a marker hiding it.)
            resp = await self._call("DeleteObject", f"deleting {key}",
                                    lambda c: c.delete_object(Bucket=self.bucket, Key=full))
            if not resp.get("DeleteMarker"):
                self.versioned = False
                self._forget(key)
                return
            self.versioned = True
        versions: list[dict[str, str]] = []
        kw: dict[str, Any] = {}
        while True:
            page = await self._call("ListObjectVersions", f"listing the versions of {key}",
                                    lambda c: c.list_object_versions(Bucket=self.bucket, Prefix=full, **kw))
            for v in page.get("Versions", []) + page.get("DeleteMarkers", []):
                if v["Key"] == full:
                    versions.append({"Key": full, "VersionId": v["VersionId"]})
            if not page.get("IsTruncated"):
                break
            kw = {"KeyMarker": page.get("NextKeyMarker"), "VersionIdMarker": page.get("NextVersionIdMarker")}
        for i in range(0, len(versions), 1000):
            resp = await self._call("DeleteObjects", f"deleting {key}",
                                    lambda c: c.delete_objects(Bucket=self.bucket, Delete={
                                        "Objects": versions[i:i + 1000], "Quiet": True}))
            errors = resp.get("Errors", [])
            if errors:
                e = errors[0]
                if e.get("Code") in _DENIED:
                    until = await self.locked_until(key)
                    raise ImmutableError(f"{key} is under S3 object lock" + (f" until {until}" if until else "")
                                         + "; the server refuses to delete it")
                raise RepositoryError(f"deleting {key}: S3 error {e.get('Code')}: {e.get('Message')}")
        self._forget(key)

    def _forget(self, key: str) -> None:
        self._etags.pop(key, None)

    # -- object lock ---------------------------------------------------------------------------

    async def protect(self, key: str, until: str) -> bool:
        """Put the object under retention (``lock_mode``) until ``until`` (ISO 8601). A later
        retention already set is kept. False when the bucket has no object lock."""
        if not self.object_lock:
            return False
        when = dt.datetime.fromisoformat(until)
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)

        def shorter(exc: BaseException) -> bool | None:
            return False if _code(exc)[0] in _DENIED | {"InvalidRequest", "InvalidArgument"} else None

        done = await self._call("PutObjectRetention", f"locking {key}",
                                lambda c: _true(c.put_object_retention(
                                    Bucket=self.bucket, Key=self._full(key),
                                    Retention={"Mode": self.settings.lock_mode, "RetainUntilDate": when})),
                                ok=shorter)
        if done:
            return True
        # refused: retention cannot be shortened; fine if what is set already lasts long enough
        current = await self.locked_until(key)
        if current is not None and dt.datetime.fromisoformat(current) >= when:
            return True
        raise RepositoryError(f"locking {key}: the server refused retention until {until}")

    async def unprotect(self, key: str) -> bool:
        """Retention ends by itself at its date (COMPLIANCE cannot be lifted): nothing to do."""
        return False

    async def locked_until(self, key: str) -> str | None:
        """The object's retention date (ISO 8601) if it is in the future, else None."""
        if not self.object_lock:
            return None
        try:
            head = await self._head(key)
        except NotFoundError:
            return None
        until = head.get("ObjectLockRetainUntilDate")
        if until is None or until <= dt.datetime.now(dt.timezone.utc):
            return None
        return until.isoformat()

    # -- archive tier --------------------------------------------------------------------------

    async def storage_class(self, key: str) -> str:
        return (await self._head(key)).get("StorageClass") or "STANDARD"

    async def set_storage_class(self, key: str, storage_class: str) -> bool:
        """Move the object to ``storage_class`` (a copy onto itself). False if it is there already."""
        if await self.storage_class(key) == storage_class:
            return False
        full = self._full(key)
        await self._call("CopyObject", f"moving {key} to {storage_class}",
                         lambda c: c.copy_object(Bucket=self.bucket, Key=full, StorageClass=storage_class,
                                                 CopySource={"Bucket": self.bucket, "Key": full},
                                                 MetadataDirective="COPY"))
        return True

    async def storage_classes(self, prefix: str) -> dict[str, str]:
        """``{key: storage class}`` of the objects under ``prefix``, from one listing."""
        return {o["Key"]: o.get("StorageClass") or "STANDARD" async for o in self._list_raw(prefix)}

    def _needs_restore(self, storage_class: str) -> bool:
        return storage_class.upper() in {c.strip().upper() for c in self.settings.restore_classes.split(",") if c.strip()}

    async def prepare_read(self, keys: Sequence[str], progress: Callable[[str], None] | None = None) -> int:
        """Before reading ``keys``: request every one of them that sits in an archive storage
        class back at once (RestoreObject), then wait until all are readable, reporting progress.
        Returns how many had to be restored. One listing when none is archived."""
        wanted = set(keys)
        classes = await self.storage_classes("packs/") if any(k.startswith("packs/") for k in wanted) else {}
        archived = sorted(k for k in wanted if self._needs_restore(classes.get(k, "STANDARD")))
        if not archived:
            return 0
        say = progress or self.restore_progress
        started = anyio.current_time()
        self.log.warning("s3_archive_restore_requested", objects=len(archived), tier=self.settings.restore_tier)
        if say is not None:
            say(f"{len(archived)} pack(s) are in the archive tier: requesting them back "
                f"({self.settings.restore_tier} retrieval; this takes minutes to hours on AWS)")
        for key in archived:
            await self._request_restore(key)
        pending = list(archived)
        while pending:
            pending = [k for k in pending if not await self._restored(k)]
            if not pending:
                break
            waited = anyio.current_time() - started
            self.log.warning("s3_waiting_for_archive_restore", restored=len(archived) - len(pending),
                             total=len(archived), waited=round(waited))
            if say is not None:
                say(f"waiting for the archive tier: {len(archived) - len(pending)} of {len(archived)} pack(s) "
                    f"restored after {waited:.0f} s")
            if waited > self.settings.restore_wait:
                raise ArchivedError(f"{len(pending)} pack(s) still being restored from the archive tier after "
                                    f"{waited:.0f} s (the requests stand); run the command again later")
            await anyio.sleep(self.settings.restore_poll)
        if say is not None:
            say(f"{len(archived)} pack(s) restored from the archive tier")
        return len(archived)

    async def _request_restore(self, key: str) -> None:
        s = self.settings

        def in_progress(exc: BaseException) -> bool | None:
            return True if _code(exc)[0] == "RestoreAlreadyInProgress" else None

        await self._call("RestoreObject", f"requesting {key} back from the archive tier",
                         lambda c: _true(c.restore_object(Bucket=self.bucket, Key=self._full(key), RestoreRequest={
                             "Days": s.restore_days, "GlacierJobParameters": {"Tier": s.restore_tier}})),
                         ok=in_progress)

    async def _restored(self, key: str) -> bool:
        return 'ongoing-request="false"' in (await self._head(key)).get("Restore", "")

    async def _restore(self, key: str) -> None:
        """Bring an archived object back (RestoreObject), then wait until it is readable, saying
        so (log event and ``restore_progress``) every poll."""
        s = self.settings
        await self._request_restore(key)
        started = anyio.current_time()
        while True:
            if await self._restored(key):
                self.log.info("s3_restored_from_archive", key=key)
                return
            waited = anyio.current_time() - started
            msg = (f"{key} is in the archive tier: restore requested ({s.restore_tier}), waiting "
                   f"{waited:.0f} s so far (archive retrievals take minutes to hours)")
            self.log.warning("s3_waiting_for_archive_restore", key=key, waited=round(waited), tier=s.restore_tier)
            if self.restore_progress is not None:
                self.restore_progress(msg)
            if waited > s.restore_wait:
                raise ArchivedError(f"{key}: still being restored from the archive tier after {waited:.0f} s; "
                                    "run the command again later")
            await anyio.sleep(s.restore_poll)

    # -- health --------------------------------------------------------------------------------

    async def check_writable(self) -> None:
        """A probe object written and deleted (two requests in an unversioned bucket), unless this backend wrote successfully in the last
        ``WRITE_PROOF_SECONDS``: that write is the proof, and object storage bills requests.
        A backup checks each disk's repository before its task, so a fleet's second disk onward
        costs nothing."""
        if self._wrote_at is not None and anyio.current_time() - self._wrote_at < WRITE_PROOF_SECONDS:
            return
        key = f"locks/probe-{os.urandom(8).hex()}"
        await self.put(key, b"probe")
        await self.delete(key)

    async def free_space(self) -> int | None:
        return None

    async def aclose(self) -> None:
        await self._stack.aclose()


async def _true(aw: Awaitable[Any]) -> bool:
    await aw
    return True


def require_asyncio() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise ConfigError("the s3 backend runs on asyncio only (it is built on aiobotocore); "
                          "run blockferry on asyncio, the default") from None


class S3BackendPlugin:
    scheme = "s3"

    async def open(self, url: str, options: Mapping[str, Any]) -> S3Backend:
        require_asyncio()
        backend = S3Backend(url, load_settings(options))
        try:
            await backend._connect()
            await backend._setup()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await backend.aclose()
            raise
        return backend
