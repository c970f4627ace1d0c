"""What one run of a lifecycle job does in the daemon: prune, gc, verify or copy on the store the
daemon's Repository actor already has open, and the session it makes of the outcome.

The scheduler (actors/scheduler.py) decides when a run starts and records it as a session of
kind ``prune``, ``gc``, ``verify`` or ``copy``; :func:`run_lifecycle` does the work and says how
it went:

* **prune** removes the points the job's retention does not keep, on the daemon's store (so the
  daemon's list of points stays right). Like ``blockferry prune`` and a backup job's own
  retention, it takes no writer lock: removing a manifest never removes a chunk, and a backup
  that based an incremental on a removed point still has every chunk until a collection, which
  waits for that backup. A point that became immutable since the decision is kept and makes the
  session end ``warning``.
* **gc** runs the collection of engine/repo/gc.py on a second store over the *same* backend: the
  collection keeps its own index and pack writer, as a collection from another process does
  (the case the collection's safety argument and tests cover), so a daemon backup running at the
  same time never shares half-written state with it. It takes ``locks/gc``; a sweep blocked by a
  backup or reader that started before its plan is deferred (session ``warning``, the next run
  finishes it). After a sweep the daemon's store reloads its index, which no longer lists the
  packs the sweep deleted.
* **verify** re-reads every chunk (or ``sample`` percent) on the daemon's store, so the damaged
  copies it finds are masked for the daemon's next backups at once, which then heal the points.
  Damage found ends the session ``failed``, with the damaged points named in its note: a point
  that does not restore whole is what a health check exists to raise an alarm about.
* **copy** copies points (every point, or with ``latest`` the newest of each object; only the
  ``objects`` named, if any) to the repository at ``to``, then applies the copy's retention there.
  :func:`run_copy` does it, as it does every backup copy (a backup job's immediate copies and the
  scheduler's periodic ones too: the Repository actor runs it for a :class:`CopyPoints` ask).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import msgspec
from blockferry.jobs.catalog import LifecycleSpec
from blockferry.jobs.messages import CopyPoints, Outcome, SessionResult
from blockferry.repo.gc import DEFAULT_REWRITE_THRESHOLD, collect
from blockferry.repo.lifecycle import CopyReport, copy_to_url, points_to_copy, prune
from blockferry.repo.store import RepositoryStore
from blockferry.repo.verify import verify
from blockferry.runtime.resources import Runtime
from blockferry.units import human


async def run_lifecycle(spec: LifecycleSpec, store: RepositoryStore, runtime: Runtime, result: SessionResult,
                        *, say: Callable[[str], None] | None = None) -> Outcome:
    """Run ``spec``'s operation on ``store``; fill ``result`` (summary, report, pruned, copied,
    warnings) as it goes. Engine errors propagate (the caller makes the session ``failed``)."""
    say = say or (lambda _: None)
    if spec.type == "prune":
        return await _prune(spec, store, result)
    if spec.type == "gc":
        return await _gc(spec, store, result, say)
    if spec.type == "verify":
        return await _verify(spec, store, runtime, result, say)
    if spec.type == "copy":
        return await _copy(spec, store, runtime, result, say)
    raise AssertionError(f"unknown lifecycle job type {spec.type!r}")


def _report(report: Any) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.to_builtins(report)
    return data


async def _prune(spec: LifecycleSpec, store: RepositoryStore, result: SessionResult) -> Outcome:
    assert spec.retention is not None
    report = await prune(store, spec.retention, objects=spec.objects)
    result.report, result.pruned = _report(report), list(report.removed)
    kept = [d for d in report.decisions if d.keep]
    reasons: dict[str, int] = {}
    for d in kept:
        for r in d.reasons:
            rule = r.split(" ")[0] if not r.startswith("within") else "days"
            reasons[rule] = reasons.get(rule, 0) + 1
    result.summary = (f"removed {len(report.removed)} of {len(report.decisions)} point(s), kept {len(kept)} "
                      f"({report.policy})" + (f"; kept by: {', '.join(f'{k} {v}' for k, v in sorted(reasons.items()))}"
                                              if reasons else ""))
    for r in report.refused:
        result.warnings.append(f"point {r.point} kept: {r.reason}")
    if report.refused:
        return Outcome(state="warning", note=f"{len(report.refused)} point(s) the policy drops are immutable and stay")
    return Outcome()


async def _gc(spec: LifecycleSpec, store: RepositoryStore, result: SessionResult, say: Callable[[str], None]) -> Outcome:
    own = RepositoryStore(store.backend, store.config)  # see the module docstring
    threshold = spec.rewrite_threshold if spec.rewrite_threshold is not None else DEFAULT_REWRITE_THRESHOLD
    try:
        report = await collect(own, rewrite_threshold=threshold, wait=spec.wait or 0.0, progress=say)
        if report.state != "deferred":
            # no plan is left: nothing is condemned any more (a deferred plan still is, and a
            # daemon backup that started after it must keep not deduplicating against it)
            store.condemned = set()
    finally:
        if store.index_loaded:  # a sweep, even a partial one, may have moved or deleted packs
            with anyio.CancelScope(shield=True):
                await store.load_index(reload=True)
    result.report = _report(report)
    result.summary = (f"{report.state}: {human(report.bytes_freed)} freed, {report.packs_deleted} pack(s) deleted, "
                      f"{report.packs_rewritten} rewritten")
    if report.state == "deferred":
        result.warnings.append(f"sweep deferred: {report.reason}")
        return Outcome(state="warning", note=f"sweep deferred to the next run: {report.reason}"[:1000])
    return Outcome()


async def _verify(spec: LifecycleSpec, store: RepositoryStore, runtime: Runtime, result: SessionResult,
                  say: Callable[[str], None]) -> Outcome:
    report = await verify(store, runtime, sample=spec.sample,
                          progress=lambda done, total: say(f"checked {done} of {total} chunk(s)"))
    result.report = _report(report)
    what = "every chunk" if spec.sample is None else f"a {spec.sample:g}% sample"
    result.summary = (f"checked {report.chunks_checked} chunk(s) ({human(report.bytes_checked)}, {what}) of "
                      f"{report.points} point(s): "
                      + ("healthy" if report.healthy else
                         f"{len(report.damaged)} damaged chunk(s), {len(report.damaged_files)} damaged file(s), "
                         f"{len(report.unreadable)} unreadable"))
    result.warnings += report.notes
    if report.healthy:
        return Outcome()
    for u in report.unreadable:
        result.warnings.append(f"{u.key} could not be read: {u.reason} (not recorded as damage)")
    if not report.has_damage:
        return Outcome(state="failed", note=f"check incomplete: {len(report.unreadable)} object(s) could not be read")
    points = sorted({a.point for a in report.affected})
    for f in report.damaged_files:
        result.warnings.append(f"damaged {f.key}: {f.reason}")
    for a in report.affected:
        result.warnings.append(f"point {a.point} ({a.object}) disk {a.disk}: {a.damaged_blocks} damaged block(s)")
    note = f"damage found: {len(report.damaged)} chunk(s)"
    note += f", {len(report.damaged_files)} damaged file(s)" if report.damaged_files else ""
    note += f"; damaged point(s): {', '.join(points)}" if points else "; no point uses them"
    return Outcome(state="failed", note=note[:1000])


async def run_copy(store: RepositoryStore, runtime: Runtime, order: CopyPoints) -> CopyReport:
    """Copy the points ``order`` names or selects from ``store`` to its target, then apply the
    target's retention (every backup copy comes here)."""
    ids = order.points
    if ids is None:
        ids = await points_to_copy(store, objects=order.objects, latest=order.latest)
    return await copy_to_url(store, order.to, ids, runtime=runtime, retention=order.retention,
                             progress=order.progress)


async def _copy(spec: LifecycleSpec, store: RepositoryStore, runtime: Runtime, result: SessionResult,
                say: Callable[[str], None]) -> Outcome:
    assert spec.to is not None
    report = await run_copy(store, runtime, CopyPoints(
        to=spec.to, objects=spec.objects, latest=spec.latest, retention=spec.retention,
        progress=lambda done, total: say(f"copied {done} of {total} point(s)")))
    result.report = _report(report)
    result.copied[spec.to], result.pruned = list(report.points), list(report.pruned)
    result.summary = (f"copied {len(report.points)} point(s) ({len(report.skipped)} already there), "
                      f"{human(report.bytes_written)} sent")
    if report.pruned:
        result.summary += f"; the target's retention removed {len(report.pruned)}"
    return Outcome()


__all__ = ["Outcome", "run_copy", "run_lifecycle"]
