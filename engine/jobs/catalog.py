"""The daemon's configuration: repositories, proxies, sources and jobs, validated as a whole.

A :class:`Catalog` is what the state database holds and what a TOML seed file or a
``config.apply`` request describes. Jobs keep the engine's :class:`~blockferry.jobs.config.JobSpec`
untouched (objects in order, repository, retries, parallelism...) and add the daemon's own
settings (:class:`JobSettings`: schedule, window, throttle...). On the wire and in
TOML a job is one flat table; keys that JobSpec knows go to the spec, the others to the
settings, so fields added to JobSpec later flow through without a change here.

Every refusal is a :class:`~blockferry.errors.FieldError` naming the field and the reason
(``jobs[1].schedule: unknown weekday in 'mo'``).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import msgspec.inspect as mi
from blockferry.errors import ConfigError, FieldError
from blockferry.jobs.calendars import parse_schedule, parse_window
from blockferry.jobs.config import JobSpec, Name, ProxyConfig, RepositorySettings
from blockferry.registry import source_plugin
from blockferry.repo.format import COMPRESSION_LEVELS, DEFAULT_BLOCK_SIZE, check_block_size
from blockferry.repo.retention import RetentionPolicy
from blockferry.units import Positive, Seconds, parse_size

Rate = Annotated[int, msgspec.Meta(ge=0)]  #: bytes per second; 0 means unlimited

T = TypeVar("T")


class SourceConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A named source with its connection settings. A job's disk whose ``source`` is this name
    reads ``url`` with ``options`` (the disk's own options win)."""

    name: Name
    url: str
    options: dict[str, Any] = msgspec.field(default_factory=dict)


class JobSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the daemon adds to a job spec."""

    #: see blockferry.jobs.calendars: "daily 22:00", "mon-fri 22:00", "every 4h", "after JOB"; None: manual only
    schedule: str | None = None
    #: scheduled and chained runs start only inside it and are stopped when it closes
    window: str | None = None
    #: a disabled job is never started by the scheduler (a manual run still works)
    enabled: bool = True
    #: bytes per second for the whole job (0: unlimited), shared by its tasks
    throttle: Rate = 0
    #: when the daemon was down at scheduled times, run once on start
    run_missed: bool = True
    description: str = ""


#: what a job does: a backup (the default), or one of the repository lifecycle operations
JOB_TYPES = ("backup", "prune", "gc", "verify", "copy")
LifecycleType = Literal["prune", "gc", "verify", "copy"]


class LifecycleSpec(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """A job that runs a repository lifecycle operation (docs/lifecycle.md) on a configured
    repository instead of a backup. Each type takes only its own fields (see :data:`TYPE_FIELDS`):

    * ``prune``: ``retention`` (required), ``objects`` (only these objects' points);
    * ``gc``: ``rewrite_threshold`` (0.5), ``wait`` (seconds to wait for earlier sessions, else
      the sweep is deferred to the next run);
    * ``verify``: ``sample`` (percent of the chunks; None: all of them);
    * ``copy``: ``to`` (the target repository URL, required), ``latest`` (only the newest point of
      each object; default: every point the target lacks), ``objects``, ``retention`` (the
      copy's own, applied in the target).
    """

    name: Name
    type: LifecycleType
    #: the configured repository it works on (a copy's source)
    repository: str
    retention: RetentionPolicy | None = None
    objects: list[Name] | None = None
    rewrite_threshold: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    wait: Seconds | None = None
    sample: Annotated[float, msgspec.Meta(gt=0, le=100)] | None = None
    to: str | None = None
    latest: bool = False


#: the fields each lifecycle job type takes, beyond name, type and repository
TYPE_FIELDS: dict[str, frozenset[str]] = {
    "prune": frozenset({"retention", "objects"}),
    "gc": frozenset({"rewrite_threshold", "wait"}),
    "verify": frozenset({"sample"}),
    "copy": frozenset({"to", "latest", "objects", "retention"}),
}
#: settings that only make sense for a backup job (a lifecycle job moves no source data)
_BACKUP_SETTINGS = frozenset({"throttle"})


class JobConfig(msgspec.Struct, frozen=True, kw_only=True):
    #: a backup job's JobSpec, or a lifecycle job's LifecycleSpec
    spec: JobSpec | LifecycleSpec
    settings: JobSettings = msgspec.field(default_factory=JobSettings)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def type(self) -> str:
        """backup, prune, gc, verify or copy."""
        return self.spec.type if isinstance(self.spec, LifecycleSpec) else "backup"

    @property
    def backup(self) -> JobSpec | None:
        """The JobSpec of a backup job, None for a lifecycle job."""
        return self.spec if isinstance(self.spec, JobSpec) else None


class RepositoryInit(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How ``repo add`` creates a repository where none exists (used once, not stored)."""

    create: bool = True
    block_size: Positive = DEFAULT_BLOCK_SIZE
    compression: str = "default"


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Daemon-wide settings kept in the database."""

    #: bytes per second across every running job (0: unlimited)
    throttle: Rate = 0


class Catalog(msgspec.Struct, frozen=True, kw_only=True):
    repositories: list[RepositorySettings] = msgspec.field(default_factory=list)
    proxies: list[ProxyConfig] = msgspec.field(default_factory=list)
    sources: list[SourceConfig] = msgspec.field(default_factory=list)
    jobs: list[JobConfig] = msgspec.field(default_factory=list)
    settings: Settings = msgspec.field(default_factory=Settings)


class Kind(msgspec.Struct, frozen=True):
    """One kind of configured item: its protocol name, its catalog list, its struct."""

    name: str  #: repo, proxy, source, job
    attr: str  #: the Catalog field
    noun: str  #: for messages


KINDS = {k.name: k for k in (Kind("repo", "repositories", "repository"), Kind("proxy", "proxies", "proxy"),
                             Kind("source", "sources", "source"), Kind("job", "jobs", "job"))}

#: keys that take a size ("10MiB") as well as a number of bytes
_SIZE_KEYS = frozenset({"throttle", "block_size", "min_free_bytes"})
_AT = re.compile(r"^(.*?)(?: - at `\$(.*)`)?$", re.S)


# -- converting plain data -----------------------------------------------------------------------


def _unknown_keys(data: Any, info: Any, path: str) -> None:
    """Refuse keys a struct does not have, at any depth: the engine's structs ignore them, and a
    typo (``max_task = 2``) silently ignored is a setting silently lost."""
    if isinstance(info, mi.UnionType):
        for t in info.types:
            if isinstance(t, (mi.StructType, mi.ListType)):
                _unknown_keys(data, t, path)
    elif isinstance(info, mi.ListType) and isinstance(data, list):
        for i, item in enumerate(data):
            _unknown_keys(item, info.item_type, f"{path}[{i}]")
    elif isinstance(info, mi.StructType) and isinstance(data, dict):
        fields = {f.encode_name: f for f in info.fields}
        for key, value in data.items():
            if key not in fields:
                raise FieldError(f"{path}.{key}" if path else str(key), "unknown field")
            _unknown_keys(value, fields[key].type, f"{path}.{key}" if path else key)


def convert(data: Any, kind: type[T], where: str = "") -> T:
    """``msgspec.convert`` with a FieldError naming the field (prefixed with ``where``); keys the
    struct does not know are refused too."""
    _unknown_keys(data, mi.type_info(kind), where)
    try:
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        m = _AT.match(str(exc))
        reason, path = (m.group(1), m.group(2) or "") if m else (str(exc), "")
        path = path.lstrip(".")
        field = f"{where}.{path}" if where and path and not path.startswith("[") else f"{where}{path}"
        unknown = re.match(r"Object contains unknown field `(.+)`", reason)
        if unknown:  # name the unknown key itself
            field, reason = (f"{field}.{unknown.group(1)}" if field else unknown.group(1)), "unknown field"
        raise FieldError(field, reason) from None
    except ConfigError as exc:  # a __post_init__ check
        raise FieldError(where, str(exc)) from None


def parse_sizes(data: Any, where: str) -> Any:
    """``data`` (a table) with its size settings (such as ``"4GiB"``) as numbers of bytes."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for k in _SIZE_KEYS & out.keys():
        if isinstance(out[k], str):
            try:
                out[k] = parse_size(out[k])
            except ConfigError as exc:
                raise FieldError(f"{where}.{k}" if where else k, str(exc)) from None
    return out


def _split(data: Any, base: type[Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a flat table into the keys ``base`` knows and the others."""
    if not isinstance(data, dict):
        raise FieldError(where, f"expected a table, not {type(data).__name__}")
    known = set(base.__struct_fields__)
    return {k: v for k, v in data.items() if k in known}, {k: v for k, v in data.items() if k not in known}


def _type_fields(data: dict[str, Any], kind: str, where: str) -> None:
    """Refuse a field that belongs to another job type, naming it and saying who takes it."""
    at = f"{where}." if where else ""
    own = TYPE_FIELDS.get(kind, frozenset())
    backup_only = (set(JobSpec.__struct_fields__) | _BACKUP_SETTINGS) - {"name", "repository"}
    for key in data:
        if key in own or key in ("name", "type", "repository"):
            continue
        takers = [t for t, fields in TYPE_FIELDS.items() if key in fields]
        if kind != "backup" and key in backup_only:
            takers = ["backup", *takers]
        elif kind == "backup" and key in backup_only:
            continue
        if takers:
            only = takers[0] if len(takers) == 1 else ", ".join(takers[:-1]) + " or " + takers[-1]
            raise FieldError(f"{at}{key}", f"a {kind} job does not take {key} (only {only} jobs do)")


def job_from_data(data: Any, where: str = "") -> JobConfig:
    data = parse_sizes(data, where)
    if not isinstance(data, dict):
        raise FieldError(where, f"expected a table, not {type(data).__name__}")
    kind = data.get("type", "backup")
    if kind not in JOB_TYPES:
        raise FieldError(f"{where}.type" if where else "type",
                         f"unknown job type {kind!r} (use {', '.join(JOB_TYPES)})")
    _type_fields(data, kind, where)
    if kind != "backup":
        spec_part, rest = _split(data, LifecycleSpec, where)
        settings = convert(rest, JobSettings, where)
        lspec = convert(spec_part, LifecycleSpec, where)
        _check_lifecycle(lspec, where)
        _check_job_fields(None, settings, where)
        return JobConfig(spec=lspec, settings=settings)
    data = {k: v for k, v in data.items() if k != "type"}
    spec_part, rest = _split(data, JobSpec, where)
    settings = convert(rest, JobSettings, where)
    spec = convert(spec_part, JobSpec, where)
    _check_job_fields(spec, settings, where)
    return JobConfig(spec=spec, settings=settings)


def repository_from_data(data: Any, where: str = "") -> tuple[RepositorySettings, RepositoryInit]:
    data = parse_sizes(data, where)
    base, rest = _split(data, RepositorySettings, where)
    init = convert(rest, RepositoryInit, where)
    try:
        check_block_size(init.block_size)
    except ConfigError as exc:
        raise FieldError(f"{where}.block_size" if where else "block_size", str(exc)) from None
    if init.compression not in COMPRESSION_LEVELS:
        raise FieldError(f"{where}.compression" if where else "compression",
                         f"unknown compression {init.compression!r} (use {', '.join(COMPRESSION_LEVELS)})")
    return convert(base, RepositorySettings, where), init


def item_from_data(kind: str, data: Any, where: str = "") -> Any:
    """A configured item from its flat table (a repository's creation options are dropped)."""
    if kind == "job":
        return job_from_data(data, where)
    if kind == "repo":
        return repository_from_data(data, where)[0]
    if kind == "proxy":
        return convert(parse_sizes(data, where), ProxyConfig, where)
    if kind == "source":
        return convert(data, SourceConfig, where)
    raise ConfigError(f"unknown kind {kind!r}")


def item_to_data(item: Any) -> dict[str, Any]:
    """The flat table of an item (the inverse of :func:`item_from_data`)."""
    if isinstance(item, JobConfig) and isinstance(item.spec, LifecycleSpec):
        settings = msgspec.to_builtins(item.settings)
        settings.pop("throttle", None)  # a backup setting
        return {**msgspec.to_builtins(item.spec), **settings}
    if isinstance(item, JobConfig):
        return {**msgspec.to_builtins(item.spec), **msgspec.to_builtins(item.settings)}
    out: dict[str, Any] = msgspec.to_builtins(item)
    return out


def catalog_from_data(data: Any) -> tuple[Catalog, dict[str, RepositoryInit]]:
    """A catalog from plain data (TOML, ``config.apply``): tables ``repositories``, ``proxies``,
    ``sources``, ``jobs`` (lists of flat tables) and ``settings``. Validated as a whole."""
    if not isinstance(data, dict):
        raise FieldError("", "the configuration must be a table")
    unknown = set(data) - {"repositories", "proxies", "sources", "jobs", "settings"}
    if unknown:
        raise FieldError(sorted(unknown)[0], "unknown section (known: repositories, proxies, sources, jobs, settings)")
    lists: dict[str, list[Any]] = {}
    for kind in KINDS.values():
        items = data.get(kind.attr, [])
        if not isinstance(items, list):
            raise FieldError(kind.attr, "expected a list of tables ([[" + kind.attr + "]] in TOML)")
        lists[kind.attr] = items
    inits: dict[str, RepositoryInit] = {}
    repos = []
    for i, d in enumerate(lists["repositories"]):
        settings, init = repository_from_data(d, f"repositories[{i}]")
        repos.append(settings)
        inits[settings.name] = init
    cat = Catalog(
        repositories=repos,
        proxies=[item_from_data("proxy", d, f"proxies[{i}]") for i, d in enumerate(lists["proxies"])],
        sources=[item_from_data("source", d, f"sources[{i}]") for i, d in enumerate(lists["sources"])],
        jobs=[job_from_data(d, f"jobs[{i}]") for i, d in enumerate(lists["jobs"])],
        settings=convert(parse_sizes(data.get("settings", {}), "settings"), Settings, "settings"),
    )
    check(cat)
    return cat, inits


def catalog_to_data(cat: Catalog) -> dict[str, Any]:
    out: dict[str, Any] = {k.attr: [item_to_data(i) for i in getattr(cat, k.attr)] for k in KINDS.values()}
    out["settings"] = msgspec.to_builtins(cat.settings)
    return out


#: the largest TOML file read (a configuration of thousands of jobs is a few MiB)
MAX_TOML_BYTES = 64 << 20


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file; a syntax error names the line."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TOML_BYTES + 1)
        if len(raw) > MAX_TOML_BYTES:
            raise ConfigError(f"{path} is larger than {MAX_TOML_BYTES >> 20} MiB: not a configuration file")
        return tomllib.loads(raw.decode())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a TOML file (not UTF-8 text)") from None


# -- the catalog as a whole -----------------------------------------------------------------------


def _check_lifecycle(spec: LifecycleSpec, where: str) -> None:
    at = f"{where}." if where else ""
    if spec.type == "prune" and spec.retention is None:
        raise FieldError(f"{at}retention", "a prune job needs a retention policy (keep_last, keep_days, keep_weekly...)")
    if spec.type == "copy" and not spec.to:
        raise FieldError(f"{at}to", "a copy job needs the target repository's URL")


def _check_job_fields(spec: JobSpec | None, settings: JobSettings, where: str) -> None:
    at = f"{where}." if where else ""
    if settings.schedule is not None:
        try:
            parse_schedule(settings.schedule)
        except ConfigError as exc:
            raise FieldError(f"{at}schedule", str(exc)) from None
    if settings.window is not None:
        try:
            parse_window(settings.window)
        except ConfigError as exc:
            raise FieldError(f"{at}window", str(exc)) from None
    if spec is None:
        return
    seen: set[str] = set()
    for i, obj in enumerate(spec.objects):
        if obj.name in seen:
            raise FieldError(f"{at}objects[{i}].name", f"two objects named {obj.name!r}")
        seen.add(obj.name)


def check(cat: Catalog) -> None:
    """Refuse a catalog that does not hold together: duplicate names, a job naming a repository
    or a chained job that does not exist, a chain that loops, a source nobody can read."""
    for kind in KINDS.values():
        seen: set[str] = set()
        for i, item in enumerate(getattr(cat, kind.attr)):
            if item.name in seen:
                raise FieldError(f"{kind.attr}[{i}].name", f"two {kind.attr} named {item.name!r}")
            seen.add(item.name)
    repos = {r.name for r in cat.repositories}
    sources = {s.name for s in cat.sources}
    jobs = {j.name: j for j in cat.jobs}
    for i, s in enumerate(cat.sources):
        try:
            source_plugin(s.url)
        except ConfigError as exc:
            raise FieldError(f"sources[{i}].url", str(exc)) from None
    for i, job in enumerate(cat.jobs):
        at = f"jobs[{i}]"
        if job.spec.repository not in repos:
            raise FieldError(f"{at}.repository", f"no repository named {job.spec.repository!r} "
                                                 f"(configured: {', '.join(sorted(repos)) or 'none'})")
        for j, obj in enumerate(job.backup.objects if job.backup else []):
            for k, disk in enumerate(obj.disks):
                if disk.source in sources:
                    continue
                try:
                    source_plugin(disk.source)
                except ConfigError as exc:
                    raise FieldError(f"{at}.objects[{j}].disks[{k}].source", str(exc)) from None
        after = chained_to(job)
        if after is not None and after not in jobs:
            raise FieldError(f"{at}.schedule", f"no job named {after!r} to run after")
    for i, job in enumerate(cat.jobs):  # a chain that comes back to a job would run forever
        seen_chain, name = [job.name], chained_to(job)
        while name is not None and name in jobs:
            if name in seen_chain:
                raise FieldError(f"jobs[{i}].schedule", "jobs chained in a loop: " + " -> ".join([*seen_chain, name]))
            seen_chain.append(name)
            name = chained_to(jobs[name])


def chained_to(job: JobConfig) -> str | None:
    s = job.settings.schedule
    if s is None:
        return None
    return parse_schedule(s).after


def resolve(job: JobConfig, sources: Iterable[SourceConfig]) -> JobSpec:
    """The job's spec with named sources replaced by their URL and connection options."""
    assert isinstance(job.spec, JobSpec), "only a backup job reads sources"
    by_name = {s.name: s for s in sources}
    if not any(d.source in by_name for o in job.spec.objects for d in o.disks):
        return job.spec
    objects = []
    for obj in job.spec.objects:
        disks = []
        for d in obj.disks:
            src = by_name.get(d.source)
            if src is not None:
                d = msgspec.structs.replace(d, source=src.url, name=d.name or src.name,
                                            options={**src.options, **d.options})
            disks.append(d)
        objects.append(msgspec.structs.replace(obj, disks=disks))
    return msgspec.structs.replace(job.spec, objects=objects)


__all__ = ["Catalog", "JOB_TYPES", "JobConfig", "JobSettings", "KINDS", "LifecycleSpec", "TYPE_FIELDS", "Rate", "RepositoryInit", "Settings",
           "SourceConfig", "catalog_from_data", "catalog_to_data", "chained_to", "check", "convert",
           "item_from_data", "item_to_data", "job_from_data", "load_toml", "repository_from_data", "resolve"]
