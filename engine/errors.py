"""The engine's semantic exceptions.

Plugins and backends translate foreign exceptions into these at their edge (see
:func:`map_errors`), so callers and the CLI deal with a small, documented set. Each class says
when it is raised; ``exit_code`` is what the CLI exits with when the error ends a command.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping


class BlockferryError(Exception):
    """Base of every error the engine raises on purpose."""

    exit_code = 1
    #: a later attempt may succeed (the job manager retries the object); bad input never does
    transient = False


class ConfigError(BlockferryError):
    """Invalid configuration or arguments: a bad block size, an unknown compression name, an
    unknown URL scheme. Nothing was changed."""

    exit_code = 2


class HintError(ConfigError):
    """A changed-extent hint file cannot be used: unreadable, malformed (the message names the
    line), or describing extents outside the disk."""


class NotARepositoryError(BlockferryError):
    """The location holds no blockferry repository (no readable ``config``)."""

    exit_code = 2


class UnsupportedFormatError(BlockferryError):
    """The repository records a format or version this build does not know."""

    exit_code = 2


class NotFoundError(BlockferryError):
    """A named restore point, disk, object or key does not exist."""

    exit_code = 2


class AmbiguousError(ConfigError):
    """A point id prefix matches more than one restore point."""


class RepositoryError(BlockferryError):
    """The repository's storage failed: an I/O error, a full disk, a refused request."""

    transient = True


class NoSpaceError(RepositoryError):
    """The repository's storage is full (no space left, a quota reached). Not retried: a retry
    would meet the same full disk; the packs the failed backup wrote are removed when it ends."""

    transient = False


class RepositoryLockedError(RepositoryError):
    """Another live process holds the repository's writer lock. The message names it."""

    exit_code = 4
    transient = False


class RepositoryUnavailableError(RepositoryError):
    """The availability check before a task failed: unreachable, read-only, locked or short of
    free space. Raised before any source is opened; the message gives the reason."""

    transient = False


class ArchivedError(RepositoryError):
    """An object of the repository is in an archive storage class (S3 Glacier and the like) and
    could not be brought back in time: the restore was requested; the message says how to go on."""

    transient = False


class ImmutableError(BlockferryError):
    """Something asked to remove a restore point (or its data) that is immutable until a later
    date. Nothing was removed."""

    exit_code = 5


class CorruptionError(BlockferryError):
    """Stored data does not match its hash or cannot be decoded. The message names what is
    damaged: the point, disk and offset for restores, the key for metadata."""

    exit_code = 3


class SourceError(BlockferryError):
    """A source cannot be opened or read (missing file, permission, read error). The message
    names the source and, for read errors, the offset."""

    exit_code = 2


class SourceChangedError(SourceError):
    """A source changed in a way the task cannot follow (e.g. it shrank while being read)."""

    transient = True


class ChunkLostError(BlockferryError):
    """A chunk that another task promised to store was abandoned because that task failed; the
    object is retried and reads the block itself."""

    transient = True


class ActorStoppedError(BlockferryError):
    """A message was sent to an actor that is stopping or stopped, or it was queued when the
    actor stopped without draining."""


class ActorFailedError(BlockferryError):
    """An actor crashed while handling the ``ask`` that is waiting for it."""


class ChildFailedError(BlockferryError):
    """A supervised child actor failed and the policy chose to fail its parent. ``child`` names
    it; ``__cause__`` is the child's error."""

    def __init__(self, child: str, error: BaseException) -> None:
        super().__init__(f"actor {child} failed: {error!r}")
        self.child = child
        self.error = error


class FieldError(ConfigError):
    """Invalid configuration, naming the field at fault (``jobs[0].schedule``, ``max_tasks``) and
    why. Nothing was changed."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


class ConflictError(ConfigError):
    """The request contradicts the daemon's state: a name already taken, a job already running,
    removing something still in use. Nothing was changed."""


@contextlib.contextmanager
def map_errors(mapping: Mapping[type[BaseException], type[BlockferryError]], context: str = "") -> Iterator[None]:
    """Translate foreign exceptions into engine errors, once, at a boundary.

    ``with map_errors({OSError: RepositoryError}, "writing pack"): ...``. Engine errors pass
    through untouched; the original is kept as ``__cause__``.
    """
    try:
        yield
    except BlockferryError:
        raise
    except tuple(mapping) as exc:  # type: ignore[misc]
        for foreign, ours in mapping.items():
            if isinstance(exc, foreign):
                msg = f"{context}: {exc}" if context else str(exc)
                raise ours(msg) from exc
        raise  # pragma: no cover - tuple(mapping) matched, so a class above did too


def leaves(exc: BaseException) -> list[BaseException]:
    """The errors inside (nested) exception groups, in order; ``[exc]`` for a plain error."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in leaves(e)]
    return [exc]


def unwrap_group(exc: BaseException, *, secondary: tuple[type[BaseException], ...] = ()) -> BaseException:
    """The error worth reporting out of exception groups (task groups wrap errors): the first
    engine error that is not of a ``secondary`` kind (a peer that only saw the real failure),
    else the first error; ``exc`` itself when it is not a group."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    found = leaves(exc)
    for e in found:
        if isinstance(e, BlockferryError) and not isinstance(e, secondary):
            return e
    for e in found:
        if not isinstance(e, secondary):
            return e
    return found[0] if found else exc


@contextlib.contextmanager
def plain_errors() -> Iterator[None]:
    """At an API boundary: raise the meaningful error itself, not the exception group that the
    task groups inside wrapped it in, so callers can ``except CorruptionError``."""
    try:
        yield
    except BaseExceptionGroup as group:
        err = unwrap_group(group)
        if err is group:
            raise
        raise err from err.__cause__
