"""Retention decisions, checked against a simple reference model over many synthetic dates."""

from __future__ import annotations

import datetime as dt

import msgspec
import pytest
from blockferry.errors import ConfigError
from blockferry.repo.retention import RetentionPolicy, decide
from hypothesis import given, settings
from hypothesis import strategies as st

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


class P(msgspec.Struct, frozen=True):
    id: str
    object: str
    created: str
    immutable_until: str | None = None


def model(points: list[P], policy: RetentionPolicy, now: dt.datetime) -> set[str]:
    """The rules written out the slow, obvious way: for each object and each rule, the set of
    points the rule keeps."""
    keep: set[str] = set()
    for obj in {p.object for p in points}:
        pts = [p for p in points if p.object == obj]
        t = {p.id: dt.datetime.fromisoformat(p.created) for p in pts}
        newest_first = sorted(pts, key=lambda p: (t[p.id], p.id), reverse=True)
        if policy.keep_last:
            keep |= {p.id for p in newest_first[:policy.keep_last]}
        if policy.keep_days:
            newest = max(t.values())
            keep |= {p.id for p in pts if (newest - t[p.id]) <= dt.timedelta(days=policy.keep_days)}
        for rule, key in (("daily", lambda x: x.date()), ("weekly", lambda x: x.isocalendar()[:2]),
                          ("monthly", lambda x: (x.year, x.month)), ("yearly", lambda x: x.year)):
            n = getattr(policy, f"keep_{rule}")
            if not n:
                continue
            buckets: dict[object, list[P]] = {}
            for p in pts:
                buckets.setdefault(key(t[p.id]), []).append(p)
            for b in sorted(buckets, reverse=True)[:n]:  # the n most recent periods with points
                keep.add(max(buckets[b], key=lambda p: (t[p.id], p.id)).id)
        keep |= {p.id for p in pts if p.immutable_until and dt.datetime.fromisoformat(p.immutable_until) > now}
    return keep


stamps = st.datetimes(min_value=dt.datetime(2023, 1, 1), max_value=dt.datetime(2026, 11, 21)).map(
    lambda d: d.replace(tzinfo=UTC))
points_st = st.lists(
    st.builds(lambda i, o, c, imm: P(id=f"p{i:04d}", object=o, created=c.isoformat(),
                                     immutable_until=(c + dt.timedelta(days=imm)).isoformat() if imm else None),
              st.integers(0, 9999), st.sampled_from(["vm1", "vm2", "vm3"]), stamps,
              st.one_of(st.none(), st.integers(1, 2000))),
    max_size=60, unique_by=lambda p: p.id,
)
counts = st.one_of(st.none(), st.integers(1, 10))
policies = st.builds(
    lambda *a: a, counts, counts, counts, counts, counts, counts
).filter(lambda a: any(x is not None for x in a)).map(
    lambda a: RetentionPolicy(keep_last=a[0], keep_days=a[1], keep_daily=a[2], keep_weekly=a[3],
                              keep_monthly=a[4], keep_yearly=a[5]))


@settings(max_examples=300, deadline=None)
@given(points=points_st, policy=policies)
def test_decisions_match_the_reference_model(points: list[P], policy: RetentionPolicy) -> None:
    decisions = decide(points, policy, now=NOW)
    assert {d.point for d in decisions} == {p.id for p in points}
    kept = {d.point for d in decisions if d.keep}
    assert kept == model(points, policy, NOW)
    for d in decisions:  # a kept point says why; a dropped one has no reason
        assert bool(d.reasons) == d.keep


@settings(max_examples=100, deadline=None)
@given(points=points_st, policy=policies)
def test_the_newest_point_of_each_object_is_kept_by_last_and_days(points: list[P], policy: RetentionPolicy) -> None:
    if not (policy.keep_last or policy.keep_days or policy.keep_daily or policy.keep_weekly
            or policy.keep_monthly or policy.keep_yearly):
        return
    kept = {d.point for d in decide(points, policy, now=NOW) if d.keep}
    for obj in {p.object for p in points}:
        newest = max((p for p in points if p.object == obj), key=lambda p: (p.created, p.id))
        assert newest.id in kept  # every rule keeps the newest point of its first period


def test_gfs_example() -> None:
    # one point a day for 100 days
    pts = [P(id=f"d{i:03d}", object="vm", created=(NOW - dt.timedelta(days=i)).isoformat()) for i in range(100)]
    d = {x.point: x for x in decide(pts, RetentionPolicy(keep_last=7, keep_weekly=4, keep_monthly=3), now=NOW)}
    kept = sorted(p for p, x in d.items() if x.keep)
    assert [p for p in kept if "last 7" in d[p].reasons] == [f"d{i:03d}" for i in range(7)]
    weekly = [p for p in kept if any(r.startswith("weekly") for r in d[p].reasons)]
    monthly = [p for p in kept if any(r.startswith("monthly") for r in d[p].reasons)]
    assert len(weekly) == 4 and len(monthly) == 3
    assert "monthly 2026-11" in d["d000"].reasons  # the newest point is also the month's
    assert not d["d099"].keep and d["d099"].reasons == []


def test_immutable_points_are_kept_whatever_the_rules() -> None:
    pts = [P(id="old", object="vm", created="2020-01-01T00:00:00+00:00", immutable_until="2030-01-01T00:00:00+00:00"),
           P(id="new", object="vm", created="2026-11-20T00:00:00+00:00")]
    d = {x.point: x for x in decide(pts, RetentionPolicy(keep_last=1), now=NOW)}
    assert d["old"].keep and d["old"].reasons == ["immutable until 2030-01-01T00:00:00+00:00"]
    later = dt.datetime(2031, 1, 1, tzinfo=UTC)
    assert not {x.point: x for x in decide(pts, RetentionPolicy(keep_last=1), now=later)}["old"].keep


def test_a_policy_needs_a_rule() -> None:
    with pytest.raises(ConfigError, match="at least one rule"):
        RetentionPolicy(keep_last=None)
    assert RetentionPolicy().keep_last == 14  # the default
