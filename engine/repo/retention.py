"""Retention: which restore points to keep, and why.

Rules apply to each object (VM) on its own, over its points newest first, in the style of GFS
and of keep-last/daily/weekly/monthly/yearly prune rules:

* ``keep_last N`` — the N newest points;
* ``keep_days N`` — every point made within N days before the object's newest point (relative to
  the newest point, not to now, so a VM whose backups stopped keeps its last points);
* ``keep_daily/weekly/monthly/yearly N`` — the newest point of each of the N most recent days,
  ISO weeks, months or years that have points (the long-term, GFS points);
* a point still immutable is always kept, whatever the rules say.

A point is kept if any rule keeps it; :func:`decide` says which rules did.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from typing import Annotated, Protocol

import msgspec
from blockferry.errors import ConfigError

Count = Annotated[int, msgspec.Meta(ge=1)]


class RetentionPolicy(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What a job keeps. The default keeps the last 14 points."""

    keep_last: Count | None = 14
    keep_days: Count | None = None
    keep_daily: Count | None = None
    keep_weekly: Count | None = None
    keep_monthly: Count | None = None
    keep_yearly: Count | None = None

    def __post_init__(self) -> None:
        if all(getattr(self, f) is None for f in self.__struct_fields__):
            raise ConfigError("a retention policy needs at least one rule (keep-last, keep-days, keep-weekly...)")

    def describe(self) -> str:
        return ", ".join(f"{f.removeprefix('keep_')} {getattr(self, f)}" for f in self.__struct_fields__
                         if getattr(self, f) is not None)


class PointLike(Protocol):
    id: str
    object: str
    created: str
    immutable_until: str | None


class RetentionDecision(msgspec.Struct, frozen=True, kw_only=True):
    point: str
    object: str
    created: str
    keep: bool
    reasons: list[str]  #: why it is kept (empty when it goes)


def parse_time(text: str) -> dt.datetime:
    t = dt.datetime.fromisoformat(text)
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


_BUCKETS: dict[str, Callable[[dt.datetime], str]] = {
    "daily": lambda t: t.strftime("%Y-%m-%d"),
    "weekly": lambda t: "%04d-W%02d" % t.isocalendar()[:2],
    "monthly": lambda t: t.strftime("%Y-%m"),
    "yearly": lambda t: t.strftime("%Y"),
}


def decide(points: Iterable[PointLike], policy: RetentionPolicy, *,
           now: dt.datetime | None = None) -> list[RetentionDecision]:
    """Keep or drop every point, with reasons; newest first within each object."""
    now = now or dt.datetime.now(dt.timezone.utc)
    by_object: dict[str, list[PointLike]] = {}
    for p in points:
        by_object.setdefault(p.object, []).append(p)
    out: list[RetentionDecision] = []
    for obj in sorted(by_object):
        pts = sorted(by_object[obj], key=lambda p: (parse_time(p.created), p.id), reverse=True)
        reasons: dict[str, list[str]] = {p.id: [] for p in pts}
        if policy.keep_last:
            for p in pts[:policy.keep_last]:
                reasons[p.id].append(f"last {policy.keep_last}")
        if policy.keep_days:
            limit = parse_time(pts[0].created) - dt.timedelta(days=policy.keep_days)
            for p in pts:
                if parse_time(p.created) >= limit:
                    reasons[p.id].append(f"within {policy.keep_days} days of the newest point")
        for name, key in _BUCKETS.items():
            n = getattr(policy, f"keep_{name}")
            if not n:
                continue
            seen: set[str] = set()
            for p in pts:
                bucket = key(parse_time(p.created))
                if bucket not in seen:
                    seen.add(bucket)
                    reasons[p.id].append(f"{name} {bucket}")
                    if len(seen) == n:
                        break
        for p in pts:
            if p.immutable_until and parse_time(p.immutable_until) > now:
                reasons[p.id].append(f"immutable until {p.immutable_until}")
        out.extend(RetentionDecision(point=p.id, object=obj, created=p.created, keep=bool(reasons[p.id]),
                            reasons=reasons[p.id]) for p in pts)
    return out


def kept(decisions: Sequence[RetentionDecision]) -> list[str]:
    return [d.point for d in decisions if d.keep]
