"""Scheduler: job schedules, backup windows, job chaining; starts a JobManager per job run.

Each run is a session kept in the state database: created ``running`` when the run starts,
snapshotted while it runs (so a daemon that dies leaves the objects already committed on record),
and given its final state, results and statistics when it ends. While a run goes, its progress is
published to subscribers every ``progress_interval`` seconds.

Time comes from an injected :class:`~blockferry.jobs.calendars.Clock`. A helper task sleeps until the
next due run and then asks the actor to ``Tick``; everything else happens in ``handle``, one
message at a time. When a tick finds that several runs of a job fell due (the daemon was down,
or the wall clock jumped), it reports them as missed and runs one. A run due while the previous
one still goes, or outside the job's backup window, is recorded as skipped; a run still going when
its window closes is stopped. When a run ends with success or warning, the jobs chained after it
start.

Periodic backup copies (a job's ``copy_to`` targets with ``every_hours``) are scheduled here too:
every ``every_hours`` the latest point of each of the job's objects is copied to the target, as a
session of kind ``copy``. The first copy is due ``every_hours`` after the last successful one (at
once if there was none).

Lifecycle jobs (type ``prune``, ``gc``, ``verify``, ``copy``) take the same schedules, windows,
chains, manual runs and stops as backup jobs; each run is a session of that kind, done by
:func:`blockferry.jobs.maintenance.run_lifecycle` in a helper task on the store of the job's
repository, and stopped by cancelling that task (every lifecycle operation is safe to interrupt).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec
from blockferry.errors import ActorStoppedError, BlockferryError, ConflictError, NotFoundError
from blockferry.jobs.calendars import Clock, Schedule, parse_schedule, parse_window
from blockferry.jobs.catalog import JobConfig, LifecycleSpec, SourceConfig, chained_to, resolve
from blockferry.jobs.maintenance import run_lifecycle
from blockferry.jobs.messages import CancelJob, Message, SessionResult
from blockferry.jobs.statedb import StateDB
from blockferry.runtime.actor import Actor, Completion
from blockferry.runtime.events import EventBus
from blockferry.runtime.throttle import Throttle


class SetJobs(Message, frozen=True):
    """The configured jobs and sources changed (or are first known)."""

    jobs: list[JobConfig]
    sources: list[SourceConfig]


class RunNow(Message, frozen=True):
    job: str
    trigger: str = "manual"


class StopRun(Message, frozen=True):
    job: str
    reason: str = "stopped by request"


class StopAll(Message, frozen=True):
    """Stop every run and start no more; replies with a Completion set once none runs."""

    reason: str


class Tick(Message, frozen=True):
    pass


class RunEnded(Message, frozen=True):
    job: str
    result: SessionResult | None
    error: str | None = None
    #: a lifecycle run's final state and note (a backup run's come from its result)
    state: str | None = None
    note: str | None = None


class SchedulerStatusQuery(Message, frozen=True):
    pass


class RunInfo(msgspec.Struct, kw_only=True):
    session: int
    job: str
    trigger: str
    started: str
    stop_reason: str | None
    window_closes: str | None
    progress: dict[str, Any] | None


class NextRun(msgspec.Struct, kw_only=True):
    job: str
    schedule: str
    due: str | None  #: None for chained jobs
    enabled: bool


class SchedulerStatus(msgspec.Struct, kw_only=True):
    now: str
    running: list[RunInfo]
    next_runs: list[NextRun]
    stopping: bool


class _Run:
    """A running session."""

    def __init__(self, job: JobConfig, session: int, trigger: str, started: dt.datetime, throttle: Throttle) -> None:
        self.job = job
        self.session = session
        self.trigger = trigger
        self.started = started
        self.throttle = throttle
        self.handle: Any = None
        self.stop_reason: str | None = None
        self.window_closes: dt.datetime | None = None
        self.t0 = anyio.current_time()
        self.samples: list[tuple[float, int]] = []
        #: a lifecycle run: its helper task's scope (cancelled to stop it) and latest step
        self.scope: anyio.CancelScope | None = None
        self.step = ""

    def __repr__(self) -> str:
        return f"<Run {self.job.name} session={self.session} {self.trigger}>"


class Scheduler(Actor[Any]):
    def __init__(self, *, server: Any, db: StateDB, bus: EventBus, clock: Clock, throttle: Throttle,
                 jobs: list[JobConfig], sources: list[SourceConfig], progress_interval: float = 0.5,
                 snapshot_interval: float = 2.0,
                 prepare: Callable[[JobConfig], Awaitable[None]] | None = None) -> None:
        super().__init__("scheduler")
        self.server = server
        self.db = db
        self.bus = bus
        self.clock = clock
        self.throttle = throttle  #: the daemon-wide bandwidth limit
        self.jobs = {j.name: j for j in jobs}
        self.sources = list(sources)
        self.progress_interval = progress_interval
        self.snapshot_interval = snapshot_interval
        #: called before a run starts (the daemon reopens a repository that was unavailable)
        self.prepare = prepare
        self.runs: dict[str, _Run] = {}
        self.next_due: dict[str, dt.datetime] = {}
        self._schedules: dict[str, Schedule] = {}
        self._ticked = False
        self._stopping = False
        self._idle: Completion[None] | None = None
        self._sleep: anyio.CancelScope | None = None
        #: periodic copies: (job, target URL) -> when the next one is due; those running now
        self.copy_due: dict[tuple[str, str], dt.datetime] = {}
        self._copying: dict[tuple[str, str], int] = {}

    def __repr__(self) -> str:
        return f"<Scheduler jobs={len(self.jobs)} running={sorted(self.runs)}>"

    def session_of(self, job: str) -> int | None:
        """The session of ``job``'s current run (what log lines about the job belong to)."""
        run = self.runs.get(job)
        return run.session if run else None

    # -- life cycle ------------------------------------------------------------------------------

    async def on_start(self) -> None:
        for name, due in (await self.db.next_due()).items():
            if due:
                self.next_due[name] = dt.datetime.fromisoformat(due)
        self._parse()
        await self._plan_copies()
        self.start_soon(self._ticker)

    async def _ticker(self) -> None:
        while True:
            wake = min(self._wake_times(), default=None)
            with anyio.CancelScope() as self._sleep:
                if wake is None:
                    await anyio.sleep_forever()
                else:
                    await self.clock.sleep_until(wake)
            self._sleep = None
            try:
                await self.ask(Tick(), timeout=None)
            except ActorStoppedError:
                return

    def _wake_times(self) -> list[dt.datetime]:
        if self._stopping:
            return []
        if not self._ticked:
            return [self.clock.now()]  # the first tick finds what was missed while the daemon was down
        return [*(d for name, d in self.next_due.items() if name in self._schedules), *self.copy_due.values()]

    def _rethink(self) -> None:
        """The next wake-up may have changed: wake the ticker so it recomputes."""
        if self._sleep is not None:
            self._sleep.cancel()

    def _parse(self) -> None:
        self._schedules = {}
        for name, job in self.jobs.items():
            if job.settings.schedule and job.settings.enabled:
                s = parse_schedule(job.settings.schedule)
                if s.timed:
                    self._schedules[name] = s

    # -- messages --------------------------------------------------------------------------------

    async def handle(self, msg: Any) -> Any:
        match msg:
            case Tick():
                return await self._tick()
            case RunNow(job=job, trigger=trigger):
                return await self._start(job, trigger)
            case StopRun(job=job, reason=reason):
                run = self.runs.get(job)
                if run is None:
                    raise NotFoundError(f"job {job} is not running")
                await self._stop(run, reason)
                return run.session
            case StopAll(reason=reason):
                self._stopping = True
                self._idle = Completion()
                for run in list(self.runs.values()):
                    await self._stop(run, reason)
                if not self.runs:
                    self._idle.set_result(None)
                return self._idle
            case RunEnded(job=job, result=result, error=error, state=state, note=note):
                return await self._ended(job, result, error, state, note)
            case SetJobs(jobs=jobs, sources=sources):
                return await self._set_jobs(jobs, sources)
            case SchedulerStatusQuery():
                return self.status()
        raise BlockferryError(f"{self.name}: unexpected message {type(msg).__name__}")

    def status(self) -> SchedulerStatus:
        return SchedulerStatus(
            now=self.clock.now().isoformat(),
            running=[RunInfo(session=r.session, job=r.job.name, trigger=r.trigger, started=r.started.isoformat(),
                             stop_reason=r.stop_reason,
                             window_closes=r.window_closes.isoformat() if r.window_closes else None,
                             progress=self.progress(r)) for r in self.runs.values()],
            next_runs=[NextRun(job=j.name, schedule=j.settings.schedule or "", enabled=j.settings.enabled,
                               due=self.next_due[j.name].isoformat() if j.name in self._schedules else None)
                       for j in self.jobs.values() if j.settings.schedule],
            stopping=self._stopping,
        )

    async def _set_jobs(self, jobs: list[JobConfig], sources: list[SourceConfig]) -> None:
        old = self.jobs
        self.jobs = {j.name: j for j in jobs}
        self.sources = list(sources)
        self._parse()
        now = self.clock.now()
        for name in list(self.next_due):
            if name not in self.jobs:
                del self.next_due[name]
        for name, sched in self._schedules.items():
            before = old.get(name)
            changed = before is None or before.settings.schedule != self.jobs[name].settings.schedule \
                or not before.settings.enabled
            if changed or name not in self.next_due:
                await self._set_due(name, sched.next_after(now))
        await self._plan_copies()
        for name, run in self.runs.items():  # a new limit applies to a running job at once
            if name in self.jobs:
                run.throttle.set_rate(self.jobs[name].settings.throttle)
        self._rethink()

    async def _set_due(self, name: str, due: dt.datetime | None) -> None:
        if due is None:
            self.next_due.pop(name, None)
        else:
            self.next_due[name] = due
        await self.db.set_next_due(name, due.isoformat() if due else None)

    # -- periodic copies ---------------------------------------------------------------------------

    def _periodic(self) -> dict[tuple[str, str], Any]:
        return {(j.name, t.url): t for j in self.jobs.values() for t in (j.backup.copy_to if j.backup else [])
                if t.every_hours is not None and j.settings.enabled}

    async def _plan_copies(self) -> None:
        targets = self._periodic()
        for key in list(self.copy_due):
            if key not in targets:
                del self.copy_due[key]
        for key, target in targets.items():
            if key not in self.copy_due:
                last = await self.db.last_success(key[0], "copy", key[1])
                self.copy_due[key] = (dt.datetime.fromisoformat(last) + dt.timedelta(hours=target.every_hours)
                                      if last else self.clock.now())

    async def _copy(self, key: tuple[str, str], target: Any, sid: int) -> None:
        """Copy the latest point of each of the job's objects to the target (a helper task)."""
        from blockferry.repo.lifecycle import copy_to_url, points_to_copy

        name, url = key
        job = self.jobs[name]
        state, note, result = "failed", None, SessionResult(job=name, started=self.clock.now().isoformat())
        try:
            repo = self.server.repositories.get(job.spec.repository)
            if repo is None or repo.store is None:
                raise BlockferryError(f"repository {job.spec.repository} is not open")
            assert job.backup is not None
            points = await points_to_copy(repo.store, objects=[o.name for o in job.backup.objects], latest=True)
            report = await copy_to_url(repo.store, url, points, runtime=self.server.runtime,
                                       retention=target.retention)
            result.copied[url], result.pruned = report.points, report.pruned
            state = "success"
            self.log.info("copy_done", job=name, session=sid, target=url, points=len(report.points))
        except BlockferryError as exc:
            note = str(exc)
            self.log.warning("copy_failed", job=name, session=sid, target=url, error=note)
        except anyio.get_cancelled_exc_class():
            state, note = "stopped", "the daemon is shutting down"
            raise
        finally:
            self._copying.pop(key, None)
            result.state, result.ended = state, self.clock.now().isoformat()
            with anyio.CancelScope(shield=True):
                await self.db.update_session(sid, state=state, ended=result.ended, note=note, result=result)
            self.bus.publish("session", {"session": sid, "job": name, "kind": "copy", "target": url,
                                         "trigger": "schedule", "state": state, "note": note})

    async def _start_copies(self, now: dt.datetime) -> None:
        targets = self._periodic()
        for key, due in list(self.copy_due.items()):
            if due > now or key in self._copying or key not in targets:
                continue
            target = targets[key]
            step = dt.timedelta(hours=target.every_hours)
            while due <= now:  # missed ones are not made up for: the latest points are what a copy sends
                due += step
            self.copy_due[key] = due
            sid = await self.db.create_session(key[0], "schedule", "running", now.isoformat(), pid=os.getpid(),
                                               kind="copy", target=key[1])
            self._copying[key] = sid
            self.bus.publish("session", {"session": sid, "job": key[0], "kind": "copy", "target": key[1],
                                         "trigger": "schedule", "state": "running"})
            self.start_soon(self._copy, key, target, sid)

    # -- the schedule ----------------------------------------------------------------------------

    async def _tick(self) -> None:
        now = self.clock.now()
        startup, self._ticked = not self._ticked, True
        if self._stopping:
            return
        await self._start_copies(now)
        for name, sched in list(self._schedules.items()):
            due = self.next_due.get(name)
            if due is None:
                await self._set_due(name, sched.next_after(now))
                continue
            if due > now:
                continue
            fell_due = [due, *sched.due_between(due, now)]
            await self._set_due(name, sched.next_after(now))
            job = self.jobs[name]
            if startup:  # every one of them passed while the daemon was not running
                note = (f"{len(fell_due)} scheduled run(s) missed while the daemon was not running "
                        f"({_span(fell_due)})")
                if job.settings.run_missed:
                    note += "; one runs now"
                await self._record(name, "schedule", "missed", fell_due[0], note)
                if job.settings.run_missed:
                    await self._start_quietly(name, "missed")
                continue
            if len(fell_due) > 1:  # the clock jumped (suspend, a clock change)
                await self._record(name, "schedule", "missed", fell_due[0],
                                   f"{len(fell_due) - 1} scheduled run(s) missed ({_span(fell_due[:-1])})")
            await self._start_quietly(name, "schedule")

    async def _start_quietly(self, name: str, trigger: str) -> None:
        """Start a run the scheduler decided on; a refusal is recorded, not raised."""
        run = self.runs.get(name)
        if run is not None:
            await self._record(name, trigger, "skipped", self.clock.now(),
                               f"the previous run (session {run.session}) was still running")
            return
        try:
            await self._start(name, trigger)
        except BlockferryError as exc:
            await self._record(name, trigger, "skipped", self.clock.now(), str(exc))

    async def _record(self, job: str, trigger: str, state: str, when: dt.datetime, note: str) -> int:
        """A session for a run that did not happen (missed, skipped)."""
        sid = await self.db.create_session(job, trigger, state, when.isoformat(), note=note,
                                           ended=self.clock.now().isoformat())
        self.log.warning("run_" + state, job=job, session=sid, trigger=trigger, note=note)
        self.bus.publish("session", {"session": sid, "job": job, "trigger": trigger, "state": state, "note": note})
        return sid

    # -- runs ------------------------------------------------------------------------------------

    async def _start(self, name: str, trigger: str) -> int:
        job = self.jobs.get(name)
        if job is None:
            raise NotFoundError(f"no job named {name!r}")
        if name in self.runs:
            raise ConflictError(f"job {name} is already running (session {self.runs[name].session})")
        if self._stopping:
            raise ConflictError("the daemon is shutting down")
        now = self.clock.now()
        window_closes = None
        if trigger != "manual" and job.settings.window:
            window = parse_window(job.settings.window)
            window_closes = window.closes(now)
            if window_closes is None:
                return await self._record(name, trigger, "skipped", now,
                                          f"outside the backup window {job.settings.window}")
        if job.type != "backup":
            return await self._start_lifecycle(job, trigger, now, window_closes)
        sid = await self.db.create_session(name, trigger, "running", now.isoformat(), pid=os.getpid())
        run = _Run(job, sid, trigger, now, Throttle(job.settings.throttle, name=f"job:{name}"))
        run.window_closes = window_closes
        self.runs[name] = run
        try:
            if self.prepare is not None:
                await self.prepare(job)
            run.handle = await self.server.run_job(resolve(job, self.sources), throttles=[run.throttle, self.throttle])
        except BlockferryError as exc:
            del self.runs[name]
            await self.db.update_session(sid, state="failed", ended=self.clock.now().isoformat(), note=str(exc))
            self.log.warning("run_failed_to_start", job=name, session=sid, error=str(exc))
            self.bus.publish("session", {"session": sid, "job": name, "trigger": trigger, "state": "failed",
                                         "note": str(exc)})
            return sid
        self.log.info("session_started", job=name, session=sid, trigger=trigger)
        self.bus.publish("session", {"session": sid, "job": name, "trigger": trigger, "state": "running",
                                     "started": now.isoformat()})
        self.start_soon(self._watch, run)
        return sid

    async def _start_lifecycle(self, job: JobConfig, trigger: str, now: dt.datetime,
                               window_closes: dt.datetime | None) -> int:
        """Start a lifecycle job's run (prune, gc, verify, copy) as a helper task."""
        spec = job.spec
        assert isinstance(spec, LifecycleSpec)
        target = spec.to if spec.type == "copy" else None
        sid = await self.db.create_session(job.name, trigger, "running", now.isoformat(), pid=os.getpid(),
                                           kind=spec.type, target=target)
        run = _Run(job, sid, trigger, now, Throttle(0, name=f"job:{job.name}"))
        run.window_closes = window_closes
        self.runs[job.name] = run
        self.log.info("session_started", job=job.name, session=sid, trigger=trigger, kind=spec.type)
        self.bus.publish("session", {"session": sid, "job": job.name, "kind": spec.type, "target": target,
                                     "trigger": trigger, "state": "running", "started": now.isoformat()})
        self.start_soon(self._lifecycle, run)
        return sid

    async def _lifecycle(self, run: _Run) -> None:
        """Run a lifecycle job (a helper task); hand its outcome to the actor."""
        job, spec = run.job, run.job.spec
        assert isinstance(spec, LifecycleSpec)
        result = SessionResult(job=job.name, started=run.started.isoformat())
        state, note = "failed", None
        async with anyio.create_task_group() as tg:
            if run.window_closes is not None:
                tg.start_soon(self._guard_window, run, run.window_closes)
            with anyio.CancelScope() as run.scope:
                if run.stop_reason is not None:  # stopped before it began
                    run.scope.cancel()
                try:
                    if self.prepare is not None:
                        await self.prepare(job)
                    repo = self.server.repositories.get(spec.repository)
                    if repo is None or repo.store is None:
                        raise BlockferryError(f"repository {spec.repository} is not open")
                    outcome = await run_lifecycle(spec, repo.store, self.server.runtime, result,
                                                  say=lambda step: setattr(run, "step", step))
                    state, note = outcome.state, outcome.note
                except BlockferryError as exc:
                    state, note = "failed", str(exc)[:1000]
                    self.log.warning("lifecycle_failed", job=job.name, session=run.session, kind=spec.type,
                                     error=str(exc))
            if run.scope.cancelled_caught or (run.stop_reason is not None and state == "failed" and note is None):
                state, note = "stopped", run.stop_reason
            tg.cancel_scope.cancel()
        result.state, result.duration = state, anyio.current_time() - run.t0
        result.ended = self.clock.now().isoformat()
        try:
            await self.tell(RunEnded(job.name, result, None, state, note))
        except ActorStoppedError:
            with anyio.CancelScope(shield=True):  # the daemon is stopping: record it here
                await self.db.update_session(run.session, state="stopped", ended=result.ended,
                                             note="the daemon is shutting down", result=result)

    async def _stop(self, run: _Run, reason: str) -> None:
        if run.stop_reason is None:
            run.stop_reason = reason
            self.log.info("session_stopping", job=run.job.name, session=run.session, reason=reason)
        if run.handle is None:  # a lifecycle run
            if run.scope is not None:
                run.scope.cancel()
            return
        try:
            await run.handle.manager.ask(CancelJob(reason), timeout=10)
        except (BlockferryError, TimeoutError):
            pass  # it is ending on its own

    async def _watch(self, run: _Run) -> None:
        """Report progress until the run ends, stop it when its window closes, then hand the
        result to the actor."""
        result: SessionResult | None = None
        error: str | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._report, run)
            if run.window_closes is not None:
                tg.start_soon(self._guard_window, run, run.window_closes)
            try:
                result = await run.handle.result()
            except Exception as exc:
                error = f"the job manager failed: {exc!r}"
            tg.cancel_scope.cancel()
        try:
            await self.tell(RunEnded(run.job.name, result, error))
        except ActorStoppedError:
            pass

    async def _guard_window(self, run: _Run, closes: dt.datetime) -> None:
        await self.clock.sleep_until(closes)
        try:
            await self.tell(StopRun(run.job.name, f"the backup window {run.job.settings.window} closed"))
        except ActorStoppedError:
            pass

    async def _report(self, run: _Run) -> None:
        last_snapshot = anyio.current_time()
        last_states: tuple[str, ...] = ()
        while True:
            if self.bus.wants("progress"):
                data = self.progress(run)
                if data is not None:
                    self.bus.publish("progress", data)
            manager = run.handle.manager
            states = tuple(o.state for o in manager.session.objects)
            now = anyio.current_time()
            if states != last_states and now - last_snapshot >= self.snapshot_interval:
                last_states, last_snapshot = states, now
                await self.db.update_session(run.session, result=manager.session)
            await anyio.sleep(self.progress_interval)

    def progress(self, run: _Run) -> dict[str, Any] | None:
        """A running session's progress: per disk and for the job, with the recent rate (for a
        lifecycle run, its current step)."""
        if run.handle is None:
            if run.job.type == "backup":
                return None
            return {"session": run.session, "job": run.job.name, "kind": run.job.type,
                    "state": "stopping" if run.stop_reason else "running", "elapsed": anyio.current_time() - run.t0,
                    "step": run.step}
        st = run.handle.manager.status()
        done = sum(t.done_bytes for t in st.tasks)
        total = sum(t.total_bytes for t in st.tasks)
        now = anyio.current_time()
        run.samples = [s for s in run.samples if now - s[0] <= 5.0][-20:]
        run.samples.append((now, done))
        t_first, d_first = run.samples[0]
        rate = (done - d_first) / (now - t_first) if now > t_first else 0.0
        return {
            "session": run.session, "job": run.job.name, "state": "stopping" if run.stop_reason else "running",
            "elapsed": now - run.t0, "done_bytes": done, "total_bytes": total, "rate": rate,
            "tasks": [msgspec.to_builtins(t) for t in st.tasks],
        }

    async def _ended(self, name: str, result: SessionResult | None, error: str | None,
                     final: str | None = None, final_note: str | None = None) -> None:
        run = self.runs.pop(name, None)
        if run is None:
            return
        if run.job.type != "backup":
            state, note = (final or "failed"), final_note
            if run.stop_reason and state == "stopped":
                note = run.stop_reason
        elif result is None:
            state, note = "failed", error
        elif run.stop_reason and any(o.state != "done" for o in result.objects):
            state, note = "stopped", run.stop_reason
        else:
            state, note = result.state, None
            if state == "failed":
                note = "; ".join(f"{o.name}: {o.error}" for o in result.objects if o.error)[:1000] or None
        ended = self.clock.now().isoformat()
        await self.db.update_session(run.session, state=state, ended=ended, note=note, result=result)
        self.log.info("session_ended", job=name, session=run.session, state=state, note=note)
        event: dict[str, Any] = {"session": run.session, "job": name, "trigger": run.trigger, "state": state,
                                 "ended": ended, "note": note}
        if run.job.type != "backup":
            event["kind"] = run.job.type
            if result is not None:
                event["summary"] = result.summary
        elif result is not None:
            event["points"] = result.points
        self.bus.publish("session", event)
        if state in ("success", "warning") and not self._stopping:
            for job in list(self.jobs.values()):
                if job.settings.enabled and chained_to(job) == name:
                    await self._start_quietly(job.name, "chain")
        if not self.runs and self._idle is not None:
            self._idle.set_result(None)
        self._rethink()


def _span(times: list[dt.datetime]) -> str:
    first, last = times[0].isoformat(timespec="minutes"), times[-1].isoformat(timespec="minutes")
    return first if first == last else f"{first} to {last}"


__all__ = ["NextRun", "RunEnded", "RunInfo", "RunNow", "Scheduler", "SchedulerStatus", "SchedulerStatusQuery",
           "SetJobs", "StopAll", "StopRun", "Tick"]
