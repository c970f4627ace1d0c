"""blockferry: an image-level backup engine for virtual machines and volumes.

The embedded API (no daemon needed)::

    async with blockferry.open_repository("/srv/repo") as repo:
        session = await repo.backup(["disk0.img", "disk1.img"], name="vm1")

See docs/api.md. The actor runtime is :mod:`blockferry.runtime.actor`, the roles are in
:mod:`blockferry.actors`, the plugins in :mod:`blockferry.plugins`.
"""

from __future__ import annotations

from blockferry.api import Repository, init_repository, open_repository
from blockferry.errors import (
    BlockferryError,
    ConfigError,
    CorruptionError,
    HintError,
    NotARepositoryError,
    NotFoundError,
    RepositoryError,
    RepositoryLockedError,
    RepositoryUnavailableError,
    SourceError,
    UnsupportedFormatError,
)
from blockferry.jobs.config import DiskSpec, JobSpec, ObjectSpec, ProxyConfig, RepositorySettings, ServerConfig
from blockferry.jobs.messages import SessionResult
from blockferry.repo.format import Manifest, RepositoryConfig, TaskStats
from blockferry.repo.retention import RetentionPolicy
from blockferry.repo.verify import VerifyReport
from blockferry.runtime.settings import EngineSettings

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # the restore module loads on first use: a backup does not pay its 5.6 ms of imports
    if name == "RestoreResult":
        from blockferry.restore.files import RestoreResult

        return RestoreResult
    raise AttributeError(name)


__all__ = [
    "BlockferryError", "ConfigError", "CorruptionError", "DiskSpec", "EngineSettings", "HintError", "JobSpec",
    "Manifest", "NotARepositoryError", "NotFoundError", "ObjectSpec", "ProxyConfig", "Repository",
    "RepositoryConfig", "RepositoryError", "RepositoryLockedError", "RepositorySettings",
    "RepositoryUnavailableError", "RestoreResult", "RetentionPolicy", "ServerConfig", "SessionResult", "SourceError",
    "TaskStats",
    "UnsupportedFormatError", "VerifyReport", "init_repository", "open_repository", "__version__",
]
