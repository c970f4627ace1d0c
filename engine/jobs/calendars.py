"""Job schedules, backup windows, and the clocks the scheduler reads.

Schedules (case-insensitive; times are wall-clock times in the daemon's time zone)::

    daily 22:00               every day at 22:00 (several times: "daily 06:00,18:00")
    mon-fri 22:00             on given weekdays: mon,wed,fri / mon-fri / weekdays / weekends
    every 15m                 every N minutes (m, min, minutes) or hours (h, hours), counted
    every 4h                  from midnight: "every 7h" runs at 00:00, 07:00, 14:00, 21:00
    after nightly             when the job "nightly" ends with success or warning (chaining)

Windows: ``22:00-06:00`` (may cross midnight; start == end means the whole day), optionally on
given weekdays: ``mon-fri 20:00-06:00`` (the day the window opens counts).

Everything here is pure except the clocks. :class:`SystemClock` reads the wall clock and sleeps
in slices (the wall clock may jump); :class:`ManualClock` moves only when told, so tests run a
schedule of days in milliseconds.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio
import msgspec
from blockferry.errors import ConfigError

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY_ALIASES = {"weekdays": (0, 1, 2, 3, 4), "weekends": (5, 6), "daily": tuple(range(7)), "everyday": tuple(range(7))}
_UNITS = {"m": 1, "min": 1, "mins": 1, "minute": 1, "minutes": 1, "h": 60, "hour": 60, "hours": 60}
_TIME = re.compile(r"^(\d{1,2}):(\d{2})$")
MINUTES_PER_DAY = 24 * 60


class Schedule(msgspec.Struct, frozen=True, kw_only=True):
    """A parsed schedule. ``kind``: ``times`` (at given minutes of given weekdays; daily,
    weekday and interval schedules all reduce to this) or ``after`` (chained to another job)."""

    text: str
    kind: str
    days: tuple[int, ...] = ()
    minutes: tuple[int, ...] = ()  #: minutes after midnight, sorted
    after: str | None = None

    @property
    def timed(self) -> bool:
        return self.kind == "times"

    def next_after(self, t: dt.datetime) -> dt.datetime | None:
        """The first run strictly after ``t`` (aware), in ``t``'s time zone; None if chained."""
        if not self.timed:
            return None
        day = t.date()
        for _ in range(8):
            if day.weekday() in self.days:
                for m in self.minutes:
                    when = dt.datetime.combine(day, dt.time(m // 60, m % 60), tzinfo=t.tzinfo)
                    if when > t:
                        return when
            day += dt.timedelta(days=1)
        raise AssertionError(f"schedule {self.text!r} has no run within a week")  # parse() refuses those

    def due_between(self, start: dt.datetime, end: dt.datetime, limit: int = 10_000) -> list[dt.datetime]:
        """Runs in ``(start, end]``, oldest first, at most ``limit`` of them."""
        out: list[dt.datetime] = []
        t = self.next_after(start)
        while t is not None and t <= end and len(out) < limit:
            out.append(t)
            t = self.next_after(t)
        return out


class Window(msgspec.Struct, frozen=True, kw_only=True):
    """A backup window: open from ``start`` for ``length`` minutes on each of ``days``."""

    text: str
    days: tuple[int, ...]
    start: int  #: minutes after midnight
    length: int  #: minutes, 1 to 1440

    def _intervals(self, t: dt.datetime, back: int, ahead: int) -> list[tuple[dt.datetime, dt.datetime]]:
        out = []
        for k in range(-back, ahead + 1):
            day = t.date() + dt.timedelta(days=k)
            if day.weekday() in self.days:
                s = dt.datetime.combine(day, dt.time(self.start // 60, self.start % 60), tzinfo=t.tzinfo)
                out.append((s, s + dt.timedelta(minutes=self.length)))
        return out

    def interval_at(self, t: dt.datetime) -> tuple[dt.datetime, dt.datetime] | None:
        """The opening that contains ``t`` (start, end), or None when the window is closed."""
        return next(((s, e) for s, e in self._intervals(t, 1, 0) if s <= t < e), None)

    def is_open(self, t: dt.datetime) -> bool:
        return self.interval_at(t) is not None

    def closes(self, t: dt.datetime) -> dt.datetime | None:
        """When the opening that contains ``t`` ends (None if closed at ``t``)."""
        iv = self.interval_at(t)
        return iv[1] if iv else None

    def next_open(self, t: dt.datetime) -> dt.datetime:
        """``t`` if the window is open then, else when it opens next."""
        if self.is_open(t):
            return t
        return min(s for s, _ in self._intervals(t, 0, 7) if s >= t)


def _parse_days(text: str) -> tuple[int, ...]:
    if text in _DAY_ALIASES:
        return _DAY_ALIASES[text]
    days: set[int] = set()
    for part in text.split(","):
        first, sep, last = part.partition("-")
        try:
            a = _day(first)
            b = _day(last) if sep else a
        except ValueError:
            raise ConfigError(f"unknown weekday in {text!r}: use mon, tue, wed, thu, fri, sat, sun, ranges "
                              "like mon-fri, or weekdays / weekends") from None
        span = range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)]  # fri-mon wraps
        days.update(span)
    return tuple(sorted(days))


def _day(name: str) -> int:
    name = name.strip()
    if name in WEEKDAYS:
        return WEEKDAYS.index(name)
    if name in _FULL:
        return _FULL.index(name)
    raise ValueError(name)


_FULL = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def _parse_time(text: str) -> int:
    m = _TIME.match(text)
    if not m or int(m.group(1)) > 23 or int(m.group(2)) > 59:
        raise ConfigError(f"{text!r} is not a time of day: use HH:MM, 00:00 to 23:59")
    return int(m.group(1)) * 60 + int(m.group(2))


def parse_schedule(text: str) -> Schedule:
    """Parse a schedule (see the module docstring); ConfigError says what is wrong."""
    words = text.strip().split()
    low = [w.lower() for w in words]
    if not words:
        raise ConfigError("empty schedule: use e.g. 'daily 22:00', 'mon-fri 22:00', 'every 4h' or 'after JOB'")
    if low[0] == "after":
        if len(words) != 2:
            raise ConfigError(f"{text!r}: 'after' takes one job name")
        return Schedule(text=text, kind="after", after=words[1])
    if low[0] == "every":
        spec = "".join(low[1:])
        m = re.fullmatch(r"(\d+)([a-z]+)", spec)
        if not m or m.group(2) not in _UNITS:
            raise ConfigError(f"{text!r}: use 'every N minutes' or 'every N hours' (e.g. every 15m, every 4h)")
        step = int(m.group(1)) * _UNITS[m.group(2)]
        if not 1 <= step <= MINUTES_PER_DAY:
            raise ConfigError(f"{text!r}: the interval must be from 1 minute to 24 hours")
        return Schedule(text=text, kind="times", days=tuple(range(7)), minutes=tuple(range(0, MINUTES_PER_DAY, step)))
    rest = low[1:]
    if rest[:1] == ["at"]:
        rest = rest[1:]
    if not rest:
        raise ConfigError(f"{text!r}: give a time of day, e.g. '{low[0]} 22:00'")
    days = _parse_days(low[0])
    minutes = sorted({_parse_time(t) for part in rest for t in part.split(",") if t})
    return Schedule(text=text, kind="times", days=days, minutes=tuple(minutes))


def parse_window(text: str) -> Window:
    """Parse a backup window: ``HH:MM-HH:MM`` or ``DAYS HH:MM-HH:MM``."""
    words = text.strip().lower().split()
    if len(words) not in (1, 2):
        raise ConfigError(f"{text!r}: a window is 'HH:MM-HH:MM', optionally after weekdays ('mon-fri 22:00-06:00')")
    days = _parse_days(words[0]) if len(words) == 2 else tuple(range(7))
    start_s, sep, end_s = words[-1].partition("-")
    if not sep:
        raise ConfigError(f"{text!r}: a window is 'HH:MM-HH:MM'")
    start, end = _parse_time(start_s), _parse_time(end_s)
    length = (end - start) % MINUTES_PER_DAY or MINUTES_PER_DAY
    return Window(text=text, days=days, start=start, length=length)


# -- clocks ----------------------------------------------------------------------------------------


class Clock(Protocol):
    """Wall-clock time for schedules; the data path uses anyio's monotonic clock instead."""

    def now(self) -> dt.datetime:
        """Now, time-zone aware, in the daemon's time zone."""

    async def sleep_until(self, when: dt.datetime) -> None:
        """Return once ``now() >= when`` (cancellable)."""


class SystemClock:
    #: seconds slept at most before the wall clock is read again (it may jump: NTP, suspend)
    SLICE = 30.0

    def __init__(self, tz: dt.tzinfo | None = None) -> None:
        self.tz = tz or local_zone()

    def __repr__(self) -> str:
        return f"<SystemClock {self.tz}>"

    def now(self) -> dt.datetime:
        return dt.datetime.now(self.tz)

    async def sleep_until(self, when: dt.datetime) -> None:
        while (left := (when - self.now()).total_seconds()) > 0:
            await anyio.sleep(min(left, self.SLICE))


class ManualClock:
    """A clock that moves only through :meth:`advance` and :meth:`set` (tests, ``--manual-clock``)."""

    def __init__(self, start: dt.datetime) -> None:
        if start.tzinfo is None:
            raise ConfigError("the manual clock needs a time with a time zone, e.g. 2026-01-05T21:59:00+00:00")
        self.tz = start.tzinfo
        self._now = start
        self._moved: anyio.Event | None = None

    def __repr__(self) -> str:
        return f"<ManualClock {self._now.isoformat()}>"

    def now(self) -> dt.datetime:
        return self._now

    def set(self, t: dt.datetime) -> None:
        if t.tzinfo is None:
            t = t.replace(tzinfo=self.tz)
        if t < self._now:
            raise ConfigError(f"the clock does not go backwards (now {self._now.isoformat()})")
        self._now = t.astimezone(self.tz)
        if self._moved is not None:
            self._moved.set()
            self._moved = None

    def advance(self, seconds: float) -> None:
        self.set(self._now + dt.timedelta(seconds=seconds))

    async def sleep_until(self, when: dt.datetime) -> None:
        while self._now < when:
            if self._moved is None:
                self._moved = anyio.Event()
            await self._moved.wait()


def local_zone() -> dt.tzinfo:
    """The host's time zone: $TZ, else /etc/localtime's zone name, else the current UTC offset."""
    names = [os.environ.get("TZ", "").removeprefix(":")]
    try:
        names.append(str(Path("/etc/localtime").resolve()).split("/zoneinfo/", 1)[1])
    except (OSError, IndexError):
        pass
    for name in names:
        if name:
            try:
                return ZoneInfo(name)
            except (ZoneInfoNotFoundError, ValueError):
                continue
    return dt.datetime.now().astimezone().tzinfo or dt.timezone.utc


def zone(name: str | None) -> dt.tzinfo:
    """A time zone by IANA name (``Europe/Paris``, ``UTC``), or the host's for None."""
    if not name:
        return local_zone()
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"unknown time zone {name!r} (use an IANA name such as Europe/Paris or UTC)") from None


__all__ = ["Clock", "ManualClock", "Schedule", "SystemClock", "Window", "local_zone", "parse_schedule",
           "parse_window", "zone"]
