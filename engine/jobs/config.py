"""Configuration of the backup server and of jobs, as msgspec structs.

Everything validates on construction from untrusted data (:func:`load`), and a refusal names the
field: ``ConfigError: proxies[1].max_tasks: Expected `int` >= 1``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import Annotated, Any, TypeVar

import msgspec
import msgspec.inspect as mi
from blockferry.datapath.source import Expands
from blockferry.errors import BlockferryError, ConfigError
from blockferry.registry import source_plugin
from blockferry.repo.retention import RetentionPolicy
from blockferry.runtime.settings import EngineSettings
from blockferry.units import MiB, NonNegative, Positive, Seconds

_NAME_PATTERN = r"^[^\x00-\x1f/]+$"
#: a name of a proxy, repository, job, object or disk: no control characters (a newline would
#: forge lines in listings and logs) and no '/'
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=_NAME_PATTERN)]
#: days a point stays immutable: at least one, at most a hundred years (a date must stay a date)
Days = Annotated[int, msgspec.Meta(ge=1, le=36500)]


#: in a proxy's ``transports``: every source scheme (the embedded API's in-process proxy)
ANY_TRANSPORT = "*"


class ProxyConfig(msgspec.Struct, frozen=True, kw_only=True):
    """A proxy: where source movers run, how many at once, what they can reach."""

    name: Name
    max_tasks: Positive = 4
    #: source URL schemes this proxy can read (``file``, ``qemu``...; ``*`` for all)
    transports: list[str] = msgspec.field(default_factory=lambda: ["file"])
    #: path or URL prefixes this proxy can reach; empty means everything its transports can
    reach: list[str] = msgspec.field(default_factory=list)

    def can_reach(self, url: str, scheme: str) -> bool:
        if scheme not in self.transports and ANY_TRANSPORT not in self.transports:
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
    immutable_days: Days | None = None
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


def validated(obj: T, where: str = "") -> T:
    """``obj`` (a configuration struct built in code) checked against the constraints of its own
    annotations, as :func:`load` checks data: msgspec checks them only while decoding or
    converting, and a struct built directly with ``max_tasks=0`` would otherwise reach the
    scheduler and wait forever for a slot. ConfigError names the field."""
    _check(obj, mi.type_info(type(obj)), where)
    return obj


def _check(value: Any, info: mi.Type, where: str) -> None:
    if isinstance(info, mi.UnionType):
        if value is None and any(isinstance(t, mi.NoneType) for t in info.types):
            return
        for t in info.types:
            if _kind_of(value, t):
                _check(value, t, where)
                return
        return  # not a member type: msgspec's own type checks are not repeated here
    if isinstance(info, mi.StructType) and isinstance(value, msgspec.Struct):
        for f in info.fields:
            _check(getattr(value, f.name), f.type, f"{where}.{f.name}" if where else f.name)
    elif isinstance(info, (mi.IntType, mi.FloatType)) and isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, not {value}")
        for bound, ok, text in ((info.ge, lambda b: value >= b, ">="), (info.gt, lambda b: value > b, ">"),
                                (info.le, lambda b: value <= b, "<="), (info.lt, lambda b: value < b, "<")):
            if bound is not None and not ok(bound):
                raise ConfigError(f"{where}: expected a number {text} {bound}, not {value}")
    elif isinstance(info, mi.StrType) and isinstance(value, str):
        if info.min_length is not None and len(value) < info.min_length:
            raise ConfigError(f"{where}: expected at least {info.min_length} character(s)")
        if info.max_length is not None and len(value) > info.max_length:
            raise ConfigError(f"{where}: expected at most {info.max_length} characters")
        if info.pattern is not None and not re.search(info.pattern, value):
            if info.pattern == _NAME_PATTERN:
                raise ConfigError(f"{where}: {value!r} is not allowed (no control characters such as a newline, "
                                  "no '/')")
            raise ConfigError(f"{where}: {value!r} does not match {info.pattern!r}")
    elif isinstance(info, mi.ListType) and isinstance(value, list):
        if info.min_length is not None and len(value) < info.min_length:
            raise ConfigError(f"{where}: expected at least {info.min_length} item(s)")
        for i, item in enumerate(value):
            _check(item, info.item_type, f"{where}[{i}]")


def _kind_of(value: Any, info: mi.Type) -> bool:
    if isinstance(info, mi.StructType):
        return isinstance(value, info.cls)
    if isinstance(info, mi.IntType):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(info, mi.FloatType):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(info, mi.StrType):
        return isinstance(value, str)
    return isinstance(info, mi.ListType) and isinstance(value, list)


async def expand_disks(disks: Sequence[DiskSpec], *, strict: bool = False) -> list[DiskSpec]:
    """Each disk spec whose source stands for several disks, as one spec per disk (through the
    plugin's optional :class:`~blockferry.datapath.source.Expands`); specs with a name or hints
    stay as they are. A source that cannot be expanded now (a VM not running) also stays, so
    opening it fails in its task, where retries apply; with ``strict`` its error is raised
    instead (a caller that would open it right away would only wait for the same failure again:
    a QMP timeout of 30 s would take 60)."""
    out: list[DiskSpec] = []
    for d in disks:
        plugin = source_plugin(d.source)
        urls = [d.source]
        if isinstance(plugin, Expands) and d.name is None and not d.hints:
            try:
                urls = await plugin.expand(d.source)
            except BlockferryError:
                if strict:
                    raise
        out.extend([d] if urls == [d.source] else [DiskSpec(source=u, options=d.options) for u in urls])
    return out
