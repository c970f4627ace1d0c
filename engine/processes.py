"""Processes on this host: whether one is alive, and when it started (which tells a live holder
of a lock or a snapshot from a reused pid). Shared by the repository's locks, the storage
systems' and sources' leftover rules, and the local backend."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def process_start(pid: int) -> str:
    """Start time of a process (tells a live holder from a reused pid); '' if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()
    except (OSError, IndexError):
        return ""
