"""Logging: structlog, to stderr, as text on a terminal or JSON lines (``--log-json``).

Actors bind ``actor``, ``job``, ``object`` and ``disk`` once; events are snake_case names with
key/value fields. Libraries embedding blockferry keep whatever structlog configuration they have:
only the CLI calls :func:`configure`; otherwise the first event checks that structlog is
configured and, if not, gives it a quiet default (warnings and errors to stderr).

:func:`get_logger` returns a :class:`Logger`, a thin bound logger that imports and binds
structlog only when an event at or above the configured level is emitted. Importing structlog
costs about 40 ms (it loads its console renderer, traceback formatter and stdlib bridge), a
tenth of a small incremental backup, and a quiet run never needs it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}

#: events below this level are dropped without importing structlog; None until the CLI
#: configures logging (embedded use: structlog's own filtering decides)
_min_level: int | None = None
_checked = False


def configure(*, level: str = "warning", json: bool = False, file: TextIO | None = None,
              extra: Sequence[Any] = (), cache: bool = True) -> None:
    """Configure structlog: events at ``level`` and above to ``file`` (stderr), as JSON lines or
    text; ``extra`` processors run before rendering (the daemon's context and event bus)."""
    global _min_level, _checked
    structlog = _import_structlog()
    lvl = LEVELS.get(level.lower(), LEVELS["warning"])
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        *extra,
    ]
    if json:
        processors += [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=file or sys.stderr),
        cache_logger_on_first_use=cache,
    )
    _min_level = lvl
    _checked = True


def quiet_cli_defaults(level: str = "warning") -> None:
    """What the CLI sets before it knows whether it will log at all: events below ``level`` are
    dropped without loading structlog; the first one at or above it configures structlog."""
    global _min_level
    _min_level = LEVELS[level]


def _import_structlog() -> Any:
    # only when an event is emitted or logging configured: 36 ms of imports (see the docstring)
    import structlog

    return structlog


def _structlog() -> Any:
    global _checked
    structlog = _import_structlog()
    if not _checked:
        _checked = True
        if not structlog.is_configured():
            configure(level=next((k for k, v in LEVELS.items() if v == (_min_level or 30)), "warning"))
    return structlog


class Logger:
    """A bound logger that loads structlog on its first emitted event."""

    __slots__ = ("_ctx", "_real")

    def __init__(self, ctx: dict[str, Any]) -> None:
        self._ctx = ctx
        self._real: Any = None

    def bind(self, **kw: Any) -> Logger:
        return Logger({**self._ctx, **kw})

    def _emit(self, level: str, event: str, kw: dict[str, Any]) -> None:
        if _min_level is not None and LEVELS[level] < _min_level:
            return
        if self._real is None:
            self._real = _structlog().get_logger("blockferry").bind(**self._ctx)
        getattr(self._real, level)(event, **kw)

    def debug(self, event: str, **kw: Any) -> None:
        self._emit("debug", event, kw)

    def info(self, event: str, **kw: Any) -> None:
        self._emit("info", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._emit("warning", event, kw)

    def error(self, event: str, **kw: Any) -> None:
        self._emit("error", event, kw)

    def exception(self, event: str, **kw: Any) -> None:
        if self._real is None:
            self._real = _structlog().get_logger("blockferry").bind(**self._ctx)
        self._real.exception(event, **kw)


def get_logger(**ctx: Any) -> Logger:
    return Logger(ctx)
