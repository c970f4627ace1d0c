"""The SQLite state database: migrations, the configuration as one transaction, sessions."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from blockferry.errors import UnsupportedFormatError
from blockferry.jobs.catalog import catalog_from_data
from blockferry.jobs.messages import ObjectResult, SessionResult
from blockferry.jobs.statedb import MIGRATIONS, SCHEMA_VERSION, StateDB

CONFIG = {
    "repositories": [{"name": "main", "url": "/srv/repo", "max_tasks": 3}],
    "proxies": [{"name": "p1", "max_tasks": 2}, {"name": "p2"}],
    "jobs": [{"name": "nightly", "repository": "main", "schedule": "daily 22:00", "throttle": 1000,
              "retention": {"keep_last": 2}, "immutable_days": 3,
              "objects": [{"name": "vm", "disks": [{"source": "/images/a.img"}]}]}],
    "settings": {"throttle": 5000},
}


@pytest.mark.anyio
async def test_a_new_database_is_at_the_latest_schema(tmp_path: Path) -> None:
    db = await StateDB.open(tmp_path / "state.db")
    try:
        assert await db.schema_version() == SCHEMA_VERSION == MIGRATIONS[-1][0]
    finally:
        await db.close()


@pytest.mark.anyio
async def test_a_newer_database_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "state.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(UnsupportedFormatError, match="newer"):
        await StateDB.open(tmp_path / "state.db")


@pytest.mark.anyio
async def test_the_catalog_survives_a_reopen_in_order(tmp_path: Path) -> None:
    cat, _ = catalog_from_data(CONFIG)
    db = await StateDB.open(tmp_path / "state.db")
    await db.save_catalog(cat)
    await db.close()
    db = await StateDB.open(tmp_path / "state.db")
    try:
        loaded = await db.load_catalog()
        assert loaded == cat
        assert [p.name for p in loaded.proxies] == ["p1", "p2"]
        assert loaded.jobs[0].spec.retention.keep_last == 2 and loaded.settings.throttle == 5000
    finally:
        await db.close()


@pytest.mark.anyio
async def test_a_failed_save_changes_nothing(tmp_path: Path) -> None:
    cat, _ = catalog_from_data(CONFIG)
    db = await StateDB.open(tmp_path / "state.db")
    try:
        await db.save_catalog(cat)
        # two items with one name break the primary key half way through the transaction
        broken = type(cat)(repositories=cat.repositories, proxies=[*cat.proxies, cat.proxies[0]], jobs=cat.jobs)
        with pytest.raises(sqlite3.IntegrityError):
            await db.save_catalog(broken)
        assert await db.load_catalog() == cat
    finally:
        await db.close()


@pytest.mark.anyio
async def test_sessions_record_results_and_dead_ones_fail(tmp_path: Path) -> None:
    db = await StateDB.open(tmp_path / "state.db")
    try:
        a = await db.create_session("nightly", "manual", "running", "2026-01-05T22:00:00+00:00")
        result = SessionResult(job="nightly", state="success", duration=2.5,
                               objects=[ObjectResult(name="vm", state="done", point="abc")])
        await db.update_session(a, state="success", ended="2026-01-05T22:01:00+00:00", result=result)
        b = await db.create_session("nightly", "schedule", "running", "2026-01-06T22:00:00+00:00")
        assert await db.fail_running("the daemon died", "2026-01-06T23:00:00+00:00") == [b]
        rec = await db.session(b)
        assert rec.state == "failed" and rec.note == "the daemon died"
        full = await db.session(a)
        assert full.result is not None and full.result.points == ["abc"]
        rows = await db.sessions(job="nightly")
        assert [r.id for r in rows] == [b, a]  # newest first
        assert rows[1].points == ["abc"] and rows[1].objects_done == 1
        assert [r.id for r in await db.sessions(state="success")] == [a]
    finally:
        await db.close()


@pytest.mark.anyio
async def test_a_version_1_database_is_migrated_keeping_its_sessions(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    for statement in MIGRATIONS[0][1].split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO sessions (job, trigger, state, started) VALUES ('old', 'manual', 'success', 'x')")
    conn.close()
    db = await StateDB.open(tmp_path / "state.db")
    try:
        assert await db.schema_version() == SCHEMA_VERSION
        rec = await db.session(1)
        assert rec.job == "old" and rec.kind == "backup" and rec.target is None
        sid = await db.create_session("old", "schedule", "success", "y", kind="copy", target="/copy")
        assert await db.last_success("old", "copy", "/copy") == "y" and sid == 2
        assert await db.last_success("old", "copy", "/elsewhere") is None
    finally:
        await db.close()
