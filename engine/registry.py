"""Finding source plugins and repository backends by URL scheme, through entry points.

Groups: ``blockferry.sources``, ``blockferry.backends`` and ``blockferry.storage`` (storage
systems, engine/datapath/storage.py); the entry point's name is the scheme (``file``, ``qemu``,
``s3``, ``rbd``). A plain path (no ``scheme:``) means ``file``. Programs that embed
blockferry may also :func:`register` a plugin object for a scheme; it takes precedence over an
entry point of the same name.

The embedded defaults (the ``file`` source and backend) are also declared as entry points, but
are found without scanning the installed packages' metadata: that scan (importlib.metadata and
its imports) costs about 25 ms, a tenth of the start-up of a small incremental backup.
"""

from __future__ import annotations

import re
from importlib import import_module
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from blockferry.errors import ConfigError

SOURCES = "blockferry.sources"
BACKENDS = "blockferry.backends"
STORAGE = "blockferry.storage"

_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*):")
_loaded: dict[tuple[str, str], Any] = {}
_registered: dict[tuple[str, str], Any] = {}
_BUILTIN = {
    (SOURCES, "file"): "blockferry.plugins.file_source:FileSourcePlugin",
    (BACKENDS, "file"): "blockferry.plugins.local:LocalBackendPlugin",
}


def scheme_of(url: str) -> str:
    """``s3://b/p`` → ``s3``; ``qemu:/run/vm.qmp`` → ``qemu``; a plain path → ``file``."""
    m = _SCHEME.match(url)
    # one letter before a colon is a Windows drive, not a scheme
    return m.group(1) if m and len(m.group(1)) > 1 else "file"


def path_from_url(url: str) -> Path:
    """``/srv/repo``, ``repo`` or ``file:///srv/repo`` to an absolute path."""
    if url.startswith("file:"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"{url}: file URLs must name a local path")
        return Path(unquote(parsed.path)).absolute()
    return Path(url).expanduser().absolute()


def register(group: str, scheme: str, plugin: Any) -> None:
    """Use ``plugin`` for ``scheme`` in ``group`` (SOURCES, BACKENDS or STORAGE); None removes it."""
    if plugin is None:
        _registered.pop((group, scheme), None)
    else:
        _registered[(group, scheme)] = plugin


def _load(group: str, scheme: str) -> Any:
    key = (group, scheme)
    plugin = _registered.get(key) or _loaded.get(key)
    if plugin is not None:
        return plugin
    if key in _BUILTIN:
        module, _, cls = _BUILTIN[key].partition(":")
        plugin = _loaded[key] = getattr(import_module(module), cls)()
        return plugin
    # importlib.metadata and the scan cost 25 ms (see the module docstring): only for a scheme
    # that is not built in
    from importlib.metadata import entry_points

    kind = {SOURCES: "source", STORAGE: "storage system"}.get(group, "repository")
    for ep in entry_points(group=group, name=scheme):
        try:
            plugin = _loaded[key] = ep.load()()
        except ImportError as exc:  # a plugin whose optional dependencies are not installed
            raise ConfigError(f"the {kind} plugin for scheme {scheme!r} cannot be loaded: {exc} "
                              f"(is the 'blockferry[{scheme}]' extra installed?)") from exc
        return plugin
    known = sorted({ep.name for ep in entry_points(group=group)} | {s for g, s in _registered if g == group})
    raise ConfigError(f"no {kind} plugin for scheme {scheme!r} (installed: {', '.join(known) or 'none'})")


def source_plugin(url: str) -> Any:
    """The :class:`~blockferry.datapath.source.SourcePlugin` for ``url``."""
    return _load(SOURCES, scheme_of(url))


def backend_plugin(url: str) -> Any:
    """The :class:`~blockferry.repo.backend.BackendPlugin` for ``url``."""
    return _load(BACKENDS, scheme_of(url))


def storage_plugin(url: str) -> Any:
    """The :class:`~blockferry.datapath.storage.StoragePlugin` for ``url``."""
    return _load(STORAGE, scheme_of(url))
