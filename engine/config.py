"""Configuration of the backup server and of jobs, as msgspec structs.

Everything validates on construction from untrusted data (:func:`load`), and a refusal names the
field: ``ConfigError: proxies[1].max_tasks: Expected `int` >= 1``.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, TypeVar

import msgspec

from .errors import ConfigError
from .format import MiB
from .retention import RetentionPolicy

Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Seconds = Annotated[float, msgspec.Meta(ge=0)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f/]+$")]


class ProxyConfig(msgspec.Struct, frozen=True, kw_only=True):
    """A proxy: where source movers run, how many at once, what they can reach."""

    name: Name
    max_tasks: Positive = 4
    #: source URL schemes this proxy can read (``file``, ``qemu``...)
    transports: list[str] = msgspec.field(default_factory=lambda: ["file"])
    #: path or URL prefixes this proxy can reach; empty means everything its transports can
    reach: list[str] = msgspec.field(default_factory=list)

    def can_reach(self, url: str, scheme: str) -> bool:
        if scheme not in self.transports:
            return False
        if not self.reach:
            return True
        target = url if scheme != "file" else os.path.abspath(url.removeprefix("file://"))
        return any(target == r or target.startswith(r.rstrip("/") + "/") for r in self.reach)


class RepositorySettings(msgspec.Struct, frozen=True, kw_only=True):
    """A repository as the server uses it: where it is and how hard to push it."""

    name: Name
    url: str
    max_tasks: Positive = 4
    #: the availability check refuses a task when less than this is free (bytes)
    min_free_bytes: NonNegative = 256 * MiB
    #: options for the backend plugin (for s3: endpoint, region, limits... see docs/s3.md)
    options: dict[str, Any] = msgspec.field(default_factory=dict)


class EngineSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Knobs of the data path. The defaults were measured (docs/performance.md)."""

    #: parallel read/process lanes per task
    lanes: Positive = 2
    #: bytes of blocks per batch (at least one block)
    batch_bytes: Positive = 8 * MiB
    #: batches buffered between a source mover and its target mover
    stream_batches: Positive = 2
    #: batches read but not yet written, across all tasks of the server: the memory bound of
    #: the data path (about this many times batch_bytes), whatever the number of tasks
    inflight_batches: Positive = 8
    #: restore: bytes of blocks decoded per batch (across the disks restored together), and
    #: batches in progress; larger writes keep the disk busier
    restore_batch_bytes: Positive = 16 * MiB
    restore_lanes: Positive = 6
    #: restore from a remote repository (S3): the chunks the point needs from each pack are read
    #: as spans planned over the whole point, one request each: at most restore_span_bytes of
    #: them held at once, unneeded gaps up to restore_span_gap bytes read rather than split,
    #: restore_span_streams read ahead at once; batches there are restore_remote_batch_bytes
    #: (the spans, not the batches, decide the requests, and smaller batches hold less)
    restore_span_bytes: Positive = 128 * MiB
    restore_span_gap: NonNegative = 8 * MiB
    restore_span_streams: Positive = 3
    #: spans that would not fit restore_span_bytes alongside the others needed at the same time
    #: (those needed again furthest ahead) wait in a temporary spool file beside the restored
    #: images rather than in memory, up to restore_spool_bytes (0: never)
    restore_spool_bytes: NonNegative = 4096 * MiB
    restore_remote_batch_bytes: Positive = 4 * MiB
    #: a backup with changed-extent hints into a remote repository compresses the hinted blocks
    #: while the repository opens, holding at most this many bytes of them (0: never; see
    #: engine/prepare.py)
    prepare_bytes: NonNegative = 64 * MiB
    #: worker threads hashing and compressing (0: one per core)
    cpu_threads: NonNegative = 0
    #: worker threads doing repository I/O
    io_threads: Positive = 4
    #: mailbox bound of every actor
    mailbox_size: Positive = 64
    #: seconds an actor waits for a reply before giving up
    ask_timeout: Seconds = 60.0


class ServerConfig(msgspec.Struct, frozen=True, kw_only=True):
    proxies: list[ProxyConfig] = msgspec.field(default_factory=lambda: [ProxyConfig(name="local")])
    repositories: list[RepositorySettings] = msgspec.field(default_factory=list)
    engine: EngineSettings = msgspec.field(default_factory=EngineSettings)

    def __post_init__(self) -> None:
        for kind, items in (("proxy", self.proxies), ("repository", self.repositories)):
            names = [i.name for i in items]
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ConfigError(f"{kind} names must be unique: {', '.join(sorted(dup))}")


class DiskSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One disk of an object: where to read it and, optionally, what changed."""

    source: str
    #: name in the restore point (default: the source's own, e.g. the file name)
    name: Name | None = None
    #: changed-extent hint file (``OFFSET LENGTH`` lines or ``rbd diff`` JSON)
    hints: str | None = None
    options: dict[str, Any] = msgspec.field(default_factory=dict)


class ObjectSpec(msgspec.Struct, frozen=True, kw_only=True):
    """An object (a VM): its disks, backed up together into one restore point per run."""

    name: Name
    disks: Annotated[list[DiskSpec], msgspec.Meta(min_length=1)]


class CopyTarget(msgspec.Struct, frozen=True, kw_only=True):
    """Backup copy: where a job's points also go. Immediate mode (``every_hours`` unset) copies
    each new point right after the job; periodic mode copies the latest point of each of the
    job's objects every ``every_hours`` (run by the daemon's scheduler). The copy keeps its own
    ``retention``."""

    url: str
    retention: RetentionPolicy | None = None
    every_hours: Annotated[float, msgspec.Meta(gt=0)] | None = None


class JobSpec(msgspec.Struct, frozen=True, kw_only=True):
    name: Name
    #: repository name (as configured) or URL
    repository: str
    objects: Annotated[list[ObjectSpec], msgspec.Meta(min_length=1)]
    #: attempts after the first for an object that failed with a transient error
    retries: NonNegative = 3
    retry_delay: Seconds = 10.0
    #: at most this many of the job's tasks at once (None: only proxy and repository limits)
    max_tasks: Positive | None = None
    #: restore points of this job stay immutable this many days (the repository's own setting,
    #: if longer, wins)
    immutable_days: Positive | None = None
    #: applied to the job's objects after each successful run (None: keep everything)
    retention: RetentionPolicy | None = None
    #: repositories each new point is copied to right after it is made, with their retention
    copy_to: list[CopyTarget] = msgspec.field(default_factory=list)


T = TypeVar("T")


def load(data: Any, kind: type[T]) -> T:
    """Validate plain data (from TOML, JSON, the socket) into ``kind``; ConfigError names the
    field at fault."""
    try:
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc).replace("$.", "")) from None
