"""Finding source plugins and repository backends by URL scheme, through entry points.

Groups: ``blockferry.sources`` and ``blockferry.backends``; the entry point's name is the scheme
(``file``, ``qemu``, ``s3``). A plain path (no ``scheme:``) means ``file``.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from .errors import ConfigError

SOURCES = "blockferry.sources"
BACKENDS = "blockferry.backends"

_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*):")


def scheme_of(url: str) -> str:
    """``s3://b/p`` → ``s3``; ``qemu:/run/vm.qmp`` → ``qemu``; a plain path → ``file``."""
    m = _SCHEME.match(url)
    # one letter before a colon is a Windows drive, not a scheme
    return m.group(1) if m and len(m.group(1)) > 1 else "file"


@cache
def _load(group: str, scheme: str) -> Any:
    for ep in entry_points(group=group, name=scheme):
        return ep.load()()
    known = sorted({ep.name for ep in entry_points(group=group)})
    kind = "source" if group == SOURCES else "repository"
    raise ConfigError(f"no {kind} plugin for scheme {scheme!r} (installed: {', '.join(known) or 'none'})")


def source_plugin(url: str) -> Any:
    """The :class:`~blockferry.source.SourcePlugin` for ``url``."""
    return _load(SOURCES, scheme_of(url))


def backend_plugin(url: str) -> Any:
    """The :class:`~blockferry.backend.BackendPlugin` for ``url``."""
    return _load(BACKENDS, scheme_of(url))
