"""JobManager: one job run (a session).

Makes one task per disk, in the order of the job's objects, and queues every task for a proxy
slot and a repository slot at once, so objects start in order and run in parallel as far as the
limits allow. For each task: wait for slots (the task shows as ``waiting``), check that the
repository is available (before any source is opened), find the base point when hints are given,
connect a target mover and a source mover with a bounded stream, and wait for both. When every
disk of an object is done, commit its restore point. A transient failure retries the object.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import anyio
import msgspec
from blockferry.actors.repository import copy_points, repository_work
from blockferry.actors.source_mover import DownstreamClosedError
from blockferry.actors.target_mover import UpstreamEndedError
from blockferry.datapath.hints import load_hints
from blockferry.errors import BlockferryError, unwrap_group
from blockferry.jobs.config import DiskSpec, JobSpec, ObjectSpec, expand_disks
from blockferry.jobs.messages import (
    ApplyRetention,
    CancelJob,
    CancelMove,
    CheckAvailable,
    CommitPoint,
    CopyPoints,
    DataItem,
    DiskResult,
    FindBase,
    JobInbox,
    JobStatus,
    JobStatusQuery,
    MoverInbox,
    ObjectResult,
    OpenTarget,
    RepositoryInbox,
    RunSource,
    SessionQuery,
    SessionResult,
    TaskStatus,
)
from blockferry.jobs.slots import ProxyEntry, ResourceScheduler, Slots, Ticket
from blockferry.jobs.task import TaskContext
from blockferry.registry import source_plugin
from blockferry.repo.format import DiskRecord, Manifest, TaskStats, new_point_id, utc_now
from blockferry.repo.lifecycle import PruneReport
from blockferry.runtime.actor import Actor, Completion, Decision, SupervisionPolicy
from blockferry.runtime.resources import Runtime
from blockferry.runtime.throttle import BandwidthLimit


def immutable_until(created: str, *days: int | None) -> str | None:
    """The end of a point's immutability: the longest of the settings, from its creation."""
    longest = max((d for d in days if d), default=None)
    if longest is None:
        return None
    return (dt.datetime.fromisoformat(created) + dt.timedelta(days=longest)).isoformat(timespec="seconds")


def primary_error(exc: BaseException) -> BaseException:
    """The error worth reporting for a task: a mover that only saw its peer go away is not the
    cause."""
    if isinstance(exc, (DownstreamClosedError, UpstreamEndedError)) or isinstance(exc, BaseExceptionGroup):
        return unwrap_group(BaseExceptionGroup("task", [exc]), secondary=(DownstreamClosedError, UpstreamEndedError))
    return exc


#: a mover started for a task: its reference, and the completion of its work
Started = tuple[Actor[MoverInbox], Completion[Any]]


class JobManager(Actor[JobInbox]):
    supervision = SupervisionPolicy(max_restarts=0, then=Decision.STOP)

    def __init__(
        self,
        spec: JobSpec,
        *,
        repository: Actor[RepositoryInbox],
        repository_name: str,
        block_size: int,
        level: int | None,
        scheduler: ResourceScheduler,
        runtime: Runtime,
        done: Completion[SessionResult],
        throttles: list[BandwidthLimit] | None = None,
        repo_immutable_days: int | None = None,
        session: int | None = None,
    ) -> None:
        super().__init__(f"job:{spec.name}", mailbox_size=runtime.settings.mailbox_size)
        self.spec = spec
        self.repository = repository
        self.repository_name = repository_name
        self.block_size = block_size
        self.level = level
        self.repo_immutable_days = repo_immutable_days
        self.scheduler = scheduler
        self.runtime = runtime
        self.done = done
        #: bandwidth limits every task goes through
        self.throttles = list(throttles or ())
        self.session = SessionResult(job=spec.name, started=utc_now())
        self.tasks: list[TaskContext] = []
        self._scope: anyio.CancelScope | None = None
        self._job_slots = Slots(spec.name, spec.max_tasks) if spec.max_tasks else None
        #: the daemon's session of this run (None outside the daemon): its log lines name it
        self.session_id = session
        self.log = self.log.bind(job=spec.name, **({} if session is None else {"session": session}))

    async def on_start(self) -> None:
        self.start_soon(self._work)

    async def handle(self, msg: JobInbox) -> Any:
        match msg:
            case JobStatusQuery():
                return self.status()
            case SessionQuery():  # a copy: the session goes on changing here
                return msgspec.msgpack.decode(msgspec.msgpack.encode(self.session), type=SessionResult)
            case CancelJob(reason=reason):
                self.session.warnings.append(f"job stopped: {reason}")
                if self._scope is not None:
                    self._scope.cancel()
                return None
        raise BlockferryError(f"{self.name}: unexpected message {type(msg).__name__}")

    def status(self) -> JobStatus:
        return JobStatus(
            job=self.spec.name,
            state=self.session.state,
            tasks=[TaskStatus(object=t.object, disk=t.disk, state=t.state, proxy=t.proxy, done_bytes=t.done_bytes,
                              total_bytes=t.total_bytes) for t in self.tasks],
        )

    # -- the session -----------------------------------------------------------------------------

    async def _work(self) -> None:
        t0 = anyio.current_time()
        try:
            with anyio.CancelScope() as self._scope:
                await self._run()
                await self._after_run()
        finally:
            s = self.session
            s.ended = utc_now()
            s.duration = anyio.current_time() - t0
            for o in s.objects:
                for d in o.disks:
                    if d.state == "done":
                        s.stats.add(d.stats)
            s.stats.duration = s.duration
            failed = [o for o in s.objects if o.state != "done"]
            s.state = "failed" if failed else ("warning" if s.warnings else "success")
            self.log.info("session_done", state=s.state, duration=round(s.duration, 3), points=s.points)
            self.done.set_result(s)
            self.request_stop()

    async def _after_run(self) -> None:
        """The job's retention on its objects, then its immediate backup copies (and their
        retention), done by the repository actor. Failures here are warnings: the new points are
        committed already."""
        s, spec = self.session, self.spec
        timeout = self.runtime.settings.ask_timeout
        done = [o.name for o in s.objects if o.state == "done"]
        if not done:
            return
        if spec.retention is not None:
            try:
                pruned: PruneReport = await repository_work(
                    self.repository, ApplyRetention(spec.retention, objects=done), timeout=timeout)
                s.pruned = pruned.removed
            except BlockferryError as exc:
                s.warnings.append(f"retention not applied: {exc}")
        for target in spec.copy_to:
            if target.every_hours is not None:
                continue  # periodic copies run on their own schedule
            try:
                copied = await copy_points(self.repository, CopyPoints(
                    to=target.url, points=s.points, retention=target.retention), timeout=timeout)
                s.copied[target.url] = copied.points
            except BlockferryError as exc:
                s.warnings.append(f"copy to {target.url} failed: {exc}")

    async def _run(self) -> None:
        plan: list[tuple[ObjectSpec, ObjectResult, list[TaskContext], list[Ticket] | None]] = []
        for obj in self.spec.objects:
            res = ObjectResult(name=obj.name)
            self.session.objects.append(res)
            try:
                obj = msgspec.structs.replace(obj, disks=await expand_disks(obj.disks))
                tasks = self._make_tasks(obj)
            except BlockferryError as exc:
                res.state, res.error = "failed", str(exc)
                continue
            # queued now, in object order, so slots are granted in that order
            tickets = [self.scheduler.request(t, self.repository_name, self._job_slots) for t in tasks]
            plan.append((obj, res, tasks, tickets))
        try:
            async with anyio.create_task_group() as tg:
                for obj, res, tasks, tickets in plan:
                    tg.start_soon(self._run_object, obj, res, tasks, tickets)
        finally:
            for _, res, _, tickets in plan:  # cancelled before an object started: free its place
                if res.state == "pending":
                    res.state, res.error = "failed", "job stopped before this object started"
                for tk in tickets or ():
                    self.scheduler.release(tk)

    def _make_tasks(self, obj: ObjectSpec) -> list[TaskContext]:
        tasks: list[TaskContext] = []
        names: set[str] = set()
        for d in obj.disks:
            name = d.name or source_plugin(d.source).disk_name(d.source)
            if name in names:
                raise BlockferryError(f"object {obj.name} has two disks named {name!r}: give them distinct names")
            names.add(name)
            tasks.append(self._task(obj, d, name))
        self.tasks.extend(tasks)
        return tasks

    def _task(self, obj: ObjectSpec, d: DiskSpec, name: str) -> TaskContext:
        return TaskContext(
            job=self.spec.name, object=obj.name, disk=name, spec=d, session=self.session_id,
            block_size=self.block_size, level=self.level,
            hints=load_hints(d.hints) if d.hints else None, throttles=self.throttles,
        )

    async def _run_object(self, obj: ObjectSpec, res: ObjectResult, tasks: list[TaskContext],
                          tickets: list[Ticket] | None) -> None:
        log = self.log.bind(object=obj.name)
        for attempt in range(self.spec.retries + 1):
            res.attempts = attempt + 1
            res.state = "running"
            if attempt:
                await anyio.sleep(self.spec.retry_delay)
                fresh = [self._task(obj, t.spec, t.disk) for t in tasks]
                self.tasks = [fresh[tasks.index(t)] if t in tasks else t for t in self.tasks]
                tasks = fresh
                tickets = [self.scheduler.request(t, self.repository_name, self._job_slots) for t in tasks]
            assert tickets is not None
            t0 = anyio.current_time()
            try:
                records = await self._run_tasks(tasks, tickets)
                stats = TaskStats()
                for r in records:
                    stats.add(r.stats)
                duration = anyio.current_time() - t0
                stats.duration = duration
                created = utc_now()
                manifest = Manifest(id=new_point_id(), object=obj.name, created=created, block_size=self.block_size,
                                    job=self.spec.name, disks=records, stats=stats, duration=duration,
                                    immutable_until=immutable_until(created, self.spec.immutable_days,
                                                                    self.repo_immutable_days))
                # once sent, a commit completes whatever happens (a stop, a shutdown): wait for it
                # so the session says truly whether the point exists
                with anyio.CancelScope(shield=True):
                    await self.repository.ask(CommitPoint(manifest), timeout=None)
                res.point, res.state, res.error = manifest.id, "done", None
                await self._finish_sources(obj.name, tasks, committed=True)
                break
            except Exception as exc:
                err = primary_error(exc)
                res.error = str(err) or repr(err)
                transient = isinstance(err, BlockferryError) and err.transient
                await self._finish_sources(obj.name, tasks, committed=False)
                if not transient or attempt == self.spec.retries:
                    res.state = "failed"
                    log.warning("object_failed", error=res.error, attempts=attempt + 1)
                    break
                log.warning("object_retry", error=res.error, attempt=attempt + 1)
            except BaseException:  # cancelled: the read is abandoned, sources release what they hold
                await self._finish_sources(obj.name, tasks, committed=False)
                raise
            finally:
                for tk in tickets:
                    self.scheduler.release(tk)
        res.disks = [
            DiskResult(name=t.disk, source=t.url, state=t.state, proxy=t.proxy, plan=t.plan,
                       error=None if t.error is None else str(primary_error(t.error)), stats=t.stats)
            for t in tasks
        ]
        for t in tasks:
            if t.hints is not None and not t.plan.startswith("incremental") and t.plan:
                self.session.warnings.append(f"{obj.name}/{t.disk}: hints not used, {t.plan}")

    async def _finish_sources(self, obj: str, tasks: list[TaskContext], *, committed: bool) -> None:
        """Tell sources that track changes whether their read made it into a point."""
        for t in tasks:
            finish, t.finish = t.finish, None
            if finish is None:
                continue
            try:
                with anyio.CancelScope(shield=True):
                    await finish(committed)
            except Exception as exc:
                self.session.warnings.append(f"{obj}/{t.disk}: change tracking not updated: {exc}")
                self.log.warning("finish_failed", object=obj, disk=t.disk, error=repr(exc))

    async def _run_tasks(self, tasks: list[TaskContext], tickets: list[Ticket]) -> list[DiskRecord]:
        records: list[DiskRecord | None] = [None] * len(tasks)

        async def one(i: int) -> None:
            records[i] = await self._run_task(tasks[i], tickets[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(tasks)):
                tg.start_soon(one, i)
        return [r for r in records if r is not None]

    async def _run_task(self, task: TaskContext, ticket: Ticket) -> DiskRecord:
        try:
            async with self.scheduler.hold(ticket) as proxy:
                movers: list[Started] = []
                try:
                    return await self._move(task, proxy, movers)
                finally:
                    # the task ends early (an error, a cancellation): stop its movers and wait
                    # until they have, so its slots are free only once nothing of it runs
                    with anyio.CancelScope(shield=True), anyio.move_on_after(60):
                        for mover, _ in movers:
                            try:
                                await mover.tell(CancelMove())
                            except BlockferryError:
                                pass  # it has stopped already
                        for _, done in movers:
                            try:
                                await done.wait()
                            except Exception:
                                pass
        except BaseException as exc:
            task.state = "failed"
            task.error = exc
            raise
        finally:
            if task.index is not None:
                task.index.release(task.claimed)

    async def _move(self, task: TaskContext, proxy: ProxyEntry, movers: list[Started]) -> DiskRecord:
        """Check the repository, find the base, connect a target and a source mover, wait for
        both. ``movers`` lists the movers started and not yet finished."""
        timeout = self.runtime.settings.ask_timeout
        t0 = anyio.current_time()
        await self.repository.ask(CheckAvailable(), timeout=timeout)
        # the base serves hints, and sources that track changes themselves
        found = await self.repository.ask(FindBase(task.object, task.disk), timeout=timeout)
        if found is not None:
            task.base_point, task.base, task.heal = found
        send, recv = anyio.create_memory_object_stream[DataItem](self.runtime.settings.stream_batches)
        try:
            target, target_done = await self.repository.ask(OpenTarget(task, recv), timeout=timeout)
        except BaseException:
            recv.close()
            send.close()
            raise
        movers.append((target, target_done))
        try:
            source, source_done = await proxy.actor.ask(RunSource(task, send), timeout=timeout)
        except BaseException:
            send.close()
            raise
        movers.append((source, source_done))
        source_stats, record = await _both(source_done, target_done)
        movers.clear()
        stats = msgspec.structs.replace(
            source_stats, written_bytes=record.stats.written_bytes, target_busy=record.stats.target_busy,
            duration=anyio.current_time() - t0,
        )
        record.stats = task.stats = stats
        task.state = "done"
        task.done_bytes = task.total_bytes
        self.log.info("task_done", object=task.object, disk=task.disk, read_bytes=stats.read_bytes,
                      written_bytes=stats.written_bytes, duration=round(stats.duration, 3),
                      bottleneck=stats.bottleneck())
        return record


async def _both(a: Completion[Any], b: Completion[Any]) -> tuple[Any, Any]:
    """Wait for two completions; raise the more meaningful error if either failed."""
    results: list[Any] = [None, None]
    errors: list[BaseException] = []

    async def wait(i: int, c: Completion[Any]) -> None:
        try:
            results[i] = await c.wait()
        except Exception as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait, 0, a)
        tg.start_soon(wait, 1, b)
    if errors:
        raise primary_error(BaseExceptionGroup("task failed", errors) if len(errors) > 1 else errors[0])
    return results[0], results[1]


__all__ = ["JobManager", "primary_error", "unwrap_group"]
