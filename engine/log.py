"""Logging: structlog, to stderr, as text on a terminal or JSON lines (``--log-json``).

Actors bind ``actor``, ``job``, ``object`` and ``disk`` once; events are snake_case names with
key/value fields. Libraries embedding blockferry keep whatever structlog configuration they have:
only the CLI calls :func:`configure`.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure(*, level: str = "warning", json: bool = False) -> None:
    lvl = getattr(logging, level.upper(), logging.WARNING)
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json:
        processors += [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def ensure_configured() -> None:
    """Give structlog a quiet default (warnings and errors to stderr) unless the program that
    embeds blockferry configured it already."""
    if not structlog.is_configured():
        configure(level="warning")
