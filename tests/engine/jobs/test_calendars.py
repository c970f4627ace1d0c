"""Schedules and backup windows (pure), and the manual clock."""

from __future__ import annotations

import datetime as dt

import anyio
import pytest
from blockferry.errors import ConfigError
from blockferry.jobs.calendars import ManualClock, parse_schedule, parse_window

UTC = dt.timezone.utc


def t(s: str) -> dt.datetime:
    return dt.datetime.fromisoformat(s).replace(tzinfo=UTC)


def test_daily_runs_at_the_time_each_day() -> None:
    s = parse_schedule("daily 22:00")
    assert s.next_after(t("2026-01-05T21:59")) == t("2026-01-05T22:00")
    assert s.next_after(t("2026-01-05T22:00")) == t("2026-01-06T22:00")  # strictly after


def test_weekdays_skip_the_weekend() -> None:
    s = parse_schedule("mon-fri 22:00")  # 2026-01-09 is a Friday
    assert s.next_after(t("2026-01-09T23:00")) == t("2026-01-12T22:00")
    assert parse_schedule("weekends 08:00").days == (5, 6)
    assert parse_schedule("fri-mon 01:00").days == (0, 4, 5, 6)
    assert parse_schedule("mon,wed 06:00,18:00").minutes == (360, 1080)


def test_every_n_minutes_and_hours_count_from_midnight() -> None:
    s = parse_schedule("every 15m")
    assert s.next_after(t("2026-01-05T10:07")) == t("2026-01-05T10:15")
    h = parse_schedule("every 7h")
    assert [x.hour for x in h.due_between(t("2026-01-05T00:00"), t("2026-01-05T23:59"))] == [7, 14, 21]
    assert h.next_after(t("2026-01-05T21:00")) == t("2026-01-06T00:00")


def test_after_is_a_chain() -> None:
    s = parse_schedule("after nightly")
    assert s.after == "nightly" and not s.timed and s.next_after(t("2026-01-05T00:00")) is None


@pytest.mark.parametrize("text", ["", "daily", "daily 24:00", "mo 10:00", "every 0m", "every 2 weeks",
                                  "every 25h", "after", "after a b", "daily 10:60"])
def test_bad_schedules_say_why(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_schedule(text)
    assert str(err.value)


def test_window_crossing_midnight() -> None:
    w = parse_window("22:00-06:00")
    assert w.is_open(t("2026-01-05T23:00")) and w.is_open(t("2026-01-06T05:59"))
    assert not w.is_open(t("2026-01-06T06:00")) and not w.is_open(t("2026-01-06T12:00"))
    assert w.closes(t("2026-01-05T23:00")) == t("2026-01-06T06:00")
    assert w.next_open(t("2026-01-06T12:00")) == t("2026-01-06T22:00")


def test_window_on_weekdays_counts_the_opening_day() -> None:
    w = parse_window("mon-fri 20:00-02:00")  # Friday night runs into Saturday
    assert w.is_open(t("2026-01-10T01:00"))  # Saturday 01:00, opened Friday
    assert not w.is_open(t("2026-01-10T21:00"))  # Saturday evening
    with pytest.raises(ConfigError):
        parse_window("22:00")


@pytest.mark.anyio
async def test_manual_clock_wakes_sleepers_only_when_moved() -> None:
    clock = ManualClock(t("2026-01-05T10:00"))
    woke: list[dt.datetime] = []

    async def sleeper() -> None:
        await clock.sleep_until(t("2026-01-05T11:00"))
        woke.append(clock.now())

    async with anyio.create_task_group() as tg:
        tg.start_soon(sleeper)
        await anyio.wait_all_tasks_blocked()
        clock.advance(1800)
        await anyio.wait_all_tasks_blocked()
        assert woke == []
        clock.advance(1800)
    assert woke == [t("2026-01-05T11:00")]
    with pytest.raises(ConfigError):
        clock.set(t("2026-01-05T09:00"))
