"""The daemon's state database (SQLite, ``state.db`` in the state directory).

Holds the configuration (repositories, proxies, sources, jobs, settings), each job's next
scheduled run, and the session history. Configuration items are stored as msgspec JSON (a job as
its JobSpec and its daemon settings), so fields added to those structs later flow through
without a migration.

The schema is versioned with ``PRAGMA user_version`` and brought up to date by
:data:`MIGRATIONS` when the daemon opens it; a database written by a newer blockferry is refused.
Every method is one transaction run in a worker thread (one at a time), so the event loop never
waits on the disk and a failure changes nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import msgspec
from blockferry.errors import NotFoundError, UnsupportedFormatError
from blockferry.jobs.catalog import Catalog, JobConfig, JobSettings, LifecycleSpec, Settings, SourceConfig
from blockferry.jobs.config import JobSpec, ProxyConfig, RepositorySettings
from blockferry.jobs.messages import SessionResult

T = TypeVar("T")

#: (version, SQL) in order; a database at version N runs every migration after N
MIGRATIONS: list[tuple[int, str]] = [
    (1, """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE repositories (name TEXT PRIMARY KEY, position INTEGER NOT NULL, data TEXT NOT NULL);
        CREATE TABLE proxies (name TEXT PRIMARY KEY, position INTEGER NOT NULL, data TEXT NOT NULL);
        CREATE TABLE sources (name TEXT PRIMARY KEY, position INTEGER NOT NULL, data TEXT NOT NULL);
        CREATE TABLE jobs (name TEXT PRIMARY KEY, position INTEGER NOT NULL, spec TEXT NOT NULL,
                           settings TEXT NOT NULL);
        CREATE TABLE job_state (job TEXT PRIMARY KEY, next_due TEXT);
        CREATE TABLE sessions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            job TEXT NOT NULL,
            trigger TEXT NOT NULL,
            state TEXT NOT NULL,
            started TEXT NOT NULL,
            ended TEXT,
            note TEXT,
            pid INTEGER,
            result TEXT
        );
        CREATE INDEX sessions_by_job ON sessions (job, id);
    """),
    # periodic backup copies are sessions too: what a session did (backup, copy) and where to
    (2, """
        ALTER TABLE sessions ADD COLUMN kind TEXT NOT NULL DEFAULT 'backup';
        ALTER TABLE sessions ADD COLUMN target TEXT;
    """),
    # lifecycle jobs (prune, gc, verify, copy): a job's spec column holds a JobSpec for a backup
    # job and a LifecycleSpec for the others, so the row says which
    (3, """
        ALTER TABLE jobs ADD COLUMN type TEXT NOT NULL DEFAULT 'backup';
    """),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]

#: states of a session that is over
FINAL_STATES = ("success", "warning", "failed", "stopped", "missed", "skipped")


class SessionRecord(msgspec.Struct, kw_only=True):
    """A job run as the daemon keeps it.

    ``state``: running, success, warning, failed, stopped (by a user, the backup window or
    shutdown), or for runs that never happened, missed (the daemon was down) and skipped (the
    previous run was still going, or outside the backup window). ``trigger``: manual, schedule,
    chain or missed. ``result`` holds the per-object and per-disk results and statistics (for a
    running session, as of the last snapshot).
    """

    id: int
    job: str
    trigger: str
    state: str
    started: str
    ended: str | None = None
    note: str | None = None
    #: backup (a backup job's run), copy (a periodic backup copy of a backup job's latest points
    #: to ``target``, or a copy job's run), prune, gc or verify (a lifecycle job's run)
    kind: str = "backup"
    target: str | None = None
    result: SessionResult | None = None


class _SummaryObject(msgspec.Struct):
    state: str = "pending"
    point: str | None = None


class _SummaryStats(msgspec.Struct):
    disk_size: int = 0
    read_bytes: int = 0
    written_bytes: int = 0


class _Summary(msgspec.Struct):
    """The few fields of a stored SessionResult that a listing shows (decoded without the rest)."""

    duration: float = 0.0
    objects: list[_SummaryObject] = msgspec.field(default_factory=list)
    stats: _SummaryStats = msgspec.field(default_factory=_SummaryStats)
    warnings: list[str] = msgspec.field(default_factory=list)
    summary: str = ""


class SessionSummary(msgspec.Struct, kw_only=True):
    id: int
    job: str
    kind: str
    target: str | None
    trigger: str
    state: str
    started: str
    ended: str | None
    note: str | None
    duration: float
    objects: int
    objects_done: int
    points: list[str]
    disk_bytes: int
    read_bytes: int
    written_bytes: int
    warnings: int
    summary: str = ""  #: a lifecycle job's run: what it did, in one line


class StateDB:
    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn
        self._limiter = anyio.CapacityLimiter(1)

    def __repr__(self) -> str:
        return f"<StateDB {self.path}>"

    @classmethod
    async def open(cls, path: Path) -> StateDB:
        """Open (creating it if missing) and migrate to :data:`SCHEMA_VERSION`."""
        conn = await anyio.to_thread.run_sync(_connect, path)
        return cls(path, conn)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(fn, self._conn, *args, limiter=self._limiter)

    async def close(self) -> None:
        await self._run(lambda c: c.close())

    async def schema_version(self) -> int:
        return await self._run(lambda c: c.execute("PRAGMA user_version").fetchone()[0])

    # -- configuration ---------------------------------------------------------------------------

    async def load_catalog(self) -> Catalog:
        return await self._run(_load_catalog)

    async def save_catalog(self, cat: Catalog) -> None:
        """Replace the stored configuration with ``cat``, in one transaction."""
        await self._run(_save_catalog, cat)

    async def next_due(self) -> dict[str, str | None]:
        rows = await self._run(lambda c: c.execute("SELECT job, next_due FROM job_state").fetchall())
        return {job: due for job, due in rows}

    async def set_next_due(self, job: str, due: str | None) -> None:
        def q(c: sqlite3.Connection) -> None:
            c.execute("INSERT INTO job_state (job, next_due) VALUES (?, ?) "
                      "ON CONFLICT (job) DO UPDATE SET next_due = excluded.next_due", (job, due))
        await self._run(q)

    # -- sessions --------------------------------------------------------------------------------

    async def create_session(self, job: str, trigger: str, state: str, started: str, *, note: str | None = None,
                             ended: str | None = None, pid: int | None = None, kind: str = "backup",
                             target: str | None = None) -> int:
        def q(c: sqlite3.Connection) -> int:
            cur = c.execute("INSERT INTO sessions (job, trigger, state, started, ended, note, pid, kind, target) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (job, trigger, state, started, ended, note, pid, kind, target))
            return int(cur.lastrowid or 0)
        return await self._run(q)

    async def last_success(self, job: str, kind: str, target: str | None = None) -> str | None:
        """When the newest successful session of this kind (and target) started."""
        row = await self._run(lambda c: c.execute(
            "SELECT started FROM sessions WHERE job = ? AND kind = ? AND target IS ? "
            "AND state IN ('success', 'warning') ORDER BY id DESC LIMIT 1", (job, kind, target)).fetchone())
        return row[0] if row else None

    async def update_session(self, sid: int, *, state: str | None = None, ended: str | None = None,
                             note: str | None = None, result: SessionResult | None = None) -> None:
        sets: list[str] = []
        args: list[Any] = []
        for col, value in (("state", state), ("ended", ended), ("note", note)):
            if value is not None:
                sets.append(f"{col} = ?")
                args.append(value)
        if result is not None:
            sets.append("result = ?")
            args.append(msgspec.json.encode(result).decode())
        if sets:
            await self._run(lambda c: c.execute(f"UPDATE sessions SET {', '.join(sets)} WHERE id = ?", (*args, sid)))

    async def session(self, sid: int) -> SessionRecord:
        row = await self._run(lambda c: c.execute(
            "SELECT id, job, trigger, state, started, ended, note, kind, target, result FROM sessions WHERE id = ?",
            (sid,)).fetchone())
        if row is None:
            raise NotFoundError(f"no session {sid}")
        *head, result = row
        rec = SessionRecord(**dict(zip(("id", "job", "trigger", "state", "started", "ended", "note", "kind",
                                        "target"), head)))
        if result:
            rec.result = msgspec.json.decode(result, type=SessionResult)
        return rec

    async def sessions(self, *, job: str | None = None, state: str | None = None,
                       limit: int = 50) -> list[SessionSummary]:
        """The newest ``limit`` sessions (of ``job``, in ``state``), newest first."""
        where, args = [], []
        if job is not None:
            where.append("job = ?")
            args.append(job)
        if state is not None:
            where.append("state = ?")
            args.append(state)
        sql = ("SELECT id, job, trigger, state, started, ended, note, kind, target, result FROM sessions"
               + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT ?")
        rows = await self._run(lambda c: c.execute(sql, (*args, limit)).fetchall())
        out = []
        for sid, jb, trig, st, started, ended, note, kind, target, result in rows:
            s = msgspec.json.decode(result, type=_Summary) if result else _Summary()
            out.append(SessionSummary(
                id=sid, job=jb, kind=kind, target=target, trigger=trig, state=st, started=started, ended=ended, note=note,
                duration=s.duration, objects=len(s.objects), objects_done=sum(o.state == "done" for o in s.objects),
                points=[o.point for o in s.objects if o.point], disk_bytes=s.stats.disk_size,
                read_bytes=s.stats.read_bytes, written_bytes=s.stats.written_bytes, warnings=len(s.warnings),
                summary=s.summary))
        return out

    async def fail_running(self, note: str, ended: str) -> list[int]:
        """Mark every session still ``running`` (its daemon died) as failed; their ids."""
        def q(c: sqlite3.Connection) -> list[int]:
            with c:
                c.execute("BEGIN IMMEDIATE")
                ids = [r[0] for r in c.execute("SELECT id FROM sessions WHERE state = 'running'")]
                c.execute("UPDATE sessions SET state = 'failed', ended = ?, note = ? WHERE state = 'running'",
                          (ended, note))
            return ids
        return await self._run(q)


def _connect(path: Path) -> sqlite3.Connection:
    # autocommit mode: each statement is its own transaction unless a ``with conn:`` opens one
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    try:
        _migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: sqlite3.Connection) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise UnsupportedFormatError(
            f"the state database has schema version {version}, newer than this blockferry knows "
            f"({SCHEMA_VERSION}): run a newer blockferry, or another state directory")
    for target, sql in MIGRATIONS:
        if target <= version:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in sql.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {int(target)}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


_TABLES = (("repositories", RepositorySettings), ("proxies", ProxyConfig), ("sources", SourceConfig))


def _load_catalog(c: sqlite3.Connection) -> Catalog:
    lists: dict[str, list[Any]] = {}
    for table, kind in _TABLES:
        rows = c.execute(f"SELECT data FROM {table} ORDER BY position").fetchall()
        lists[table] = [msgspec.json.decode(r[0], type=kind) for r in rows]
    jobs = [JobConfig(spec=msgspec.json.decode(spec, type=JobSpec if kind == "backup" else LifecycleSpec),
                      settings=msgspec.json.decode(st, type=JobSettings))
            for spec, st, kind in c.execute("SELECT spec, settings, type FROM jobs ORDER BY position")]
    row = c.execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()
    settings = msgspec.json.decode(row[0], type=Settings) if row else Settings()
    return Catalog(**lists, jobs=jobs, settings=settings)


def _save_catalog(c: sqlite3.Connection, cat: Catalog) -> None:
    enc = msgspec.json.encode
    with c:
        c.execute("BEGIN IMMEDIATE")
        for table, _ in _TABLES:
            c.execute(f"DELETE FROM {table}")
            c.executemany(f"INSERT INTO {table} (name, position, data) VALUES (?, ?, ?)",
                          [(i.name, n, enc(i).decode()) for n, i in enumerate(getattr(cat, table))])
        c.execute("DELETE FROM jobs")
        c.executemany("INSERT INTO jobs (name, position, spec, settings, type) VALUES (?, ?, ?, ?, ?)",
                      [(j.name, n, enc(j.spec).decode(), enc(j.settings).decode(), j.type)
                       for n, j in enumerate(cat.jobs)])
        c.execute("DELETE FROM job_state WHERE job NOT IN (SELECT name FROM jobs)")
        c.execute("INSERT INTO meta (key, value) VALUES ('settings', ?) "
                  "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (enc(cat.settings).decode(),))


__all__ = ["FINAL_STATES", "MIGRATIONS", "SCHEMA_VERSION", "SessionRecord", "SessionSummary", "StateDB"]
