"""The AWS side of the ``aws`` plugins: settings, the aiobotocore clients, and the one place where
requests are bounded, retried and their errors translated (:meth:`AwsClients.call`).

Built on aiobotocore, so it runs on **asyncio only** (opening a disk under trio raises a
ConfigError that says so, as the s3 backend does). Credentials come from botocore's standard
chain (environment, shared files and profiles, container and instance roles); they are never
logged or put in an error message, and the settings hold no secret at all (only a profile name).

botocore's own retries are turned off so that the policy is this one, counted and logged:
throttling (``RequestLimitExceeded``, ``ThrottlingException``...), 5xx answers, timeouts and
dropped connections are retried with exponential backoff and full jitter, ``retries`` times.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import anyio
import msgspec
from blockferry.errors import BlockferryError, ConfigError, SourceError
from blockferry.log import get_logger
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError, NoCredentialsError, PartialCredentialsError
from botocore.exceptions import ConnectionError as BotoConnectionError

log = get_logger(component="aws")
T = TypeVar("T")
_ENV_PREFIX = "BLOCKFERRY_AWS_"
#: retries of one request from this one on are logged as warnings (the earlier ones as info)
_WARN_FROM_RETRY = 3


class AwsSettings(msgspec.Struct, kw_only=True):
    """How to reach AWS and how hard to push it. Each field comes from the source options (job
    settings), else from ``BLOCKFERRY_AWS_<FIELD>`` in the environment, else the default.
    Credentials and the default endpoint come from botocore's usual places."""

    #: one endpoint for EC2 and the EBS direct APIs (a test server, a proxy); default: AWS's
    endpoint_url: str | None = None
    #: a profile of ~/.aws/config (default: botocore's chain: environment, profile, role)
    profile: str | None = None
    #: requests in flight at once per disk (GetSnapshotBlock calls; also the connection pool)
    max_requests: int = 32
    #: attempts after the first for a transient failure (throttling, 5xx, timeouts, a bad checksum)
    retries: int = 8
    #: first backoff (seconds); doubles per attempt, capped at backoff_max, full jitter
    backoff_base: float = 0.1
    backoff_max: float = 10.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    #: how long to wait for a snapshot blockferry created to complete (seconds)
    snapshot_timeout: float = 6 * 3600.0
    #: first wait between two looks at a pending snapshot (seconds); grows to 30
    poll_interval: float = 2.0
    #: the snapshot chain a volume's backups keep (tagged): one per job and repository backing
    #: up the same volume, so that one chain's cleanup never deletes another's base
    chain: str = "default"


def load_settings(options: Mapping[str, Any]) -> AwsSettings:
    """Settings from ``options`` (unknown keys ignored), then the environment, then defaults."""
    values: dict[str, Any] = {}
    for name in AwsSettings.__struct_fields__:
        if options.get(name) is not None:
            values[name] = options[name]
        elif (env := os.environ.get(_ENV_PREFIX + name.upper())) is not None:
            values[name] = env
    try:
        s = msgspec.convert(values, AwsSettings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"aws settings: {exc}") from None
    if s.max_requests < 1 or s.retries < 0:
        raise ConfigError("aws max_requests must be at least 1 and retries at least 0")
    if not s.chain or len(s.chain) > 128:
        raise ConfigError("aws chain must be a name of 1 to 128 characters")
    return s


def require_asyncio(what: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise ConfigError(f"the {what} runs on asyncio only (it is built on aiobotocore); "
                          "run blockferry on asyncio, the default") from None


# -- errors --------------------------------------------------------------------------------------

_RETRY_CODES = {"RequestLimitExceeded", "Throttling", "ThrottlingException", "TooManyRequestsException",
                "InternalError", "InternalServerError", "InternalServerException", "ServiceUnavailable",
                "ServiceUnavailableException", "Unavailable", "RequestTimeout", "RequestTimeoutException",
                "RequestThrottledException", "ConcurrentLimitExceededException", "SlowDown"}
_NOT_FOUND = {"InvalidSnapshot.NotFound", "InvalidVolume.NotFound", "ResourceNotFoundException",
              "InvalidSnapshotID.Malformed", "InvalidVolumeID.Malformed", "InvalidInstanceID.NotFound",
              "InvalidInstanceID.Malformed"}
_DENIED = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "AuthFailure",
           "InvalidClientTokenId", "SignatureDoesNotMatch", "ExpiredToken", "ExpiredTokenException",
           "UnrecognizedClientException", "OptInRequired", "Blocked"}


class AwsNotFoundError(SourceError):
    """AWS says the volume or snapshot does not exist."""


def error_code(exc: BaseException) -> tuple[str, int]:
    resp = getattr(exc, "response", None) or {}
    code = str(resp.get("Error", {}).get("Code", ""))
    status = int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def retryable(exc: BaseException) -> bool:
    if isinstance(exc, BlockferryError):
        return exc.transient
    if isinstance(exc, ClientError):
        code, status = error_code(exc)
        return code in _RETRY_CODES or status in (429, 500, 502, 503, 504)
    if isinstance(exc, (BotoConnectionError, HTTPClientError, asyncio.TimeoutError)):
        return True
    # a body cut short, a connection closed by the server (aiohttp comes with aiobotocore)
    aiohttp = sys.modules.get("aiohttp")
    return aiohttp is not None and isinstance(exc, (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError))


def translate(exc: BaseException, what: str) -> BlockferryError:
    """An engine error for a foreign one; ``what`` names the disk and the request."""
    if isinstance(exc, BlockferryError):
        return exc
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return ConfigError("no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                           "AWS_PROFILE, or run where an instance or task role applies")
    if isinstance(exc, ClientError):
        code, status = error_code(exc)
        msg = exc.response.get("Error", {}).get("Message") or code or f"HTTP {status}"
        if code in _NOT_FOUND or status == 404:
            return AwsNotFoundError(f"{what}: not found ({msg})")
        if code in _DENIED or status == 403:
            return SourceError(f"{what}: denied by AWS ({code or status}); check the credentials and the IAM "
                               "policy (docs/aws.md lists the permissions)")
        err = SourceError(f"{what}: AWS error {code or status}: {msg}")
        err.transient = retryable(exc)
        return err
    err = SourceError(f"{what}: {type(exc).__name__}: {exc}")
    err.transient = retryable(exc)
    return err


# -- clients -------------------------------------------------------------------------------------


def _new_session(profile: str | None) -> Any:
    """An aiobotocore session (a real optional dependency, imported here: about 200 ms of
    imports, which this runs in a worker thread, as the s3 backend does)."""
    from aiobotocore.session import AioSession

    return AioSession(profile=profile)


class AwsClients:
    """The EC2 and EBS clients of one region, and :meth:`call`. An async context manager."""

    def __init__(self, region: str, settings: AwsSettings) -> None:
        self.region = region
        self.settings = settings
        self.ec2: Any = None
        self.ebs: Any = None
        #: requests retried, by error code (the session shows them)
        self.retried = 0
        self._limit = anyio.Semaphore(settings.max_requests)
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> AwsClients:
        s = self.settings
        try:
            session = await anyio.to_thread.run_sync(_new_session, s.profile)
            config = Config(region_name=self.region, connect_timeout=s.connect_timeout, read_timeout=s.read_timeout,
                            max_pool_connections=s.max_requests, retries={"max_attempts": 0, "mode": "standard"})
            self.ec2 = await self._stack.enter_async_context(
                session.create_client("ec2", endpoint_url=s.endpoint_url, config=config))
            self.ebs = await self._stack.enter_async_context(
                session.create_client("ebs", endpoint_url=s.endpoint_url, config=config))
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._stack.aclose()
            if isinstance(exc, Exception):
                raise translate(exc, f"aws {self.region}") from None
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """``await fn()`` within the request limit, retried while the failure is transient; any
        failure comes out as an engine error naming ``what``."""
        s = self.settings
        for attempt in range(s.retries + 1):
            try:
                async with self._limit:
                    return await fn()
            except Exception as exc:
                if attempt == s.retries or not retryable(exc):
                    raise translate(exc, what) from None
                code = error_code(exc)[0] or type(exc).__name__
                self.retried += 1
                delay = random.uniform(0, min(s.backoff_max, s.backoff_base * (2 ** attempt)))
                (log.warning if attempt + 1 >= _WARN_FROM_RETRY else log.info)(
                    "aws_retry", what=what, error=code, attempt=attempt + 1, delay=round(delay, 3))
                await anyio.sleep(delay)
        raise AssertionError("unreachable")
